"""Every `softprompt ...` command quoted in the docs, the recipes and the CLI's own --help examples uses
flags the command has: documentation that drifts from the CLI is a bug users hit first.

Quoted commands may be fragments (`softprompt train --kfold`), so each flag is checked against its
subcommand; commands in code blocks and in --help are complete, so they must also parse (train's
flags are its config's, checked by name: their files need not exist here)."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from softprompt.cli.app import EPILOGS, build_parser
from softprompt.training.config import train_options

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "examples" / "adapters" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "research" / "NOTES.md",
]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
COMMAND = re.compile(r"(?:^|[\s(`])(?:\.venv/bin/)?softprompt ([a-z]+(?:[ \t]+[^\s`|#][^`|#\n]*)?)")


def _joined(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)  # shell line continuations


def documented_commands() -> list[tuple[str, str, bool]]:
    """``(where, command after 'softprompt', complete?)`` for every quoted command."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(ROOT))
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
            for line in _joined(block).splitlines():
                line = line.strip()
                if line.startswith(("softprompt ", ".venv/bin/softprompt ")):
                    found.append((where, line.split("softprompt ", 1)[1], True))
        for inline in re.findall(r"`((?:\.venv/bin/)?softprompt [a-z][^`]*)`", text.replace("\n", " ")):
            found.append((where, inline.split("softprompt ", 1)[1], False))
    for path in RECIPES:
        comments = "\n".join(
            line.strip()[1:].strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("#")
        )
        for line in _joined(comments).splitlines():
            found += [(str(path.relative_to(ROOT)), m, False) for m in COMMAND.findall(line)]
    for name, epilog in EPILOGS.items():
        for line in _joined(epilog).splitlines():
            if line.strip().startswith("softprompt "):
                found.append((f"softprompt {name} --help", line.strip().split("softprompt ", 1)[1], True))
    return [
        (where, command, complete) for where, command, complete in found if re.match(r"[a-z]+(\s|$)", command)
    ]  # not a quoted message ("softprompt train: interrupted")


COMMANDS = documented_commands()
PARSER = build_parser()
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
TRAIN_FLAGS = {o.flag for o in train_options()}


def _tokens(command: str) -> list[str]:
    return [t for t in shlex.split(command, comments=True) if t not in ("...", "…")]


def test_the_docs_quote_commands_of_every_kind():
    assert len(COMMANDS) > 30
    assert {c.split()[0] for _, c, _ in COMMANDS} >= {"train", "eval", "predict", "generate", "inspect", "serve"}


@pytest.mark.parametrize("where,command,complete", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c, _ in COMMANDS])
def test_documented_command_uses_real_flags(where, command, complete, capsys):
    tokens = _tokens(command)
    name = tokens[0]
    assert name in SUBPARSERS, f"{where}: softprompt {name}: no such command"
    flags = {t.split("=", 1)[0] for t in tokens[1:] if t.startswith("--")}
    known = TRAIN_FLAGS if name == "train" else set(SUBPARSERS[name]._option_string_actions)
    assert flags <= known | {"--help"}, f"{where}: softprompt {command}: unknown {sorted(flags - known)}"
    if complete and name != "train":
        try:
            PARSER.parse_args(tokens)
        except SystemExit as exc:
            pytest.fail(f"{where}: softprompt {command}: {capsys.readouterr().err.strip()} ({exc.code})")
