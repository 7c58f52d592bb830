"""Which adapter, and which of its tasks, each row of a call uses.

A row names an adapter (``None``: the bare model); a row of a multitask adapter also names its task, either in
its key (``NAME:TASK``, `softprompt.engine.adapter_name.row_key`) or through ``task_ids`` as PEFT's forward takes
them. `row_keys` turns both into one checked key per row, which the engine uses everywhere a row's adapter is
named (its prompt keys/values are cached per key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from softprompt.engine.adapter_name import row_key, split_row_key
from softprompt.errors import SoftPromptError
from softprompt.methods import SoftPromptMethod

# Per row: an adapter name, ``NAME:TASK`` for a task of a multitask adapter, or None (the bare model); or one for all.
AdapterNames = Sequence[str | None] | str | None
# Per row: the task of a multitask adapter (None for rows of other adapters); or one for all rows (PEFT's task_ids).
TaskIds = Sequence[int | None] | torch.Tensor | int | None
GetAdapter = Callable[[str], SoftPromptMethod]


def row_keys(adapters: AdapterNames, batch: int, task_ids: TaskIds, get_adapter: GetAdapter) -> list[str | None]:
    """Each row's adapter key (``NAME`` or ``NAME:TASK``; None: the bare model), checked against the adapters."""
    if adapters is None or isinstance(adapters, str):
        names = [adapters] * batch
    else:
        names = list(adapters)
        if len(names) != batch:
            raise SoftPromptError(f"adapters: expected one name per row ({batch}), got {len(names)}")
    if task_ids is not None:
        tasks = [task_ids] * batch if isinstance(task_ids, int) else list(task_ids)
        if len(tasks) != batch:
            raise SoftPromptError(f"task_ids: expected one task id per row ({batch}), got {len(tasks)}")
        names = [_with_task(name, task, row) for row, (name, task) in enumerate(zip(names, tasks))]
    for name in names:
        if name is not None:
            row_adapter(name, get_adapter)
    return names


def _with_task(name: str | None, task, row: int) -> str | None:
    if task is None:
        return name
    if isinstance(task, torch.Tensor):
        task = task.item()
    if isinstance(task, bool) or not isinstance(task, int) or task < 0:
        raise SoftPromptError(f"task_ids: row {row}: expected a task id (an integer from 0), got {task!r}")
    if name is None or split_row_key(name)[1] is not None:
        whose = "has no adapter" if name is None else f"already names its task ({name!r})"
        raise SoftPromptError(f"task_ids: row {row} {whose}; give its task id as None")
    return row_key(name, task)


def row_adapter(key: str, get_adapter: GetAdapter) -> tuple[SoftPromptMethod, int | None]:
    """The adapter and task a row key names; one-line errors for a task an adapter does not have."""
    try:
        name, task = split_row_key(key)
    except ValueError as exc:
        raise SoftPromptError(str(exc)) from None
    adapter = get_adapter(name)
    count, method = adapter.num_tasks, adapter.config.method
    if task is not None and not count:
        raise SoftPromptError(f"adapter {name!r} ({method}) has no tasks; name it without a task id")
    if count and task is None:
        raise SoftPromptError(
            f"adapter {name!r} ({method}) needs a task id per row (0 to {count - 1}): pass task_ids or name the "
            f"row {name}:TASK"
        )
    if task is not None and task >= count:
        raise SoftPromptError(
            f"task id {task} of adapter {name!r}: out of range; it has {count} tasks (0 to {count - 1})"
        )
    return adapter, task
