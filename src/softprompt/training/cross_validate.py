"""k-fold cross-validation: one adapter per fold, all k trained in ONE job on one base model.

Fold i's adapter (``<name>-fold<i>``) trains on the other folds (mixed batches, as any multi-adapter
job) and is evaluated on fold i beside the zero-shot base model (`softprompt.training.evaluate`).
The report holds each fold's held-out accuracy and macro-F1 (loss and perplexity for language
modelling), their mean and standard deviation, and for classification one report pooled over every
held-out prediction.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

from softprompt.data import build_examples, kfold, verbalizer_for
from softprompt.data.heldout import fingerprint
from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_json
from softprompt.training import distributed
from softprompt.training.config import TrainConfig, flag
from softprompt.training.evaluate import EvalReport, evaluate
from softprompt.training.loop import load_model, prepare_job, train_jobs
from softprompt.training.metrics import classification_report
from softprompt.training.signals import stop_at_step_boundary_on_signals

CV_REPORT_FILE = "cv_report.json"


@dataclass
class CrossValidationReport:
    k: int
    folds: list[EvalReport]  # fold i's adapter on fold i's held-out rows (with the zero-shot base beside it)
    summary: dict[str, dict[str, float]]  # metric -> {"mean", "std"}; "base_" metrics for the zero-shot model
    output: Path
    # Classification only: one report over every held-out prediction of every fold ("adapter", "base").
    # With folds of a few rows, a per-fold macro-F1 jumps by whole classes and its mean is biased low;
    # the pooled figure is what a test set of the same rows would give (RAFT scores the whole test set).
    pooled: dict[str, dict] | None = None

    def to_dict(self) -> dict:
        return {"k": self.k, "summary": self.summary, "pooled": self.pooled, "folds": [f.to_dict() for f in self.folds]}

    def format(self) -> str:
        lines = [f"{self.k}-fold cross-validation (held-out fold of each adapter)"]
        for i, fold in enumerate(self.folds, 1):
            shown = ", ".join(f"{k} {fold.metrics[k]:.4f}" for k in _summary_keys(fold))
            lines.append(f"  fold {i}: n = {fold.n}, {shown}")
        for key, value in self.summary.items():
            lines.append(f"{key:<16} {value['mean']:.4f} ± {value['std']:.4f}")
        if self.pooled:
            ours, base = self.pooled["adapter"], self.pooled["base"]
            lines.append(
                f"pooled over all {ours['n']} held-out rows: accuracy {ours['accuracy']:.4f}, "
                f"macro_f1 {ours['macro_f1']:.4f} (zero-shot {base['accuracy']:.4f}, {base['macro_f1']:.4f})"
            )
        return "\n".join(lines) + "\n"


def _summary_keys(report: EvalReport) -> list[str]:
    return ["accuracy", "macro_f1"] if "accuracy" in report.metrics else ["loss", "perplexity"]


def cross_validate(
    config: TrainConfig, k: int | None = None, *, model=None, progress: bool = True, on_step=None
) -> CrossValidationReport:
    """Train one adapter per fold of ``config.data`` in one job and report held-out mean ± std.

    Fold i's adapter (``<name>-fold<i>``) trains on the other folds (its best epoch chosen on a
    ``val_fraction`` split of them) and is evaluated on fold i, beside the zero-shot base model. The
    standard deviation is the sample standard deviation over folds. ``output/cv_report.json`` holds
    the report.
    """
    config = dataclasses.replace(config, adapters=[dataclasses.replace(a) for a in config.adapters])
    if k is not None:
        config.kfold = k
    if config.kfold is None:
        raise ConfigError(f"{flag('kfold')}: give the number of folds (an integer of at least 2)")
    config.validate()
    spec = config.resolved_adapters()[0]
    rows = spec.load_train_rows()
    verbalizer = None
    if spec.label_column is not None:
        verbalizer = verbalizer_for(spec.verbalizer, rows, spec.label_column, source=spec.data)
    rendered = build_examples(rows, spec.template, spec.label_column, verbalizer, source=spec.data)
    jobs, tests = [], []
    for i, (train_rows, test_rows) in enumerate(
        kfold(rows, config.kfold, spec.seed, spec.label_column, source=spec.data), 1
    ):
        fold_spec = dataclasses.replace(spec, name=f"{spec.name}-fold{i}")
        jobs.append(
            prepare_job(
                fold_spec, rows=train_rows, verbalizer=verbalizer, source=f"{spec.data} (fold {i} training rows)"
            )
        )
        in_test = {id(r) for r in test_rows}
        tests.append([e for e in rendered if id(e.row) in in_test])
    model = model if model is not None else load_model(config)
    with stop_at_step_boundary_on_signals():  # Ctrl-C / SIGTERM: save, then stop (resumable)
        result = train_jobs(config, model, jobs, on_step=on_step, progress=progress)
    folds, truth = [], []
    for job, test in zip(jobs, tests):
        seen = {fingerprint(e.text) for e in job.train + job.val}
        folds.append(
            evaluate(
                result.model,
                test,
                job.name,
                job.labels,
                config.eval_method,
                compare_base=True,
                batch_size=config.batch_size,
                max_length=config.max_length,
                train_fingerprints=seen,
            )
        )
        # the rows evaluate kept (their labels: only labelled data is scored for accuracy)
        truth += [e.target for e in test if e.target is not None and fingerprint(e.text) not in seen]
    pooled = None
    if "accuracy" in folds[0].metrics:
        labels = folds[0].metrics["labels"]
        pooled = {
            who: classification_report(truth, [p for f in folds for p in pick(f).predictions], labels)
            for who, pick in (("adapter", lambda f: f), ("base", _base_report))
        }
    summary = {}
    for key in _summary_keys(folds[0]):
        for prefix, values in (
            ("", [f.metrics[key] for f in folds]),
            ("base_", [_base_report(f).metrics[key] for f in folds]),
        ):
            summary[prefix + key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    report = CrossValidationReport(config.kfold, folds, summary, Path(config.output), pooled)
    if distributed.current().is_main:  # under accelerate launch / torchrun only the main process writes files
        atomic_write_json(Path(config.output) / CV_REPORT_FILE, report.to_dict())
    return report


def _base_report(fold: EvalReport) -> EvalReport:
    """The base model's report of a fold (every fold is evaluated with ``compare_base``)."""
    assert fold.base is not None
    return fold.base


__all__ = ["CV_REPORT_FILE", "CrossValidationReport", "cross_validate"]
