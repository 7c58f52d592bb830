"""What ``softprompt sweep`` reports: the estimate and its interval, the leaderboard (CSV, markdown, PNG)."""

from __future__ import annotations

import csv
import io
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softprompt.fileio import atomic_write_text
from softprompt.training.metrics import classification_report, plot_leaderboard
from softprompt.training.sweep_space import Sweep, describe

LEADERBOARD = "leaderboard"  # .csv, .md and .png in the output directory


def argmax(probs: Sequence[Sequence[float]], labels: Sequence[str]) -> list[str]:
    """The most probable label of each row (the first on a tie)."""
    return [labels[max(range(len(p)), key=p.__getitem__)] for p in probs]


def bootstrap_interval(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str], metric: str, n: int, seed: int
) -> list[float]:
    """The 2.5th and 97.5th percentiles of ``metric`` over ``n`` resamples (with replacement) of the rows."""
    if n < 1:
        return []
    rng = random.Random(seed)
    values = []
    for _ in range(n):
        pick = [rng.randrange(len(truth)) for _ in truth]
        values.append(classification_report([truth[i] for i in pick], [predicted[i] for i in pick], labels)[metric])
    values.sort()
    return [values[int(0.025 * (n - 1))], values[round(0.975 * (n - 1))]]


def _short(report: dict) -> dict:
    return {"n": report["n"], "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def _test_estimate(spec: Sweep, test: dict, labels: list[str]) -> dict:
    """The final choice's score on the test rows (scored once) and its bootstrap interval."""
    predicted = argmax(test["probs"], labels)
    metric, opts = spec.options.metric, spec.options
    return {
        "test": _short(classification_report(test["truth"], predicted, labels)),
        "test_interval": bootstrap_interval(test["truth"], predicted, labels, metric, opts.bootstrap, opts.seed),
    }


def nested_report(
    spec: Sweep,
    folds: list[dict],
    final: dict,
    test: dict | None,
    labels: list[str],
    out: Path,
    compared: dict | None = None,
) -> dict:
    """Per outer fold: the choice (from inner scores only) and its held-out score; the estimate over folds;
    with ``test`` rows, the final choice's score on them.
    ``compared``: ``sweep.compare``'s values, each with its folds (its own choices), estimated the same way."""
    metric, opts = spec.options.metric, spec.options
    per_fold, estimate = _estimate(spec, folds, labels)
    if test is not None:
        estimate.update(_test_estimate(spec, test, labels))
    board = []
    for name, score in final["scores"].items():
        inner = [f["inner_scores"][name] for f in per_fold if name in f["inner_scores"]]
        board.append(
            {
                "candidate": name,
                "settings": describe(spec.settings[int(name[1:])])
                if name.startswith("s")
                else "ensemble (label probabilities averaged)",
                f"cv_{metric}_all_rows": score,
                f"inner_{metric}_mean_over_outer": statistics.fmean(inner) if inner else None,
                "chosen_by_outer_folds": sum(f["chosen"] == name for f in per_fold),
            }
        )
    board.sort(key=lambda r: -r[f"cv_{metric}_all_rows"])
    report = {
        "protocol": f"nested cross-validation: {opts.outer_folds} outer x {opts.inner_folds} inner folds"
        + ("; test scored once, for the final choice" if test is not None else ""),
        "n_rows": estimate["pooled"]["n"],
        "settings": spec.settings,
        "estimate": estimate,
        "outer_folds": per_fold,
        "leaderboard": board,
        "final": final,
        "output": str(out),
    }
    if compared:
        report["compared"] = {
            "key": opts.compare,
            "values": [
                {"value": value, "estimate": est, "outer_folds": fs}
                for value, (fs, est) in ((v, _estimate(spec, f, labels)) for v, f in compared.items())
            ],
        }
    return report


def _estimate(spec: Sweep, folds: list[dict], labels: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """Each outer fold's choice and held-out score; the estimate: mean ± std over folds, pooled with interval."""
    metric, opts = spec.options.metric, spec.options
    per_fold = [
        {
            "fold": fold["fold"],
            "chosen": fold["chosen"],
            "members": fold["members"],
            "inner_scores": fold["scores"],
            "test": _short(classification_report(fold["truth"], argmax(fold["probs"], labels), labels)),
        }
        for fold in folds
    ]
    truth = [t for f in folds for t in f["truth"]]
    predicted = [p for f in folds for p in argmax(f["probs"], labels)]
    estimate: dict[str, Any] = {"metric": metric, "pooled": _short(classification_report(truth, predicted, labels))}
    for key in ("accuracy", "macro_f1"):
        values = [f["test"][key] for f in per_fold]
        estimate[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    estimate["pooled_interval"] = bootstrap_interval(truth, predicted, labels, metric, opts.bootstrap, opts.seed)
    return per_fold, estimate


def validation_report(spec: Sweep, choice: dict, final: dict, test: dict | None, labels: list[str], out: Path) -> dict:
    """Selection on validation rows: each candidate's validation score; the choice's test score, scored once."""
    metric = spec.options.metric
    board = [
        {
            "candidate": name,
            "settings": describe(spec.settings[int(name[1:])])
            if name.startswith("s")
            else "ensemble (label probabilities averaged)",
            f"validation_{metric}": score,
        }
        for name, score in sorted(choice["scores"].items(), key=lambda kv: -kv[1])
    ]
    estimate = None if test is None else {"metric": metric, **_test_estimate(spec, test, labels)}
    return {
        "protocol": "selection on validation rows; test scored once, for the choice",
        "settings": spec.settings,
        "estimate": estimate,
        "leaderboard": board,
        "final": final,
        "output": str(out),
    }


def write_outputs(report: dict, out: Path) -> None:
    """``leaderboard.csv``, ``leaderboard.md`` and ``leaderboard.png`` beside the report."""
    board = report["leaderboard"]
    columns = list(board[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(board)
    atomic_write_text(out / f"{LEADERBOARD}.csv", buffer.getvalue())
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(_cell(row[c]) for c in columns)} |" for row in board]
    atomic_write_text(out / f"{LEADERBOARD}.md", format_report(report) + "\n" + "\n".join(lines) + "\n")
    score_column = columns[2]
    estimate = report.get("estimate") or {}
    line, interval = None, None
    if "pooled" in estimate:
        line, interval = estimate["pooled"][estimate["metric"]], estimate.get("pooled_interval")
    elif estimate.get("test"):
        line, interval = estimate["test"][estimate["metric"]], estimate.get("test_interval")
    plot_leaderboard(
        [r["candidate"] for r in board],
        [r[score_column] for r in board],
        out / f"{LEADERBOARD}.png",
        xlabel=score_column.replace("_", " "),
        estimate=line,
        interval=interval or None,
        chosen=report["final"]["chosen"],
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", "\\n")


def format_report(report: dict) -> str:
    """A few lines: the protocol, the estimate with its interval, the choice."""
    lines = [report["protocol"]]
    estimate = report.get("estimate")
    if estimate and "pooled" in estimate:
        metric = estimate["metric"]
        pooled, lo_hi = estimate["pooled"], estimate.get("pooled_interval") or [float("nan")] * 2
        lines.append(
            f"outer estimate of the whole procedure: {metric} {estimate[metric]['mean']:.4f} ± "
            f"{estimate[metric]['std']:.4f} (mean ± std over outer folds); pooled over {pooled['n']} rows "
            f"{pooled[metric]:.4f} (95% bootstrap interval {lo_hi[0]:.4f}-{lo_hi[1]:.4f}), accuracy {pooled['accuracy']:.4f}"
        )
        for fold in report["outer_folds"]:
            lines.append(
                f"  outer fold {fold['fold']}: chose {fold['chosen']}, held-out {metric} {fold['test'][metric]:.4f}"
            )
        for entry in report.get("compared", {}).get("values", []):
            est = entry["estimate"]
            lo, hi = est.get("pooled_interval") or [float("nan")] * 2
            lines.append(
                f"{report['compared']['key']}={entry['value']}: {metric} {est[metric]['mean']:.4f} ± "
                f"{est[metric]['std']:.4f} over outer folds; pooled {est['pooled'][metric]:.4f} (95% interval "
                f"{lo:.4f}-{hi:.4f}), its choice made among its own settings on the inner folds"
            )
    if estimate and "test" in estimate:
        metric, test = estimate["metric"], estimate["test"]
        lo_hi = estimate.get("test_interval") or [float("nan")] * 2
        lines.append(
            f"test ({test['n']} rows, scored once, for the final choice): {metric} {test[metric]:.4f} "
            f"(95% bootstrap interval {lo_hi[0]:.4f}-{lo_hi[1]:.4f}), accuracy {test['accuracy']:.4f}"
        )
    final = report["final"]
    lines.append(f"chosen: {final['chosen']} ({'; '.join(final['settings'])})")
    lines.append(f"recipe: {final['recipe']}; adapter(s): {', '.join(final['adapters'].values())}")
    return "\n".join(lines) + "\n"


__all__ = [
    "LEADERBOARD",
    "argmax",
    "bootstrap_interval",
    "format_report",
    "nested_report",
    "validation_report",
    "write_outputs",
]
