"""User-facing errors.

Every mistake a user can make (a bad flag, file, field or adapter) raises `SoftPromptError` with one
clear sentence that names the thing at fault and what was expected. The CLI prints it on one line and
exits non-zero without a traceback; library users can catch it like any exception.
"""

from __future__ import annotations


class SoftPromptError(Exception):
    """A mistake in user input: the message names the file, field or flag and what was expected."""


class AdapterMismatchError(SoftPromptError):
    """An adapter was made for a base model with another shape (hidden size, layers, heads)."""


class DataError(SoftPromptError):
    """A data file is malformed: the message names the file, row and column."""


class ConfigError(SoftPromptError):
    """A config file or flag has a wrong type, an unknown key or a value outside its range."""
