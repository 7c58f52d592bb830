"""Text data for soft prompts: load rows, render them through a template, map labels, split.

Every loader returns ``list[dict[str, str]]``: one dict per example, every row with the same columns
(in file order), every value a string. Non-string values (JSONL numbers, parquet ints, hub class ids)
become their JSON text, and null becomes ``""``, so ``1`` in a JSONL file and ``1`` in a CSV file are
the same label ``"1"``.

Rows in messages are numbered from 1 and do not count a header line ("row 1" is the first example);
where the parser knows it, the physical line of the file is named too.

    rows = load_rows("train.csv")
    template = Template("Tweet text : {Tweet text} Label : ")
    examples = build_examples(rows, template, "Label", Verbalizer({"1": "complaint", "2": "no complaint"}),
                              source="train.csv")
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import math
import random
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from softprompt.errors import ConfigError, DataError

Row = dict[str, str]

FORMATS = ("csv", "tsv", "jsonl", "parquet", "phrasebank", "hf")
_FORMAT_ALIASES = {"ndjson": "jsonl", "pq": "parquet", "hub": "hf", "txt": "phrasebank"}
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".pq": "parquet", ".txt": "phrasebank"}
HUB_PREFIX = "hf:"
#: Local data files are read into memory whole: a bigger one is refused up front, not by running out of memory.
MAX_FILE_BYTES = 2 * 1024**3
#: The longest value (characters) a cell may hold: a longer one is almost surely a broken file (an unclosed
#: quote, a missing line break, binary data); examples are cut to --max-length tokens anyway.
MAX_VALUE_CHARS = 1_000_000

# A tweet or a document can exceed the csv module's default 128 KiB field limit; raise it once.
csv.field_size_limit(2**31 - 1)


# --------------------------------------------------------------------------------------------- loading


def load_rows(path_or_name: str | PathLike, *, format: str | None = None, split: str = "train",
              encoding: str | None = None) -> list[Row]:
    """Read a data set into rows of strings.

    ``path_or_name`` is a local file (CSV, TSV, JSONL, parquet, or a financial_phrasebank
    ``sentence@label`` ``.txt`` file; the format comes from the extension unless ``format`` is given)
    or a Hugging Face hub data set written ``hf:owner/name[:config]`` (``split`` picks the split).
    ``encoding`` applies to text formats; by default they are read as UTF-8 (a BOM is dropped), and
    phrasebank files fall back to latin-1, the encoding of the original release.
    """
    spec = str(path_or_name)
    fmt = _normalise_format(format)
    if spec.startswith(HUB_PREFIX) or fmt == "hf":
        return _load_hub(spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec, split)

    path = Path(spec)
    if not path.exists():
        hint = f" (for a Hugging Face data set write {HUB_PREFIX}{spec})" if _looks_like_hub_name(spec) else ""
        raise DataError(f"{path}: no such file{hint}; expected a CSV, TSV, JSONL, parquet or "
                        f"phrasebank .txt file, or a hub data set written hf:owner/name[:config].")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass the data file inside it.")
    if not path.is_file():  # a device, pipe or socket (e.g. a symlink to /dev/zero) would never end
        raise DataError(f"{path} is not a regular file; expected a data file.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path} is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit for a data file "
                        f"(it is read into memory whole); split it or sample it.")
    if fmt is None:
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
                              f"pass --format with one of {', '.join(FORMATS[:-1])}.")
    if encoding is not None and not is_known_encoding(encoding):
        raise ConfigError(f"--encoding {encoding!r} is not a known text encoding "
                          f"(e.g. utf-8, latin-1, cp1252).")

    if fmt == "parquet":
        rows = _parse_parquet(path)
    else:
        text = _read_text(path, encoding, fallback="latin-1" if fmt == "phrasebank" else None)
        if fmt == "csv":
            rows = _parse_delimited(text, path, ",", csv.QUOTE_MINIMAL)
        elif fmt == "tsv":
            # GLUE-style TSV: no quoting at all, so a stray '"' in a sentence is just a character.
            rows = _parse_delimited(text, path, "\t", csv.QUOTE_NONE)
        elif fmt == "jsonl":
            rows = _parse_jsonl(text, path)
        else:
            rows = _parse_phrasebank(text, path)
    if not rows:
        raise DataError(f"{path} has no rows; expected at least one example.")
    _check_value_sizes(rows, path)
    return rows


def _check_value_sizes(rows: list[Row], path: Path) -> None:
    for i, row in enumerate(rows):
        for column, value in row.items():
            if len(value) > MAX_VALUE_CHARS:
                raise DataError(f"{path}, row {i + 1}, column {column!r}: the value is {len(value):,} characters "
                                f"long, over the {MAX_VALUE_CHARS:,}-character limit; is a quote or a line break "
                                f"missing?")


def format_name(format: str) -> str | None:
    """The canonical name of a data format as users spell it (``CSV``, ``.ndjson``, ``txt``), or None."""
    name = str(format).strip().lower().lstrip(".")
    name = _FORMAT_ALIASES.get(name, name)
    return name if name in FORMATS else None


def is_known_encoding(encoding: str) -> bool:
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        return False
    return True


def _normalise_format(format: str | None) -> str | None:
    if format is None:
        return None
    name = format_name(format)
    if name is None:
        raise ConfigError(f"--format {format!r} is not supported; expected one of {', '.join(FORMATS)}.")
    return name


def _looks_like_hub_name(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec)) and not Path(spec).suffix


def _read_text(path: Path, encoding: str | None, *, fallback: str | None) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}).") from None
    if not data.strip():
        raise DataError(f"{path} is empty; expected at least one row of data.")
    try:
        return data.decode(encoding or "utf-8-sig")  # utf-8-sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as e:
        if encoding is None and fallback is not None:
            return data.decode(fallback)
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) is not valid "
                        f"{encoding or 'UTF-8'}; pass --encoding with the file's encoding "
                        f"(e.g. --encoding latin-1).") from None


def _parse_delimited(text: str, path: Path, delimiter: str, quoting: int) -> list[Row]:
    kind = "CSV" if delimiter == "," else "TSV"
    # strict: an unclosed quote must be an error, not a field that silently swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=quoting != csv.QUOTE_NONE)
    header: list[str] | None = None
    rows: list[Row] = []
    try:
        for record in reader:
            if not record:  # a blank line, e.g. a trailing one
                continue
            if header is None:
                header = _check_header(record, path)
                continue
            if len(record) != len(header):
                hint = " (quote fields that contain a comma)" if kind == "CSV" else ""
                raise DataError(f"{path}, row {len(rows) + 1} (line {reader.line_num}): has {len(record)} fields "
                                f"but the header has {len(header)} ({', '.join(map(repr, header))}){hint}.")
            rows.append(dict(zip(header, record)))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed {kind} ({e}); check the quoting.") from None
    if header is not None and not rows:
        raise DataError(f"{path} has a header but no data rows.")
    return rows


def _check_header(names: Sequence[str], path: Path) -> list[str]:
    seen: set[str] = set()
    for i, name in enumerate(names, 1):
        if not name.strip():
            raise DataError(f"{path}: column {i} of the header has no name; every column needs one.")
        if name in seen:
            raise DataError(f"{path}: the header names column {name!r} twice; column names must be unique.")
        seen.add(name)
    return list(names)


def _parse_jsonl(text: str, path: Path) -> list[Row]:
    rows: list[Row] = []
    keys: list[str] | None = None
    first_line = 0
    # split on "\n" only: str.splitlines would also break inside values at U+2028, U+0085 and friends.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: is not valid JSON ({e.msg} at column {e.colno}); "
                            f"each line must hold one JSON object.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: holds a JSON {type(obj).__name__}, but each line must be "
                            f'one JSON object such as {{"text": "...", "label": "..."}}.')
        if keys is None:
            keys, first_line = list(obj), lineno
        elif set(obj) != set(keys):
            missing = [k for k in keys if k not in obj]
            extra = [k for k in obj if k not in keys]
            what = "; ".join(part for part in (f"lacks {missing}" if missing else "",
                                               f"has extra {extra}" if extra else "") if part)
            raise DataError(f"{path}, line {lineno}: {what} compared with line {first_line}; every line needs "
                            f"the same keys.")
        rows.append({k: _to_str(obj[k]) for k in keys})
    return rows


def _parse_phrasebank(text: str, path: Path) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")  # the original release has CRLF line endings
        if not line.strip():
            continue
        sentence, at, label = line.rpartition("@")  # the label never contains '@'; a sentence might
        label = label.strip()
        if not at or not sentence.strip() or not label:
            raise DataError(f"{path}, line {lineno}: expected 'sentence@label' (the financial_phrasebank "
                            f"format) but got {line[:60]!r}; for another format pass --format.")
        rows.append({"sentence": sentence, "label": label})
    return rows


def _parse_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with pandas/datasets
        raise ConfigError(f"{path}: reading parquet needs the pyarrow package (pip install pyarrow).") from None
    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: is not a readable parquet file ({e}).") from None
    header = _check_header(table.column_names, path)
    return [{name: _to_str(record[name]) for name in header} for record in table.to_pylist()]


def _load_hub(spec: str, split: str) -> list[Row]:
    name, _, config = spec.partition(":")
    if not name:
        raise ConfigError(f"{HUB_PREFIX}{spec}: expected a hub data set written hf:owner/name[:config].")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{HUB_PREFIX}{spec}: reading hub data sets needs the datasets package "
                          f"(pip install 'softprompt[hub]').") from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types (network, config, split)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{HUB_PREFIX}{spec}: cannot load split {split!r} from the hub ({reason}).") from None
    rows = [{str(k): _to_str(v) for k, v in record.items()} for record in dataset]
    if not rows:
        raise DataError(f"{HUB_PREFIX}{spec}: split {split!r} has no rows.")
    return rows


def _to_str(value: Any) -> str:
    """One string per value, the same whichever file format the value came from."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if hasattr(value, "tolist"):  # numpy arrays from hub list features
        return json.dumps(value.tolist(), ensure_ascii=False, default=str)
    return str(value)


