"""Seeded samples, train/validation splits and k folds, optionally stratified by a label column."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from softprompt.data.rows import Row, cell_text, require_columns
from softprompt.data.verbalizers import label_order
from softprompt.errors import ConfigError, DataError


def _shuffled_groups(
    rows: Sequence[Mapping[str, Any]], seed: int, stratify_column: str | None, source: str
) -> list[list[int]]:
    """Row indices, shuffled with ``seed``: one group per label (sorted) or a single group."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if stratify_column is None:
        groups = [list(range(len(rows)))]
    else:
        require_columns(rows, [stratify_column], source=source)
        by_label: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_label.setdefault(cell_text(row[stratify_column]), []).append(i)
        groups = [by_label[label] for label in sorted(by_label, key=label_order)]
    rng = random.Random(seed)
    for group in groups:
        rng.shuffle(group)
    return groups


def _largest_remainder(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes``, exactly, in integer arithmetic."""
    n = sum(sizes)
    quotas = [total * s // n for s in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda g: (-(total * sizes[g] % n), g))
    for g in by_remainder[: total - sum(quotas)]:
        quotas[g] += 1
    return quotas


def sample_rows(
    rows: Sequence[Row], n: int, seed: int, stratify_column: str | None = None, *, source: str = "the data"
) -> list[Row]:
    """``n`` rows drawn with ``seed`` (``--max-rows``), in their original order; all rows when ``n`` is not smaller.

    With ``stratify_column`` every label keeps its share of the sample (to within one row), so a file
    sorted by label still gives a sample of every label rather than its first lines.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--max-rows must be a whole number of at least 1, got {n!r}.")
    if n >= len(rows):
        return list(rows)
    groups = _shuffled_groups(rows, seed, stratify_column, source)
    quotas = _largest_remainder([len(g) for g in groups], n)
    chosen = {i for group, quota in zip(groups, quotas) for i in group[:quota]}
    return [r for i, r in enumerate(rows) if i in chosen]


def train_val_split(
    rows: Sequence[Row], val_fraction: float, seed: int, stratify_column: str | None = None, *, source: str = "the data"
) -> tuple[list[Row], list[Row]]:
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


def kfold(
    rows: Sequence[Row], k: int, seed: int, stratify_column: str | None = None, *, source: str = "the data"
) -> list[tuple[list[Row], list[Row]]]:
    """``k`` (train, val) pairs; every row is in exactly one val fold, fold sizes differ by at most one."""
    n = len(rows)
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n:
        raise ConfigError(f"k must be an integer between 2 and the number of rows of {source} ({n}), got {k!r}.")
    # Deal the shuffled rows (label by label when stratified) round-robin, so every fold gets its share.
    order = [i for group in _shuffled_groups(rows, seed, stratify_column, source) for i in group]
    fold_of = [0] * n
    for position, i in enumerate(order):
        fold_of[i] = position % k
    return [
        ([r for r, fold in zip(rows, fold_of) if fold != f], [r for r, fold in zip(rows, fold_of) if fold == f])
        for f in range(k)
    ]
