"""Evaluate soft prompts on held-out data, beside the zero-shot base model.

* `evaluate` runs one adapter and, in the same mixed batches, the bare base model (adapter None) on
  the same examples, and returns an `EvalReport`:

  - labelled examples, ``method="score"``: every candidate label text is scored by log-likelihood
    after the prompt and the best one is the prediction (always a valid label);
  - labelled examples, ``method="generate"``: greedy generation, then exact match after normalising
    both texts (case, surrounding whitespace and punctuation);
  - unlabelled examples (or ``method="perplexity"``): loss and perplexity of the text (the label text
    when there is one).

  Classification numbers come from `softprompt.training.metrics.classification_report`.
* Held-out means held-out: given the fingerprints of the adapter's training texts (saved with every
  adapter that `softprompt.training.loop` writes; `softprompt.data.heldout.read_train_fingerprints`),
  examples whose text was trained on are dropped and counted in ``dropped_training_rows``; if nothing
  is left it is an error.

k-fold cross-validation, which trains, is `softprompt.training.cross_validate`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.adapters.peft_format import read_training_state
from softprompt.adapters.training_format import TrainingFormat
from softprompt.data import (
    Example,
    build_examples,
    default_template,
    load_rows,
    sample_rows,
    verbalizer_for,
    with_tasks,
)
from softprompt.data.heldout import fingerprint, read_train_fingerprints
from softprompt.engine.adapter_name import row_key
from softprompt.engine.tokens import pad_id
from softprompt.errors import ConfigError, DataError
from softprompt.training.batches import collate, encode_examples
from softprompt.training.config import flag
from softprompt.training.metrics import classification_report, format_report, perplexity

#: How `evaluate` can judge an adapter (``softprompt eval --method``).
EVAL_METHODS = ("score", "generate", "perplexity")


# ======================================================================================== settings


def adapter_settings(adapter_dir: str | Path) -> dict:
    """How an adapter trained here renders its data: template, text/label columns, verbalizer, labels.

    Empty for adapters trained elsewhere (e.g. by PEFT). Keys: ``template``, ``text_column``,
    ``label_column``, ``task_column``, ``verbalizer``, ``labels`` (label texts), ``max_length``.
    """
    _, meta = read_training_state(adapter_dir)
    return TrainingFormat.from_meta(meta).settings()


def normalize_text(text: str) -> str:
    """Text for exact-match comparison: case-folded, whitespace collapsed, outer punctuation stripped."""
    return re.sub(r"\s+", " ", text).strip().strip(".,;:!?\"'`").strip().casefold()


# ============================================================================================ report


@dataclass
class EvalReport:
    """Evaluation of one adapter (or the base model) on one set of examples."""

    adapter: str | None  # None: the bare base model
    method: str  # "score", "generate" or "perplexity"
    n: int  # examples evaluated (after dropping training rows)
    metrics: dict  # classification_report(...) or {"n", "tokens", "loss", "perplexity"}
    predictions: list[str] = field(default_factory=list)  # per example: predicted label / generated text
    dropped_training_rows: int = 0  # examples dropped because their text was trained on
    checked_training_rows: bool = False  # whether the adapter's training texts were known (and dropped)
    base: EvalReport | None = None  # the zero-shot base model on the same examples

    def get(self, key: str, default=None):
        return self.metrics.get(key, default)

    def to_dict(self) -> dict:
        return {
            "adapter": self.adapter,
            "method": self.method,
            "n": self.n,
            "dropped_training_rows": self.dropped_training_rows,
            "checked_training_rows": self.checked_training_rows,
            "metrics": self.metrics,
            "predictions": self.predictions,
            "base": self.base.to_dict() if self.base else None,
        }

    def format(self) -> str:
        """A plain-text summary: adapter beside zero-shot, then the adapter's full report."""
        who = f"adapter {self.adapter!r}" if self.adapter else "base model"
        if self.checked_training_rows:
            where = f"held-out examples ({self.dropped_training_rows} training rows dropped)"
        else:
            where = "examples (the adapter's training rows are unknown, so overlap was not checked)"
        lines = [f"{who}: {self.method}, n = {self.n} {where}"]
        keys = (
            [("accuracy", "accuracy"), ("macro_f1", "macro F1")]
            if "accuracy" in self.metrics
            else [("loss", "loss"), ("perplexity", "perplexity")]
        )
        head = f"{'':<12}{'adapter' if self.adapter else 'base':>12}" + (f"{'zero-shot':>12}" if self.base else "")
        lines.append(head)
        for key, label in keys:
            row = f"{label:<12}{self.metrics[key]:>12.4f}"
            if self.base:
                row += f"{self.base.metrics[key]:>12.4f}"
            lines.append(row)
        if "accuracy" in self.metrics:
            lines += ["", format_report(self.metrics).rstrip()]
        return "\n".join(lines) + "\n"


