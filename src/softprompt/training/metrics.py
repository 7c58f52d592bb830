"""Evaluation metrics, their plain-text report and PNG plots.

The classification metrics are computed by hand (a few lines) rather than pulled from scikit-learn:
per-class precision/recall/F1, accuracy, macro F1 and the confusion matrix. Conventions follow
scikit-learn: a 0/0 ratio is 0.0, and macro averages run over every label in ``labels``, including
labels that never occur. Plots use matplotlib's Agg canvas directly (no pyplot, so no global backend
state) and are written atomically: a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

from softprompt.errors import ConfigError, DataError
from softprompt.fileio import atomic_write_bytes


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    ``confusion_matrix[i][j]`` counts examples of true label ``labels[i]`` predicted as ``labels[j]``.
    A prediction outside ``labels`` (e.g. free generated text) counts as wrong and is tallied in
    ``invalid_predictions``; it appears in no column, so such a row sums to less than its support.
    """
    labels = list(labels)
    if not labels:
        raise ConfigError("classification_report: labels is empty; pass the label texts to score against.")
    if len(set(labels)) != len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise ConfigError(f"classification_report: label {dup!r} is listed twice; labels must be distinct.")
    if len(y_true) != len(y_pred):
        raise DataError(
            f"classification_report: {len(y_true)} true labels but {len(y_pred)} predictions; "
            f"expected one prediction per example."
        )
    if not y_true:
        raise DataError("classification_report: no examples to score.")
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    support = [0] * k
    invalid = 0
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if t not in index:
            raise DataError(
                f"classification_report: example {i + 1} has true label {t!r}, which is not one of "
                f"{', '.join(map(repr, labels))}."
            )
        support[index[t]] += 1
        if p in index:
            matrix[index[t]][index[p]] += 1
        else:
            invalid += 1

    per_class: dict[str, dict[str, float | int]] = {}
    for c, label in enumerate(labels):
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in range(k))
        precision, recall = _ratio(tp, predicted), _ratio(tp, support[c])
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": support[c],
        }
    n = len(y_true)
    return {
        "n": n,
        "accuracy": sum(matrix[c][c] for c in range(k)) / n,
        "macro_precision": sum(m["precision"] for m in per_class.values()) / k,
        "macro_recall": sum(m["recall"] for m in per_class.values()) / k,
        "macro_f1": sum(m["f1"] for m in per_class.values()) / k,
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": matrix,
        "invalid_predictions": invalid,
    }


_CORNER = "true \\ predicted"


def format_report(report: dict) -> str:
    """The report as a plain-text table, then the confusion matrix (rows true, columns predicted)."""
    labels = list(report["labels"])
    width = max([len("macro avg"), len(_CORNER)] + [len(label) for label in labels])
    lines = [f"n = {report['n']}   accuracy = {report['accuracy']:.4f}   macro F1 = {report['macro_f1']:.4f}", ""]
    lines.append(f"{'label':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}")
    for label in labels:
        m = report["per_class"][label]
        lines.append(
            f"{label:<{width}}  {m['precision']:>9.4f}  {m['recall']:>9.4f}  {m['f1']:>9.4f}  {m['support']:>7d}"
        )
    lines.append(
        f"{'macro avg':<{width}}  {report['macro_precision']:>9.4f}  {report['macro_recall']:>9.4f}  "
        f"{report['macro_f1']:>9.4f}  {report['n']:>7d}"
    )
    if report.get("invalid_predictions"):
        lines.append(f"predictions outside the label set: {report['invalid_predictions']}")
    cell = max([len(label) for label in labels] + [len(str(v)) for row in report["confusion_matrix"] for v in row])
    lines += [
        "",
        "confusion matrix (rows = true, columns = predicted)",
        f"{_CORNER:<{width}}  " + "  ".join(f"{label:>{cell}}" for label in labels),
    ]
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines) + "\n"


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); ``inf`` when that overflows."""
    if n_tokens <= 0:
        raise DataError(f"perplexity needs at least one scored token, got n_tokens={n_tokens}.")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


# ------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
    # matplotlib is imported when a plot is drawn: it costs over half a second, and most commands draw none.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())  # temp file in the same directory, then os.replace


def plot_confusion_matrix(report: dict, path: str | os.PathLike) -> None:
    """A PNG heat map of the report's confusion matrix, each cell annotated with its count."""
    from matplotlib.ticker import MaxNLocator  # when drawn, as in _new_figure

    labels, matrix = list(report["labels"]), report["confusion_matrix"]
    side = max(3.5, 1.0 + 0.9 * len(labels))
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.locator = MaxNLocator(integer=True)  # counts: no 0.2, 0.4, ... ticks
    colorbar.update_ticks()
    peak = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if peak and value > peak / 2 else "black")
    rotate = max(map(len, labels)) > 6
    ax.set_xticks(range(len(labels)), labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f} (n={report['n']})")
    _save_png(fig, path)


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """A PNG of training loss (and validation loss, where recorded) against step; epochs are marked."""
    if not records:
        raise DataError("plot_loss_curve: no records to plot; expected dicts with 'step' and 'loss'.")
    for i, record in enumerate(records):
        if "step" not in record or not ({"loss", "val_loss"} & record.keys()):
            raise DataError(f"plot_loss_curve: record {i + 1} ({record!r}) needs a 'step' and a 'loss' or 'val_loss'.")
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation loss", marker="o", linewidth=1.2)
    # a dotted line where a new epoch starts
    previous = records[0].get("epoch")
    for record in records[1:]:
        epoch = record.get("epoch")
        if epoch is not None and previous is not None and epoch != previous:
            ax.axvline(record["step"], color="grey", linestyle=":", linewidth=0.8)
        previous = epoch if epoch is not None else previous
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_png(fig, path)


def plot_leaderboard(
    names: Sequence[str],
    scores: Sequence[float],
    path: str | os.PathLike,
    *,
    xlabel: str,
    estimate: float | None = None,
    interval: Sequence[float] | None = None,
    chosen: str | None = None,
) -> None:
    """A PNG of candidates' scores as horizontal bars (``chosen`` highlighted), best on top, with an
    ``estimate`` line and its ``interval`` shaded (a sweep's held-out figure)."""
    fig = _new_figure(7.0, 1.0 + 0.35 * len(names))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), scores, color=["tab:orange" if n == chosen else "tab:blue" for n in names])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    if interval:
        ax.axvspan(interval[0], interval[1], color="grey", alpha=0.2, label="95% interval")
    if estimate is not None:
        ax.axvline(estimate, color="black", linestyle="--", label=f"held-out estimate {estimate:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, axis="x")
    _save_png(fig, path)


__all__ = [
    "classification_report",
    "format_report",
    "perplexity",
    "plot_confusion_matrix",
    "plot_leaderboard",
    "plot_loss_curve",
]
