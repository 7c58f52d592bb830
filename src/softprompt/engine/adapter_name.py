"""The rule for adapter names, in one place: the model, the server and the training config all check it.

An adapter name is also a directory name, a URL path segment and the ``model`` field of API requests, so it
is kept to a short, safe alphabet. No heavy import here: the server's settings (and the CLI) read it.
"""

from __future__ import annotations

import re

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
ADAPTER_NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
_SHOWN = 80  # a name longer than this is cut in messages (it may be anything a client sent)


def check_adapter_name(name: object) -> str | None:
    """None when ``name`` is a valid adapter name, else the problem, ready for an error message:
    ``adapter name 'x/y': expected 1-64 letters, ...``."""
    if isinstance(name, str) and ADAPTER_NAME.fullmatch(name):
        return None
    shown = name[:_SHOWN] if isinstance(name, str) else name
    return f"adapter name {shown!r}: expected {ADAPTER_NAME_RULE}"


# A row may address one task of a multitask adapter as ``NAME:TASK`` (``mpt:2``): ':' never occurs in a name, so
# the form is unambiguous wherever a row's adapter is named (the engine's per-row names, the server's ``model``).
TASK_SEPARATOR = ":"


def row_key(name: str | None, task: int | None) -> str | None:
    """The per-row adapter key of task ``task`` of adapter ``name`` (``name`` itself when ``task`` is None)."""
    return name if task is None or name is None else f"{name}{TASK_SEPARATOR}{task}"


def split_row_key(key: str) -> tuple[str, int | None]:
    """``'mpt:2'`` -> ``('mpt', 2)``, ``'pt'`` -> ``('pt', None)``; ValueError naming the key if the task is no number."""
    name, sep, task = key.partition(TASK_SEPARATOR)
    if not sep:
        return key, None
    if not task.isdigit() or not task.isascii():
        shown = key[:_SHOWN]
        raise ValueError(f"adapter {shown!r}: expected NAME{TASK_SEPARATOR}TASK with TASK a task number, e.g. {name}:0")
    return name, int(task)
