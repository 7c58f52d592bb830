"""Verbalizers: the raw label values of the data (``"1"``) and the label texts the model scores (``"complaint"``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from softprompt.data.rows import cell_text, require_columns
from softprompt.errors import ConfigError, DataError


def label_order(label: str) -> tuple:
    """Sort key for label values: numeric labels as numbers (``"2"`` before ``"10"``), then the rest alphabetically.

    ``"nan"`` and ``"inf"`` count as text: a NaN key would make the order depend on the order the labels came in.
    """
    try:
        value = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, value, label) if math.isfinite(value) else (1, 0.0, label)


class Verbalizer:
    """Maps raw label values (``"1"``) to the label texts the model scores (``"complaint"``)."""

    def __init__(self, mapping: Mapping[Any, str]):
        if not mapping:
            raise ConfigError("verbalizer: needs at least one label, e.g. {'1': 'complaint', '2': 'no complaint'}.")
        self._to_text: dict[str, str] = {}
        # keys from YAML/JSON configs may be ints; labels in rows are always strings
        for raw, text in mapping.items():
            key = cell_text(raw)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"verbalizer: label {key!r} maps to {text!r}; each label needs a non-empty text.")
            if key in self._to_text:
                raise ConfigError(f"verbalizer: label {key!r} is given twice.")
            self._to_text[key] = text
        self._to_raw: dict[str, str] = {}
        for raw, text in self._to_text.items():
            if text in self._to_raw:
                raise ConfigError(
                    f"verbalizer: labels {self._to_raw[text]!r} and {raw!r} both map to {text!r}; "
                    f"label texts must be distinct."
                )
            self._to_raw[text] = raw

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> Verbalizer:
        """Identity verbalizer over the distinct labels, sorted (numerically when they are numbers)."""
        return cls({label: label for label in sorted({cell_text(x) for x in labels}, key=label_order)})

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], column: str, *, source: str) -> Verbalizer:
        """Identity verbalizer over the labels found in ``column``; an empty label is an error."""
        require_columns(rows, [column], source=source)
        for i, row in enumerate(rows):
            if not cell_text(row[column]).strip():
                raise DataError(
                    f"{source}, row {i + 1}, column {column!r}: the label is empty; every row needs "
                    f"one (leave out the label column for unlabelled data)."
                )
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

    def to_text(
        self, raw: Any, *, row_index: int | None = None, source: str | None = None, column: str | None = None
    ) -> str:
        """The label text for ``raw``; ``row_index`` (0-based) and the rest only serve the error message."""
        key = cell_text(raw)
        if key in self._to_text:
            return self._to_text[key]
        where = ", ".join(
            part
            for part in (
                source,
                None if row_index is None else f"row {row_index + 1}",
                None if column is None else f"column {column!r}",
            )
            if part
        )
        allowed = ", ".join(repr(r) if r == t else f"{r!r} ({t})" for r, t in self._to_text.items())
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}label {key!r} is not one of the expected labels: {allowed}.")

    def to_raw(self, text: str) -> str:
        try:
            return self._to_raw[text]
        except KeyError:
            raise ConfigError(
                f"verbalizer: {text!r} is not a label text; expected one of {', '.join(map(repr, self._to_raw))}."
            ) from None

    def __len__(self) -> int:
        return len(self._to_text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verbalizer) and list(other._to_text.items()) == list(self._to_text.items())

    def __repr__(self) -> str:
        return f"Verbalizer({self._to_text!r})"


def verbalizer_for(
    mapping: Mapping[Any, str] | None, rows: Sequence[Mapping[str, Any]], label_column: str, *, source: str
) -> Verbalizer:
    """The verbalizer a job uses: its configured ``mapping`` when given, else the labels ``rows`` hold.

    Without a mapping every label found in ``label_column`` stands for itself (`Verbalizer.from_rows`),
    so an empty label in ``source`` is an error.
    """
    return Verbalizer(mapping) if mapping else Verbalizer.from_rows(rows, label_column, source=source)