# ------------------------------------------------------------------------------------------- columns


def column_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns of the first row (every loader gives all rows the same columns)."""
    return list(rows[0]) if rows else []


def _suggest(name: str, available: Iterable[str]) -> str:
    available = list(available)
    folded = {a.strip().lower(): a for a in available}
    close = [folded[name.strip().lower()]] if name.strip().lower() in folded else \
        difflib.get_close_matches(name, available, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require_columns(rows: Sequence[Mapping[str, Any]], columns: Iterable[str], *, source: str) -> None:
    """Raise `DataError` unless every row has every one of ``columns``."""
    columns = list(columns)
    if not rows:
        raise DataError(f"{source} has no rows; expected at least one example.")
    available = column_names(rows)
    for column in columns:
        if column not in rows[0]:
            raise DataError(f"{source} has no column {column!r}{_suggest(column, available)}; "
                            f"available columns: {', '.join(map(repr, available))}.")
    for i, row in enumerate(rows):
        for column in columns:
            if column not in row:
                raise DataError(f"{source}, row {i + 1}: lacks column {column!r}, which row 1 has.")


# ------------------------------------------------------------------------------------------ template


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
        out = []
        for value, is_field in self._parts:
            if not is_field:
                out.append(value)
                continue
            try:
                cell = row[value]
            except KeyError:
                raise DataError(f"template {self.text!r} uses column {value!r}, which the row lacks; "
                                f"its columns are {', '.join(map(repr, row))}.") from None
            out.append(cell if isinstance(cell, str) else _to_str(cell))
        return "".join(out)

    def validate(self, columns: Iterable[str], *, source: str) -> None:
        """Raise `ConfigError` if the template uses a column that ``source`` lacks."""
        available = list(columns)
        present = set(available)
        missing = [f for f in self.fields if f not in present]
        if missing:
            hints = "".join(_suggest(m, available) for m in missing[:1])
            raise ConfigError(f"template {self.text!r} uses column{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))}{hints} that {source} lacks; available columns: "
                              f"{', '.join(map(repr, available))}.")

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
            name = text[i + 1:end] if end != -1 else ""
            if end == -1 or "{" in name:
                raise ConfigError(f"template {text!r}: the '{{' at character {i + 1} is never closed; "
                                  f"write '{{{{' for a literal brace.")
            if not name:
                raise ConfigError(f"template {text!r}: the '{{}}' at character {i + 1} names no column; "
                                  f"write {{column}}, or '{{{{}}}}' for literal braces.")
            if literal:
                parts.append(("".join(literal), False))
                literal = []
            parts.append((name, True))
            i = end + 1
        elif ch == "}":
            raise ConfigError(f"template {text!r}: the '}}' at character {i + 1} closes nothing; "
                              f"write '}}}}' for a literal brace.")
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append(("".join(literal), False))
    return tuple(parts)


# ---------------------------------------------------------------------------------------- verbalizer


def _label_order(label: str) -> tuple:
    # numeric labels sort as numbers ("2" before "10"); all others alphabetically after them. "nan" and
    # "inf" count as text: a NaN key would make the order depend on the order the labels came in.
    try:
        value = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, value, label) if math.isfinite(value) else (1, 0.0, label)


class Verbalizer:
    """Maps raw label values (``"1"``) to the label texts the model scores (``"complaint"``)."""

    def __init__(self, mapping: Mapping[Any, str]):
        if not mapping:
            raise ConfigError("verbalizer: needs at least one label, "
                              "e.g. {'1': 'complaint', '2': 'no complaint'}.")
        self._to_text: dict[str, str] = {}
        # keys from YAML/JSON configs may be ints; labels in rows are always strings
        for raw, text in mapping.items():
            key = _to_str(raw)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"verbalizer: label {key!r} maps to {text!r}; "
                                  f"each label needs a non-empty text.")
            if key in self._to_text:
                raise ConfigError(f"verbalizer: label {key!r} is given twice.")
            self._to_text[key] = text
        self._to_raw: dict[str, str] = {}
        for raw, text in self._to_text.items():
            if text in self._to_raw:
                raise ConfigError(f"verbalizer: labels {self._to_raw[text]!r} and {raw!r} both map to {text!r}; "
                                  f"label texts must be distinct.")
            self._to_raw[text] = raw

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> Verbalizer:
        """Identity verbalizer over the distinct labels, sorted (numerically when they are numbers)."""
        return cls({label: label for label in sorted({_to_str(x) for x in labels}, key=_label_order)})

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], column: str, *, source: str) -> Verbalizer:
        """Identity verbalizer over the labels found in ``column``; an empty label is an error."""
        require_columns(rows, [column], source=source)
        for i, row in enumerate(rows):
            if not _to_str(row[column]).strip():
                raise DataError(f"{source}, row {i + 1}, column {column!r}: the label is empty; every row needs "
                                f"one (leave out the label column for unlabelled data).")
        return cls.from_labels(row[column] for row in rows)

    @property
    def texts(self) -> list[str]:
        return list(self._to_text.values())

    @property
    def raws(self) -> list[str]:
        return list(self._to_text)

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self._to_text)

    def to_text(self, raw: Any, *, row_index: int | None = None, source: str | None = None,
                column: str | None = None) -> str:
        """The label text for ``raw``; ``row_index`` (0-based) and the rest only serve the error message."""
        key = _to_str(raw)
        if key in self._to_text:
            return self._to_text[key]
        where = ", ".join(part for part in (source, None if row_index is None else f"row {row_index + 1}",
                                            None if column is None else f"column {column!r}") if part)
        allowed = ", ".join(repr(r) if r == t else f"{r!r} ({t})" for r, t in self._to_text.items())
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}label {key!r} is not one of the expected labels: {allowed}.")

    def to_raw(self, text: str) -> str:
        try:
            return self._to_raw[text]
        except KeyError:
            raise ConfigError(f"verbalizer: {text!r} is not a label text; expected one of "
                              f"{', '.join(map(repr, self._to_raw))}.") from None

    def __len__(self) -> int:
        return len(self._to_text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verbalizer) and list(other._to_text.items()) == list(self._to_text.items())

    def __repr__(self) -> str:
        return f"Verbalizer({self._to_text!r})"


# ------------------------------------------------------------------------------------------ splitting


def _shuffled_groups(rows: Sequence[Mapping[str, Any]], seed: int, stratify_column: str | None,
                     source: str) -> list[list[int]]:
    """Row indices, shuffled with ``seed``: one group per label (sorted) or a single group."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if stratify_column is None:
        groups = [list(range(len(rows)))]
    else:
        require_columns(rows, [stratify_column], source=source)
        by_label: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_label.setdefault(_to_str(row[stratify_column]), []).append(i)
        groups = [by_label[label] for label in sorted(by_label, key=_label_order)]
    rng = random.Random(seed)
    for group in groups:
        rng.shuffle(group)
    return groups