# ========================================================================================== evaluate


def evaluate(
    model,
    examples: Sequence[Example],
    adapter: str | None,
    labels: Sequence[str] | None = None,
    method: str = "score",
    *,
    compare_base: bool = True,
    batch_size: int = 16,
    max_length: int | None = None,
    train_fingerprints: Collection[int] | None = None,
    max_new_tokens: int | None = None,
) -> EvalReport:
    """Evaluate ``adapter`` (None: the base model) on ``examples``; see the module docstring.

    ``labels``: the label texts to choose from (default: the distinct targets, sorted). ``max_length``
    bounds prompt + label tokens as in training (long prompts keep their end). ``train_fingerprints``:
    see `read_train_fingerprints`; matching examples are dropped. With ``compare_base`` the report's
    ``base`` holds the zero-shot base model on the same examples.
    """
    if method not in EVAL_METHODS:
        raise ConfigError(f"{flag('eval_method')}: expected one of {', '.join(EVAL_METHODS)}, got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{flag('batch_size')}: expected an integer of at least 1, got {batch_size!r}")
    examples = list(examples)
    dropped = 0
    if train_fingerprints is not None:
        kept = [e for e in examples if fingerprint(e.text) not in train_fingerprints]
        dropped = len(examples) - len(kept)
        if examples and not kept:
            raise DataError(
                f"every one of the {len(examples)} evaluation examples was in the adapter's training "
                f"data; evaluate on held-out rows"
            )
        examples = kept
    if not examples:
        raise DataError("no examples to evaluate")
    labelled = [e.target is not None for e in examples]
    if any(labelled) and not all(labelled):
        raise DataError("some evaluation examples have a label and some do not; give a label to every row or none")
    runs = [adapter] + ([None] if compare_base and adapter is not None else [])
    if method == "perplexity" or not all(labelled):
        reports = [_perplexity_report(model, examples, a, batch_size, max_length or 1 << 30) for a in runs]
    else:
        truth = [e.target for e in examples if e.target is not None]  # all of them: every example is labelled
        labels = list(labels) if labels is not None else sorted(set(truth))
        if method == "score":
            predictions = _score_predictions(model, examples, runs, labels, batch_size, max_length)
        else:
            predictions = _generate_predictions(model, examples, runs, labels, batch_size, max_length, max_new_tokens)
        reports = []
        for a, raw in zip(runs, predictions):
            if method == "generate":  # exact match after normalisation; anything else is an invalid prediction
                by_norm = {normalize_text(label): label for label in labels}
                matched = [by_norm.get(normalize_text(p), p) for p in raw]
            else:
                matched = raw
            reports.append(EvalReport(a, method, len(examples), classification_report(truth, matched, labels), raw))
    for report in reports:
        report.dropped_training_rows = dropped
        report.checked_training_rows = train_fingerprints is not None
    main = reports[0]
    main.base = reports[1] if len(reports) > 1 else None
    return main


def _interleaved_runs(model, examples, runs, batch_size, call) -> list[list]:
    """Call ``call(texts, adapters)`` over batches of every (example, adapter) pair; results per adapter."""
    pairs = [(e.text, row_key(a, e.task)) for a in runs for e in examples]
    out: list = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out.extend(call([t for t, _ in chunk], [a for _, a in chunk]))
    n = len(examples)
    return [out[i * n : (i + 1) * n] for i in range(len(runs))]


