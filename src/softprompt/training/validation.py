"""Validation during training: the metrics of one adapter on its held-out rows, and which result counts as best."""

from __future__ import annotations

from softprompt.training.config import TrainConfig
from softprompt.training.evaluate import evaluate, example_loss
from softprompt.training.jobs import AdapterJob
from softprompt.training.metrics import perplexity


def validation_metrics(model, job: AdapterJob, adapter: str | None, config: TrainConfig) -> dict:
    """Validation metrics of ``adapter`` (None: the bare base model) on a job's validation rows: loss and
    perplexity, plus accuracy and macro-F1 (by ``config.eval_method``) for classification."""
    was_training = model.training
    model.eval()
    try:
        total, tokens = example_loss(
            model, job.val, adapter, batch_size=config.batch_size, max_length=config.max_length, bf16=config.bf16
        )
        metrics = {"n": len(job.val), "val_loss": total / tokens, "perplexity": perplexity(total, tokens)}
        if job.labels is not None:
            report = evaluate(
                model,
                job.val,
                adapter,
                job.labels,
                method=config.eval_method,
                compare_base=False,
                batch_size=config.batch_size,
                max_length=config.max_length,
            )
            metrics.update(accuracy=report.metrics["accuracy"], macro_f1=report.metrics["macro_f1"])
    finally:
        model.train(was_training)
    return metrics


def selection_score(metrics: dict, job: AdapterJob) -> tuple:
    """Higher is better: accuracy, then macro-F1, then lower loss (classification); lower loss otherwise."""
    if not metrics:
        return ()
    if job.labels is not None:
        return (metrics["accuracy"], metrics["macro_f1"], -metrics["val_loss"])
    return (-metrics["val_loss"],)


__all__ = ["selection_score", "validation_metrics"]