def _largest_remainder(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes``, exactly, in integer arithmetic."""
    n = sum(sizes)
    quotas = [total * s // n for s in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda g: (-(total * sizes[g] % n), g))
    for g in by_remainder[:total - sum(quotas)]:
        quotas[g] += 1
    return quotas


def train_val_split(rows: Sequence[Row], val_fraction: float, seed: int, stratify_column: str | None = None,
                    *, source: str = "the data") -> tuple[list[Row], list[Row]]:
    """Split rows into disjoint (train, val), each in the original row order; same seed, same split.

    With ``stratify_column`` every label keeps its share in both parts (to within one row).
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}.")
    n = len(rows)
    if n < 2:
        raise DataError(f"{source} has {n} row{'s' if n != 1 else ''}; a train/validation split needs at least 2.")
    n_val = min(max(math.floor(n * val_fraction + 0.5), 1), n - 1)
    groups = _shuffled_groups(rows, seed, stratify_column, source)
    quotas = _largest_remainder([len(g) for g in groups], n_val)
    val_idx = {i for group, quota in zip(groups, quotas) for i in group[:quota]}
    return ([r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx])


def kfold(rows: Sequence[Row], k: int, seed: int, stratify_column: str | None = None,
          *, source: str = "the data") -> list[tuple[list[Row], list[Row]]]:
    """``k`` (train, val) pairs; every row is in exactly one val fold, fold sizes differ by at most one."""
    n = len(rows)
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n:
        raise ConfigError(f"k must be an integer between 2 and the number of rows of {source} ({n}), got {k!r}.")
    # Deal the shuffled rows (label by label when stratified) round-robin, so every fold gets its share.
    order = [i for group in _shuffled_groups(rows, seed, stratify_column, source) for i in group]
    fold_of = [0] * n
    for position, i in enumerate(order):
        fold_of[i] = position % k
    return [([r for r, fold in zip(rows, fold_of) if fold != f],
             [r for r, fold in zip(rows, fold_of) if fold == f]) for f in range(k)]


