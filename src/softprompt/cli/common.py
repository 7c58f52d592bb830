"""What several subcommands share: the ``--model`` and ``--adapter`` options and reading ``[NAME=]PATH``."""

from __future__ import annotations

import argparse
import os

from softprompt.adapters.peft_format import check_adapter_dir
from softprompt.errors import SoftPromptError


def add_model_argument(parser: argparse.ArgumentParser, help: str = "Base model: built-in name, local directory "
                                                                     "or hub id.") -> None:
    parser.add_argument("--model", required=True, help=help)


def add_adapter_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--adapter [NAME=]PATH``, repeatable; read the values with `parse_adapter_specs`."""
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH", help=help)


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
