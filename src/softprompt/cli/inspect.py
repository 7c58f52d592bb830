"""``softprompt inspect``: an adapter's method, base model, size and nearest vocabulary tokens."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from softprompt import load
from softprompt.adapters.inspect import format_inspection, inspect_adapter
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option

NAME = "inspect"
HELP = "Show an adapter's method, base model, size and nearest vocabulary tokens."
EXAMPLES = """
    examples:
      softprompt inspect runs/sentiment/default
      softprompt inspect runs/sentiment/default --model smollm2-135m   # nearest vocabulary tokens
      softprompt inspect runs/sentiment/default --json
    """


@dataclass
class InspectOptions:
    """The options of ``softprompt inspect``."""

    path: str = option("", "Adapter directory or hub id.", positional=True)
    model: str | None = option(None, "Base model to compare virtual tokens with its vocabulary.")
    top_k: int = option(3, "Nearest tokens shown per virtual token (default 3).")
    json: bool = option(False, "Print JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, InspectOptions)


def run(args: argparse.Namespace) -> int:
    model = load(args.model) if args.model else None
    info = inspect_adapter(args.path, model, top_k=args.top_k)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_inspection(info))
    return 0