# ------------------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class Example:
    """One rendered prompt; ``target`` is the label text, or None for unlabelled data."""

    text: str
    target: str | None
    row: dict


def build_examples(rows: Sequence[Row], template: Template | str, label_column: str | None = None,
                   verbalizer: Verbalizer | None = None, *, source: str) -> list[Example]:
    """Render every row through ``template``; map ``label_column`` through ``verbalizer`` when given.

    Without a verbalizer the labels found in the data are used as they are.
    """
    template = template if isinstance(template, Template) else Template(template)
    if not rows:
        raise DataError(f"{source} has no rows; expected at least one example.")
    if not template.fields:
        raise ConfigError(f"template {template.text!r} uses no column, so every example would be the same text; "
                          f"add a field such as {{text}}.")
    template.validate(column_names(rows), source=source)
    require_columns(rows, template.fields, source=source)
    if label_column is None:
        if verbalizer is not None:
            raise ConfigError("a verbalizer was given without a label column; pass --label-column too.")
        return [Example(template.render(row), None, row) for row in rows]
    if verbalizer is None:
        verbalizer = Verbalizer.from_rows(rows, label_column, source=source)
    require_columns(rows, [label_column], source=source)
    return [Example(template.render(row),
                    verbalizer.to_text(row[label_column], row_index=i, source=source, column=label_column), row)
            for i, row in enumerate(rows)]


__all__ = [
    "FORMATS", "Row", "load_rows", "column_names", "require_columns", "escape_template_text", "Template",
    "Verbalizer", "train_val_split", "kfold", "Example", "build_examples",
]
