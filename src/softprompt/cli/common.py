"""What several subcommands share: their ``--model`` and ``--adapter`` fields and reading ``[NAME=]PATH``."""

from __future__ import annotations

import os
from typing import Any

from softprompt.models.precision import DTYPE_HELP, QUANTIZE_HELP, QUANTIZE_NAMES
from softprompt.adapters.peft_format import check_adapter_dir
from softprompt.engine.decode_options import DECODE_HELP, DECODE_NAMES
from softprompt.errors import SoftPromptError
from softprompt.options import option


def dtype_option() -> Any:
    """The ``--dtype`` field of a subcommand that loads the base model."""
    return option(None, DTYPE_HELP)


def quantize_option() -> Any:
    """The ``--quantize`` field of a subcommand that loads the base model."""
    return option(None, QUANTIZE_HELP, choices=QUANTIZE_NAMES)


def decode_option() -> Any:
    """The ``--decode`` field of a subcommand that generates text."""
    return option(None, DECODE_HELP, choices=DECODE_NAMES)


def model_option(help: str = "Base model: built-in name, local directory or hub id.") -> Any:
    """The ``--model`` field of a subcommand's options (required)."""
    return option(None, help, required=True)


def adapter_option(help: str) -> Any:
    """The ``--adapter [NAME=]PATH`` field (repeatable) of a subcommand's options; read it with
    `parse_adapter_specs`."""
    return option(list, help, metavar="[NAME=]PATH")


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """``[NAME=]PATH`` items into {name: path}; a bare path is named after its directory.

    Each local directory is checked here (`check_adapter_dir`), before any command loads the base model."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, os.path.basename(os.path.normpath(spec))
        if not name or not path:
            raise SoftPromptError(f"--adapter {spec!r}: expected NAME=PATH or PATH")
        if name in out:
            raise SoftPromptError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out[name] = path
    for path in out.values():
        check_adapter_dir(path)
    return out
