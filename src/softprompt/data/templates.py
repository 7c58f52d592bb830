"""Prompt templates: ``"Tweet text : {Tweet text} Label : "`` renders a row into the text the model reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from softprompt.data.rows import cell_text
from softprompt.errors import ConfigError, DataError
from softprompt.options import did_you_mean


def default_template(text_column: str) -> str:
    """The template used when none is given: the text column alone, ``"{text}"``."""
    return "{" + text_column + "}"


def escape_template_text(text: str) -> str:
    """Literal text for a `Template`: braces doubled, so it renders unchanged."""
    return text.replace("{", "{{").replace("}", "}}")


class Template:
    """A prompt with ``{column}`` fields, e.g. ``"Tweet text : {Tweet text} Label : "``.

    Field names are column names verbatim, spaces included (so this is not `str.format`); ``{{`` and
    ``}}`` are literal braces. A field name cannot contain a brace.
    """

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise ConfigError(f"template must be a string, got {type(text).__name__}.")
        self.text = text
        # (value, is_field) pieces; adjacent literals are merged
        self._parts: tuple[tuple[str, bool], ...] = _parse_template(text)

    @property
    def fields(self) -> tuple[str, ...]:
        """Column names used by the template, each once, in order of first use."""
        return tuple(dict.fromkeys(value for value, is_field in self._parts if is_field))

    def render(self, row: Mapping[str, Any]) -> str:
        return "".join(text for text, _ in self.pieces(row))

    def pieces(self, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """The rendered text in pieces, ``(text, is_field)``: the template's literals and the row's cells
        (CPT types its context's tokens by them)."""
        out = []
        for value, is_field in self._parts:
            if not is_field:
                out.append((value, False))
                continue
            try:
                cell = row[value]
            except KeyError:
                raise DataError(
                    f"template {self.text!r} uses column {value!r}, which the row lacks; "
                    f"its columns are {', '.join(map(repr, row))}."
                ) from None
            out.append((cell if isinstance(cell, str) else cell_text(cell), True))
        return out

    def validate(self, columns: Iterable[str], *, source: str) -> None:
        """Raise `ConfigError` if the template uses a column that ``source`` lacks."""
        available = list(columns)
        present = set(available)
        missing = [f for f in self.fields if f not in present]
        if missing:
            hints = "".join(did_you_mean(m, available) for m in missing[:1])
            raise ConfigError(
                f"template {self.text!r} uses column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}{hints} that {source} lacks; available columns: "
                f"{', '.join(map(repr, available))}."
            )

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _parse_template(text: str) -> tuple[tuple[str, bool], ...]:
    parts: list[tuple[str, bool]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):  # '{{' or '}}': a literal brace
            literal.append(ch)
            i += 2
        elif ch == "{":
            end = text.find("}", i + 1)
            name = text[i + 1 : end] if end != -1 else ""
            if end == -1 or "{" in name:
                raise ConfigError(
                    f"template {text!r}: the '{{' at character {i + 1} is never closed; "
                    f"write '{{{{' for a literal brace."
                )
            if not name:
                raise ConfigError(
                    f"template {text!r}: the '{{}}' at character {i + 1} names no column; "
                    f"write {{column}}, or '{{{{}}}}' for literal braces."
                )
            if literal:
                parts.append(("".join(literal), False))
                literal = []
            parts.append((name, True))
            i = end + 1
        elif ch == "}":
            raise ConfigError(
                f"template {text!r}: the '}}' at character {i + 1} closes nothing; write '}}}}' for a literal brace."
            )
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append(("".join(literal), False))
    return tuple(parts)
