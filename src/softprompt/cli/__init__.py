"""The `softprompt` command line: one parser (`app.py`), one module per subcommand, shared options in `common.py`."""

from softprompt.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
