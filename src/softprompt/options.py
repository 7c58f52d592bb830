"""Options declared once: a dataclass field carries its help text, and everything else comes from it.

`option` declares a field (default, help, optional ``choices``/``metavar``/``cli=False``). From the fields
come the command-line flags (`add_arguments` for argparse; `Option` rows for help listings), the
parsing of values from YAML or command-line text (`coerce`), and the range checks (`check_int`,
`check_number`, `check_choice`) whose errors name the option, as a flag (``--batch-size``) or a field
(``num_virtual_tokens``): whoever calls them passes the spelling its user typed.

Used by the method configs, the training config and the command line; it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Union

import yaml

from softprompt.errors import ConfigError


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its help text. ``default`` may be ``list``/``dict`` (or an instance of
    one, copied per object) for a mutable default. ``meta``: ``choices``, ``metavar``, ``required``,
    ``flag``, ``cli=False`` (see `add_arguments`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    if default in (list, dict):
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def field_name(spelled: str) -> str:
    """A field name from a flag or key spelling: ``--batch-size`` / ``batch-size`` -> ``batch_size``."""
    return str(spelled).lstrip("-").replace("-", "_")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The hint `` (did you mean 'lr'?)`` for the closest of ``known`` to ``name``, or ``""``.

    A name that differs only in case or surrounding spaces wins over one that is merely similar.
    """
    known = list(known)
    folded = {k.strip().lower(): k for k in known}
    key = name.strip().lower()
    close = [folded[key]] if key in folded else difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class OptionError(ConfigError):
    """A bad value of one option: ``str()`` is ``"<where>: <problem>"``. A caller that spells the option
    differently for its user (a flag instead of a field, an adapter prefix) re-raises `renamed`."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem

    def renamed(self, where: str) -> OptionError:
        return OptionError(where, self.problem)


# ------------------------------------------------------------------------------------------- checks


def check_int(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an integer within the bounds, else an `OptionError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(where, f"expected an integer, got {value!r}")
    low = minimum is not None and value < minimum
    if low or (maximum is not None and value > maximum):
        bound = (
            f"between {minimum} and {maximum}"
            if minimum is not None and maximum is not None
            else f"of at least {minimum}"
            if low
            else f"of at most {maximum}"
        )
        raise OptionError(where, f"expected an integer {bound}, got {value}")
    return value


def check_number(
    value: Any, where: str, *, minimum: float | None = None, above: float | None = None, below: float | None = None
) -> float:
    """``value`` if it is a number (not NaN) within the bounds, else an `OptionError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise OptionError(where, f"expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(where, f"expected a number of at least {minimum}, got {value}")
    if above is not None and value <= above:
        raise OptionError(where, f"expected a number above {above}, got {value}")
    if below is not None and value >= below:
        raise OptionError(where, f"expected a number below {below}, got {value}")
    return value


def check_choice(value: Any, where: str, choices: Iterable[str]) -> Any:
    """``value`` if it is one of ``choices``, else an `OptionError` naming ``where`` (with the closest)."""
    choices = tuple(choices)
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise OptionError(where, f"expected one of {', '.join(choices)}, got {value!r}{hint}")
    return value


# ------------------------------------------------------------------------------------------- types


def _union_args(hint: Any) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else ()


def is_optional(hint: Any) -> bool:
    """Whether the field's type admits None (``int | None``)."""
    return type(None) in _union_args(hint)


def _kinds(hint: Any) -> list:
    """The non-None types of a field: ``bool | str | None`` -> [bool, str]."""
    return [a for a in _union_args(hint) if a is not type(None)] or [hint]


def is_bool(hint: Any) -> bool:
    """Whether a bare flag (``--bf16``) sets the field: its type admits a bool."""
    return bool in _kinds(hint)


def type_name(hint: Any) -> str:
    """``int``, ``float or null``, ``bool or str``, ``mapping``, ``list`` ..."""
    names = []
    for kind in _kinds(hint):
        origin = typing.get_origin(kind)
        names.append(
            {int: "int", float: "float", bool: "bool", str: "str"}.get(kind)
            or {dict: "mapping", list: "list"}.get(origin, str(kind))
        )
    return " or ".join(names + (["null"] if is_optional(hint) else []))


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class _NoMatch(Exception):
    pass


def _scalar(value: Any, kind: type, text: bool) -> Any:
    """``value`` as ``kind`` (bool, int, float or str), or `_NoMatch`."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-2 (no dot) as a string: accept it as a number
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif kind is str and isinstance(value, str):
        return value
    raise _NoMatch


def coerce(value: Any, hint: Any, *, text: bool, where: str) -> Any:
    """``value`` as a field of type ``hint`` (bool, int, float, str, dict[str, str], unions of them with
    None). ``text``: the value came from a command line, so strings are parsed ('4', 'true', 'null').
    Lists are the caller's (they hold nested configs). Errors name ``where``."""
    if is_optional(hint) and (
        value is None or (text and isinstance(value, str) and value.strip().lower() in ("none", "null"))
    ):
        return None
    kinds = _kinds(hint)
    if typing.get_origin(kinds[0]) is dict:
        return _mapping(value, text=text, where=where)
    if kinds[0] == list[int]:
        return _int_list(value, text=text, where=where)
    for kind in kinds:
        try:
            return _scalar(value, kind, text)
        except _NoMatch:
            continue
    raise OptionError(where, f"expected {' or '.join(_EXPECTED[k] for k in kinds)}, got {value!r}")


def _mapping(value: Any, *, text: bool, where: str) -> dict[str, str]:
    def fail(expected: str):
        raise OptionError(where, f"expected {expected}, got {value!r}")

    if text and isinstance(value, str):
        value = parse_mapping_text(value, where)
    if not isinstance(value, Mapping) or not value:
        fail("a mapping of raw labels to label texts, e.g. {'1': 'complaint', '2': 'no complaint'}")
    out = {}
    for k, v in value.items():
        if isinstance(v, (dict, list)) or v is None or isinstance(k, (dict, list)) or k is None:
            fail("a mapping of raw labels to label texts (strings)")
        out[_scalar_text(k)] = _scalar_text(v)
    return out


def _int_list(value: Any, *, text: bool, where: str) -> list[int]:
    """A list of integers (token ids): a YAML list, or from a command line '1,2,3' or '[1, 2, 3]'."""
    if text and isinstance(value, str):
        value = value.strip().strip("[]").split(",") if value.strip() else []
    if not isinstance(value, (list, tuple)):
        raise OptionError(where, f"expected a list of integers such as 1,2,3, got {value!r}")
    try:
        return [_scalar(v, int, text) for v in value]
    except _NoMatch:
        raise OptionError(where, f"expected a list of integers such as 1,2,3, got {value!r}") from None


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_mapping_text(text: str, where: str) -> Any:
    """``'1=complaint,2=no complaint'`` or a YAML/JSON mapping (``{1: " yes"}``) from a command line."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not a valid mapping ({str(exc).splitlines()[0]})") from None
    out = {}
    for part in stripped.split(","):
        raw, eq, label = part.partition("=")
        if not eq or not raw.strip():
            raise ConfigError(
                f"{where}: expected RAW=TEXT pairs separated by commas, e.g. '1=complaint,2=no complaint', got {text!r}"
            )
        out[raw.strip()] = label.strip()
    return out


# ------------------------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class Option:
    """One field as a command-line option (what help listings show)."""

    name: str
    flag: str
    type: str  # "int", "float", "bool", "str", "mapping", "list", each possibly "... or null"
    default: Any
    help: str
    choices: tuple = ()


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"field {f.name!r} has no default"
    return f.default_factory()


def options_of(cls: type) -> list[Option]:
    """Every field of dataclass ``cls`` that the command line shows, as an `Option`, in order."""
    hints = typing.get_type_hints(cls)
    return [
        Option(
            f.name,
            flag(f.name),
            type_name(hints[f.name]),
            default_of(f),
            f.metadata.get("help", ""),
            tuple(f.metadata.get("choices", ())),
        )
        for f in fields(cls)
        if f.metadata.get("cli", True)
    ]


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, metavars: Mapping[str, str] | None = None) -> None:
    """One argparse argument per field of ``cls`` (not those with ``cli=False``): a bool field is a switch,
    a list field a repeatable option, others take a value of the field's type; the default is shown
    unless the help already tells it. Field metadata may add ``choices``, ``metavar`` (or pass
    ``metavars``), ``required``, ``flag`` (a spelling other than the field name's) and ``positional``
    (an argument without a flag; a list field takes one or more)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        default, help_text = default_of(f), f.metadata.get("help", "")
        kind = _kinds(hints[f.name])[0]
        many = typing.get_origin(kind) is list
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        if f.metadata.get("positional"):
            parser.add_argument(
                f.name, help=help_text or None, metavar=f.metadata.get("metavar"), nargs="+" if many else None
            )
            continue
        metavar = (metavars or {}).get(f.name, f.metadata.get("metavar", None if extra else f.name.upper()))
        if hints[f.name] is bool:
            parser.add_argument(flag(f.name), action="store_true", default=default, help=help_text)
        elif many:
            parser.add_argument(flag(f.name), action="append", default=default, metavar=metavar, help=help_text)
        else:
            shown = "" if default is None or "default" in help_text else f" (default {default})"
            parser.add_argument(
                f.metadata.get("flag", flag(f.name)),
                dest=f.name,
                type=kind if kind in (int, float) else str,
                default=default,
                help=help_text + shown,
                required=f.metadata.get("required", False),
                metavar=metavar,
                **extra,
            )


__all__ = [
    "Option",
    "OptionError",
    "add_arguments",
    "check_choice",
    "check_int",
    "check_number",
    "coerce",
    "default_of",
    "did_you_mean",
    "field_name",
    "flag",
    "is_bool",
    "is_optional",
    "option",
    "options_of",
    "parse_mapping_text",
    "type_name",
]
