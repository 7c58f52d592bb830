"""The `softprompt` command line: one parser (`app.py`), one module per group of subcommands."""

from softprompt.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
