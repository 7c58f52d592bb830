"""Rows of strings from data files and hub data sets, and the column checks every consumer runs.

Every loader returns ``list[dict[str, str]]``: one dict per example, every row with the same columns
(in file order), every value a string. Non-string values (JSONL numbers, parquet ints, hub class ids)
become their JSON text (`cell_text`), and null becomes ``""``, so ``1`` in a JSONL file and ``1`` in a
CSV file are the same label ``"1"``.

Rows in messages are numbered from 1 and do not count a header line ("row 1" is the first example);
where the parser knows it, the physical line of the file is named too.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from softprompt.errors import ConfigError, DataError
from softprompt.options import did_you_mean

Row = dict[str, str]

FORMATS = ("csv", "tsv", "jsonl", "parquet", "phrasebank", "hf")
_FORMAT_ALIASES = {"ndjson": "jsonl", "pq": "parquet", "hub": "hf", "txt": "phrasebank"}
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "phrasebank",
}
HUB_PREFIX = "hf:"
#: Local data files are read into memory whole: a bigger one is refused up front, not by running out of memory.
MAX_FILE_BYTES = 2 * 1024**3
#: The longest value (characters) a cell may hold: a longer one is almost surely a broken file (an unclosed
#: quote, a missing line break, binary data); examples are cut to --max-length tokens anyway.
MAX_VALUE_CHARS = 1_000_000

# A tweet or a document can exceed the csv module's default 128 KiB field limit; raise it once.
csv.field_size_limit(2**31 - 1)


# --------------------------------------------------------------------------------------------- loading


def load_rows(
    path_or_name: str | PathLike, *, format: str | None = None, split: str = "train", encoding: str | None = None
) -> list[Row]:
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
        return _load_hub(spec[len(HUB_PREFIX) :] if spec.startswith(HUB_PREFIX) else spec, split)

    path = Path(spec)
    if not path.exists():
        hint = f" (for a Hugging Face data set write {HUB_PREFIX}{spec})" if _looks_like_hub_name(spec) else ""
        raise DataError(
            f"{path}: no such file{hint}; expected a CSV, TSV, JSONL, parquet or "
            f"phrasebank .txt file, or a hub data set written hf:owner/name[:config]."
        )
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass the data file inside it.")
    if not path.is_file():  # a device, pipe or socket (e.g. a symlink to /dev/zero) would never end
        raise DataError(f"{path} is not a regular file; expected a data file.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(
            f"{path} is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit for a data file "
            f"(it is read into memory whole); split it or sample it."
        )
    if fmt is None:
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
                f"pass --format with one of {', '.join(FORMATS[:-1])}."
            )
    if encoding is not None and not is_known_encoding(encoding):
        raise ConfigError(f"--encoding {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, cp1252).")

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
                raise DataError(
                    f"{path}, row {i + 1}, column {column!r}: the value is {len(value):,} characters "
                    f"long, over the {MAX_VALUE_CHARS:,}-character limit; is a quote or a line break "
                    f"missing?"
                )


def format_name(format: str) -> str | None:
    """The canonical name of a data format as users spell it (``CSV``, ``.ndjson``, ``txt``), or None."""
    name = str(format).strip().lower().lstrip(".")
    name = _FORMAT_ALIASES.get(name, name)
    return name if name in FORMATS else None


def is_known_encoding(encoding: str) -> bool:
    """Whether Python has a codec named ``encoding`` (any spelling `codecs.lookup` accepts)."""
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
        raise DataError(
            f"{path}: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) is not valid "
            f"{encoding or 'UTF-8'}; pass --encoding with the file's encoding "
            f"(e.g. --encoding latin-1)."
        ) from None


# quoting: csv.QUOTE_MINIMAL (0) or csv.QUOTE_NONE (3)
def _parse_delimited(text: str, path: Path, delimiter: str, quoting: Literal[0, 3]) -> list[Row]:
    kind = "CSV" if delimiter == "," else "TSV"
    # strict: an unclosed quote must be an error, not a field that silently swallows the rest of the file.
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE
    )
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
                raise DataError(
                    f"{path}, row {len(rows) + 1} (line {reader.line_num}): has {len(record)} fields "
                    f"but the header has {len(header)} ({', '.join(map(repr, header))}){hint}."
                )
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
            raise DataError(
                f"{path}, line {lineno}: is not valid JSON ({e.msg} at column {e.colno}); "
                f"each line must hold one JSON object."
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}, line {lineno}: holds a JSON {type(obj).__name__}, but each line must be "
                f'one JSON object such as {{"text": "...", "label": "..."}}.'
            )
        if keys is None:
            keys, first_line = list(obj), lineno
        elif set(obj) != set(keys):
            missing = [k for k in keys if k not in obj]
            extra = [k for k in obj if k not in keys]
            what = "; ".join(
                part for part in (f"lacks {missing}" if missing else "", f"has extra {extra}" if extra else "") if part
            )
            raise DataError(
                f"{path}, line {lineno}: {what} compared with line {first_line}; every line needs the same keys."
            )
        rows.append({k: cell_text(obj[k]) for k in keys})
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
            raise DataError(
                f"{path}, line {lineno}: expected 'sentence@label' (the financial_phrasebank "
                f"format) but got {line[:60]!r}; for another format pass --format."
            )
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
    return [{name: cell_text(record[name]) for name in header} for record in table.to_pylist()]


def _load_hub(spec: str, split: str) -> list[Row]:
    name, _, config = spec.partition(":")
    if not name:
        raise ConfigError(f"{HUB_PREFIX}{spec}: expected a hub data set written hf:owner/name[:config].")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{HUB_PREFIX}{spec}: reading hub data sets needs the datasets package (pip install 'softprompt[hub]')."
        ) from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{HUB_PREFIX}{spec}: cannot load split {split!r} from the hub ({reason}).") from None
    rows = [{str(k): cell_text(v) for k, v in record.items()} for record in dataset]
    if not rows:
        raise DataError(f"{HUB_PREFIX}{spec}: split {split!r} has no rows.")
    return rows


def cell_text(value: Any) -> str:
    """One string per value, the same whichever file format the value came from.

    Strings stay as they are, null (and NaN) becomes ``""``, booleans ``"true"``/``"false"``, numbers,
    lists and dicts their JSON text; numpy scalars and arrays count as the Python values they hold.
    """
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):  # numpy scalars
        with contextlib.suppress(TypeError, ValueError):
            value = value.item()
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


def require_columns(rows: Sequence[Mapping[str, Any]], columns: Iterable[str], *, source: str) -> None:
    """Raise `DataError` unless every row has every one of ``columns``."""
    columns = list(columns)
    if not rows:
        raise DataError(f"{source} has no rows; expected at least one example.")
    available = column_names(rows)
    for column in columns:
        if column not in rows[0]:
            raise DataError(
                f"{source} has no column {column!r}{did_you_mean(column, available)}; "
                f"available columns: {', '.join(map(repr, available))}."
            )
    for i, row in enumerate(rows):
        for column in columns:
            if column not in row:
                raise DataError(f"{source}, row {i + 1}: lacks column {column!r}, which row 1 has.")
