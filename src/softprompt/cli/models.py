"""``softprompt models``: the built-in model names and whether each is cached."""

from __future__ import annotations

import argparse
import json

from softprompt.models.builtin import list_builtin

NAME = "models"
HELP = "List the built-in model names and whether each is cached."
EXAMPLES = """
    examples:
      softprompt models
      softprompt models --json
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print JSON.")


def run(args: argparse.Namespace) -> int:
    models = list_builtin()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        state = "cached" if m["cached"] else "not cached (fetched from PyPI on first use)"
        print(f"{m['name']:<14} {state:<44} {m['description']}")
    return 0
