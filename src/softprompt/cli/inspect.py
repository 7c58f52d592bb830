"""``softprompt inspect``: an adapter's method, base model, size and nearest vocabulary tokens."""

from __future__ import annotations

import argparse
import json

from softprompt import load
from softprompt.adapters.inspect import format_inspection, inspect_adapter

NAME = "inspect"
HELP = "Show an adapter's method, base model, size and nearest vocabulary tokens."
EXAMPLES = """
    examples:
      softprompt inspect runs/sentiment/default
      softprompt inspect runs/sentiment/default --model smollm2-135m   # nearest vocabulary tokens
      softprompt inspect runs/sentiment/default --json
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="Adapter directory or hub id.")
    parser.add_argument("--model", help="Base model to compare virtual tokens with its vocabulary.")
    parser.add_argument("--top-k", type=int, default=3, help="Nearest tokens shown per virtual token.")
    parser.add_argument("--json", action="store_true", help="Print JSON.")


def run(args: argparse.Namespace) -> int:
    model = load(args.model) if args.model else None
    info = inspect_adapter(args.path, model, top_k=args.top_k)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_inspection(info))
    return 0
