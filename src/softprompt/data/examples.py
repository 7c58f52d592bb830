"""Examples: rows rendered through a template, with their labels mapped through a verbalizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from softprompt.data.rows import Row, column_names, require_columns
from softprompt.data.templates import Template
from softprompt.data.verbalizers import Verbalizer
from softprompt.errors import ConfigError, DataError
from softprompt.options import did_you_mean, flag


@dataclass(frozen=True)
class Example:
    """One rendered prompt; ``target`` is the label text, or None for unlabelled data; ``task``: the row's task of a
    multitask adapter (read from a task column), else None."""

    text: str
    target: str | None
    row: dict
    task: int | None = None


def build_examples(
    rows: Sequence[Row],
    template: Template | str,
    label_column: str | None = None,
    verbalizer: Verbalizer | None = None,
    *,
    source: str,
) -> list[Example]:
    """Render every row through ``template``; map ``label_column`` through ``verbalizer`` when given.

    Without a verbalizer the labels found in the data are used as they are.
    """
    template = template if isinstance(template, Template) else Template(template)
    if not rows:
        raise DataError(f"{source} has no rows; expected at least one example.")
    if not template.fields:
        raise ConfigError(
            f"template {template.text!r} uses no column, so every example would be the same text; "
            f"add a field such as {{text}}."
        )
    template.validate(column_names(rows), source=source)
    require_columns(rows, template.fields, source=source)
    if label_column is None:
        if verbalizer is not None:
            raise ConfigError("a verbalizer was given without a label column; pass --label-column too.")
        return [Example(template.render(row), None, row) for row in rows]
    if verbalizer is None:
        verbalizer = Verbalizer.from_rows(rows, label_column, source=source)
    require_columns(rows, [label_column], source=source)
    return [
        Example(
            template.render(row),
            verbalizer.to_text(row[label_column], row_index=i, source=source, column=label_column),
            row,
        )
        for i, row in enumerate(rows)
    ]


def with_tasks(examples: Sequence[Example], column: str, num_tasks: int, *, source: str) -> list[Example]:
    """The examples (rows of ``source``, in its order), each with its row's task id from ``column``, checked to be
    one of ``num_tasks`` (a multitask adapter's); errors name the flag, or the file, row and column."""
    out = []
    for i, example in enumerate(examples):
        if column not in example.row:
            available = list(example.row)
            raise ConfigError(
                f"{flag('task_column')}: {source} has no column {column!r}{did_you_mean(column, available)}; "
                f"its columns are {', '.join(map(repr, available))}"
            )
        value = str(example.row[column]).strip()
        if not value.isdigit() or int(value) >= num_tasks:
            raise DataError(
                f"{source}: row {i + 1}: task id {value!r} in column {column!r} is not a task of an adapter with "
                f"{num_tasks} tasks (--num-tasks); expected 0 to {num_tasks - 1}"
            )
        out.append(replace(example, task=int(value)))
    return out
