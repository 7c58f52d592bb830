"""Label predictions for unlabelled data: one adapter, or an ensemble of several averaged.

    softprompt predict --model smollm2-135m --adapter runs/raft/default \
        --data test_unlabeled.csv --id-column ID --output predictions.csv

Each adapter ranks the candidate label texts by log-likelihood (label scoring, as `evaluate` does);
the scores are turned into a probability over the labels per adapter, and an ensemble averages the
probabilities of its adapters. Labels are written back as the raw values of the data set (``1``/``2``
for RAFT) through the verbalizer the adapter was trained with.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt.data import Example, Template, Verbalizer, column_names, default_template, load_rows, require_columns
from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_text
from softprompt.training.evaluate import adapter_settings, prompt_budget, with_adapter_tasks


def label_probabilities(
    model,
    texts: Sequence[str],
    labels: Sequence[str],
    adapters: Sequence[str | None],
    *,
    batch_size: int = 16,
    max_input_tokens: int | None = None,
    progress: bool = False,
    tasks: Mapping[str, Sequence[int]] | None = None,
) -> list[list[float]]:
    """Per text, the probability of each label averaged over ``adapters`` (an ensemble of one or more).
    ``tasks``: for a multitask adapter (by name), each text's task."""
    tasks = tasks or {}
    totals = [[0.0] * len(labels) for _ in texts]
    bar = tqdm(total=len(texts) * len(adapters), desc="predicting", unit="row", disable=not progress)
    with torch.no_grad():
        for adapter in adapters:
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                own = tasks.get(adapter) if adapter is not None else None
                scored = model.score(
                    chunk,
                    labels=list(labels),
                    adapters=[adapter] * len(chunk),
                    task_ids=list(own[start : start + batch_size]) if own is not None else None,
                    max_input_tokens=max_input_tokens,
                )
                for i, result in enumerate(scored):
                    probs = torch.tensor([result.scores[label] for label in labels], dtype=torch.float64).softmax(-1)
                    for j, p in enumerate(probs.tolist()):
                        totals[start + i][j] += p / len(adapters)
                bar.update(len(chunk))
    bar.close()
    return totals


def predict_file(
    model,
    adapters: Mapping[str, str | Path],
    data: str | Path,
    output: str | Path,
    *,
    id_column: str | None = None,
    label_name: str = "Label",
    template: str | None = None,
    text_column: str | None = None,
    verbalizer: dict[str, str] | None = None,
    probabilities: bool = False,
    batch_size: int = 16,
    data_format: str | None = None,
    encoding: str | None = None,
    progress: bool = True,
    task_column: str | None = None,
) -> Path:
    """Predict a label for every row of ``data`` and write a CSV (``id_column`` or ``row``, ``label_name``).

    ``adapters`` maps names to adapter directories (loaded into ``model`` if not there yet). Template and
    verbalizer default to how the first adapter was trained; all adapters must share its labels. No
    adapters: the zero-shot base model predicts, with the ``template`` and ``verbalizer`` given.
    ``probabilities`` adds one ``p_<label>`` column per label. A multitask adapter reads each row's task from
    ``task_column`` (default: the column it was trained with).
    """
    if not adapters and not (template and verbalizer):
        raise ConfigError(
            "--adapter: give at least one adapter, or --template and --verbalizer to predict "
            "zero-shot with the base model"
        )
    settings = {name: adapter_settings(path) for name, path in adapters.items()}
    first = next(iter(settings.values()), {})
    template = template or first.get("template") or default_template(text_column or first.get("text_column") or "text")
    mapping = verbalizer or first.get("verbalizer")
    labels = list(mapping.values()) if mapping else first.get("labels")
    if not labels:
        raise ConfigError(
            "--verbalizer: the adapter does not record its labels (trained elsewhere?); give --verbalizer RAW=TEXT,..."
        )
    for name, saved in settings.items():
        if saved.get("labels") and set(saved["labels"]) != set(labels):
            raise ConfigError(
                f"--adapter {name}: was trained on labels {saved['labels']}, not {labels}; "
                f"an ensemble needs the same labels"
            )
    verb = Verbalizer(mapping) if mapping else Verbalizer.from_labels(labels)
    for name, path in adapters.items():
        if name not in model.adapters:
            model.load_adapter(path, name=name)
    rows = load_rows(data, format=data_format, encoding=encoding)
    parsed = Template(template)
    if id_column:
        require_columns(rows, [id_column], source=str(data))
    parsed.validate(column_names(rows), source=str(data))
    texts = [parsed.render(row) for row in rows]
    tasks = {}  # a multitask adapter: each row its task
    for name in adapters:
        if model.get_adapter(name).num_tasks:
            column = task_column or settings[name].get("task_column")
            examples = [Example(text, None, row) for text, row in zip(texts, rows)]
            tasks[name] = [int(e.task) for e in with_adapter_tasks(model, name, examples, column, str(data))]
    budget = prompt_budget(model, labels, first.get("max_length"))
    probs = label_probabilities(
        model,
        texts,
        labels,
        list(adapters) or [None],
        batch_size=batch_size,
        max_input_tokens=budget,
        progress=progress,
        tasks=tasks,
    )
    names = [label.strip() for label in labels]  # " negative" -> p_negative, unless that makes two alike
    names = names if len(set(names)) == len(names) else list(labels)
    predictions = [verb.to_raw(labels[max(range(len(labels)), key=p.__getitem__)]) for p in probs]
    return write_predictions(
        output, rows, predictions, probs if probabilities else None, names, id_column=id_column, label_name=label_name
    )


def write_predictions(
    output: str | Path,
    rows: Sequence[Mapping[str, Any]],
    predictions: Sequence[str],
    probs: Sequence[Sequence[float]] | None,
    columns: Sequence[str],
    *,
    id_column: str | None,
    label_name: str,
) -> Path:
    """The predictions CSV, written atomically: ``id_column``'s value (or the row number from 1) and the predicted
    raw label per row; with ``probs``, one ``p_<column>`` column per label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([id_column or "row", label_name] + ([f"p_{name}" for name in columns] if probs else []))
    for i, (row, label) in enumerate(zip(rows, predictions)):
        extra = [f"{v:.6f}" for v in probs[i]] if probs else []
        writer.writerow([row[id_column] if id_column else i + 1, label, *extra])
    output = Path(output)
    atomic_write_text(output, buffer.getvalue())
    return output


__all__ = ["label_probabilities", "predict_file", "write_predictions"]