def prompt_budget(model, labels, max_length: int | None) -> int | None:
    """Prompt tokens that leave room for the longest label (+ eos) within ``max_length``; None: no limit."""
    if max_length is None:
        return None
    longest = max(len(model.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
    return max(max_length - longest - 1, 1)


def _score_predictions(model, examples, runs, labels, batch_size, max_length) -> list[list[str]]:
    budget = prompt_budget(model, labels, max_length)
    with torch.no_grad():
        return _interleaved_runs(
            model,
            examples,
            runs,
            batch_size,
            lambda texts, adapters: [
                r.label for r in model.score(texts, labels=labels, adapters=adapters, max_input_tokens=budget)
            ],
        )


def _generate_predictions(model, examples, runs, labels, batch_size, max_length, max_new_tokens) -> list[list[str]]:
    if max_new_tokens is None:
        max_new_tokens = max(len(model.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels) + 2
    budget = prompt_budget(model, labels, max_length)
    with torch.no_grad():
        return _interleaved_runs(
            model,
            examples,
            runs,
            batch_size,
            lambda texts, adapters: model.generate(
                texts, adapters=adapters, max_new_tokens=max_new_tokens, stop=["\n"], max_input_tokens=budget
            ),
        )


def _perplexity_report(model, examples, adapter, batch_size, max_length) -> EvalReport:
    total, tokens = example_loss(model, examples, adapter, batch_size=batch_size, max_length=max_length)
    metrics = {"n": len(examples), "tokens": tokens, "loss": total / tokens, "perplexity": perplexity(total, tokens)}
    return EvalReport(adapter, "perplexity", len(examples), metrics)


def example_loss(
    model,
    examples: Sequence[Example],
    adapter: str | None,
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    bf16: bool = False,
) -> tuple[float, int]:
    """``(total negative log-likelihood, scored tokens)`` of the examples as training scores them.

    Labelled examples score their label text (+ eos); unlabelled ones their whole text.
    """
    items = encode_examples(model, examples, adapter, max_length)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            ids, mask, labels, adapters = collate(items[start : start + batch_size], pad_id(model.tokenizer))
            with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(ids, mask, adapters=adapters, labels=labels)
            count = out.loss_tokens
            total += float(out.loss.float()) * count
            tokens += count
    if tokens == 0:
        raise DataError("the evaluation examples have no tokens to score")
    return total, tokens


def with_adapter_tasks(model, adapter: str, examples: Sequence[Example], column: str | None, source: str) -> list:
    """``examples`` with each row's task read from ``column`` when ``adapter`` is a multitask adapter (unchanged
    otherwise); a multitask adapter without a column is one error naming ``--task-column``."""
    count = model.get_adapter(adapter).num_tasks
    if not count:
        return list(examples)
    if not column:
        raise ConfigError(
            f"{flag('task_column')}: adapter {adapter!r} is a multitask adapter ({count} tasks) that does not record its "
            f"task column; give the column of each row's task"
        )
    return with_tasks(examples, column, count, source=source)


def evaluate_data(
    model,
    adapter: str | None,
    data: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    template: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    task_column: str | None = None,
    verbalizer: dict[str, str] | None = None,
    method: str = "score",
    compare_base: bool = True,
    batch_size: int = 16,
    max_length: int | None = None,
    data_format: str | None = None,
    encoding: str | None = None,
    split: str = "test",
    max_rows: int | None = None,
) -> EvalReport:
    """Evaluate a loaded adapter on a data file (what ``softprompt eval`` runs).

    Settings not given are taken from how the adapter was trained (``adapter_dir``'s training
    metadata, see `adapter_settings`), and its training rows are dropped from the evaluation.
    ``data_format``/``encoding``/``split`` are passed to `softprompt.data.load_rows` (``split``
    only matters for hub data sets). ``max_rows``: a seeded sample of that many rows, stratified by label
    (`softprompt.data.sample_rows`).
    """
    saved = adapter_settings(adapter_dir) if adapter_dir else {}
    text_column = text_column or saved.get("text_column") or "text"
    template = template or saved.get("template") or default_template(text_column)
    label_column = label_column if label_column is not None else saved.get("label_column")
    verbalizer = verbalizer or saved.get("verbalizer")
    rows = load_rows(data, format=data_format, split=split, encoding=encoding)
    if max_rows is not None:
        rows = sample_rows(rows, max_rows, 0, label_column or None, source=str(data))
    verb = None
    if label_column:
        verb = verbalizer_for(verbalizer, rows, label_column, source=str(data))
    examples = build_examples(rows, template, label_column or None, verb, source=str(data))
    if adapter is not None:
        examples = with_adapter_tasks(model, adapter, examples, task_column or saved.get("task_column"), str(data))
    labels = verb.texts if verb is not None else None
    if labels and saved.get("labels") and not verbalizer:
        labels = list(dict.fromkeys(saved["labels"] + labels))
    prints = read_train_fingerprints(adapter_dir) if adapter_dir else None
    if not prints:  # an adapter trained elsewhere: its training rows are unknown
        prints = None
    return evaluate(
        model,
        examples,
        adapter,
        labels,
        method,
        compare_base=compare_base,
        batch_size=batch_size,
        max_length=max_length or saved.get("max_length"),
        train_fingerprints=prints,
    )


__all__ = [
    "EVAL_METHODS",
    "EvalReport",
    "adapter_settings",
    "evaluate",
    "evaluate_data",
    "example_loss",
    "normalize_text",
    "prompt_budget",
]
