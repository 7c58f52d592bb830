"""The `softprompt` command: one parser, built from one module per subcommand.

Each subcommand module (`softprompt.cli.train`, ``evaluate``, ``predict``, ...) holds its ``NAME``, one-line
``HELP``, its ``--help`` ``EXAMPLES``, ``add_arguments(parser)`` and ``run(args)`` (``run(args, extra)``
when ``TAKES_EXTRA``: train's flags are its config's, parsed by the config). Each is a thin shell over
one library function.

User mistakes (`SoftPromptError`) print one line and exit 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import types

from softprompt import __version__
from softprompt.cli import (
    demo,
    estimate_memory,
    evaluate,
    generate,
    inspect,
    models,
    predict,
    push,
    serve,
    sweep,
    train,
)
from softprompt.errors import SoftPromptError

#: The subcommands, in the order ``softprompt --help`` lists them.
SUBCOMMANDS: tuple[types.ModuleType, ...] = (
    train,
    sweep,
    evaluate,
    predict,
    generate,
    inspect,
    push,
    models,
    estimate_memory,
    serve,
    demo,
)
#: Each subcommand's ``--help`` examples, by name.
EPILOGS: dict[str, str] = {command.NAME: command.EXAMPLES for command in SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Train, evaluate and serve soft prompts (prompt tuning, prefix tuning, P-tuning) on frozen models.",
        epilog="Run 'softprompt demo' first, then 'softprompt COMMAND --help' for worked examples.",
    )
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.HELP,
            epilog=textwrap.dedent(command.EXAMPLES),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run, takes_extra=getattr(command, "TAKES_EXTRA", False))
    return parser


def _deepspeed_logs_to_stderr(record: logging.LogRecord) -> bool:
    """A filter for DeepSpeed's logger, which writes to the stdout it finds when imported (transformers and
    accelerate import it on some paths when it is installed): its warnings would corrupt `--json` output
    and anything piped from stdout, so they go to stderr instead."""
    print(f"[DeepSpeed] {record.levelname}: {record.getMessage()}", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.takes_extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.getLogger("DeepSpeed").addFilter(_deepspeed_logs_to_stderr)  # before anything imports it
    try:
        return int((args.func(args, extra) if args.takes_extra else args.func(args)) or 0)
    except SoftPromptError as exc:
        print(f"softprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a TrainingInterrupted says where the latest state was saved
        print(f"softprompt {args.command}: interrupted{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
