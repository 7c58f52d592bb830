"""``softprompt models``: the built-in model names and whether each is cached."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from softprompt.models.builtin import list_builtin
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option

NAME = "models"
HELP = "List the built-in model names and whether each is cached."
EXAMPLES = """
    examples:
      softprompt models
      softprompt models --json
    """


@dataclass
class ModelsOptions:
    """The options of ``softprompt models``."""

    json: bool = option(False, "Print JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, ModelsOptions)


def run(args: argparse.Namespace) -> int:
    models = list_builtin()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        state = "cached" if m["cached"] else "not cached (fetched from PyPI on first use)"
        print(f"{m['name']:<14} {state:<44} {m['description']}")
    return 0
