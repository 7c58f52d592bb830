"""Label probabilities of an ensemble whose members may each run on their own base model.

`predict_file` averages adapters of ONE loaded base model, all rendering the rows one way. Here each member
names its base model (a built-in name or a checkpoint directory), an adapter trained on it (or none: the
zero-shot base) and renders the rows with its own template and label words (read from the adapter's training
metadata unless given). Members of one base model share one load and the bases are loaded one after the
other, so with the default loader only one is in memory at a time. Probabilities are over the raw labels
(``"1"``, ``"2"``), which every member must share, and are averaged over the members with equal weights.

    members = [EnsembleMember("smollm2-135m", "runs/sst2/default"), EnsembleMember("gemma3-270m", "runs/g/default")]
    result = ensemble_probabilities(members, load_rows("dev.tsv"))
    result.labels, result.probs, result.member_probs
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data import Example, Template, Verbalizer, column_names, load_rows, require_columns
from softprompt.engine.model import SoftPromptModel
from softprompt.errors import ConfigError
from softprompt.models.loading import load as load_base
from softprompt.training.evaluate import adapter_settings, prompt_budget, with_adapter_tasks
from softprompt.training.predict import label_probabilities, write_predictions


@dataclass(frozen=True)
class EnsembleMember:
    """One member: its base model, its adapter (None: the zero-shot base) and how it renders rows. ``template``,
    ``verbalizer`` (raw label -> label text), ``max_length`` and ``task_column`` default to the adapter's
    training metadata; a zero-shot member needs ``template`` and ``verbalizer``."""

    model: str
    adapter: str | Path | None = None
    template: str | None = None
    verbalizer: Mapping[str, str] | None = None
    max_length: int | None = None
    task_column: str | None = None

    def describe(self) -> str:
        return f"{self.model}={self.adapter}" if self.adapter else f"{self.model} (zero-shot)"

    def resolved(self) -> EnsembleMember:
        """This member with what it leaves out read from its adapter's training metadata (what is given wins)."""
        saved = adapter_settings(self.adapter) if self.adapter else {}
        template = self.template or saved.get("template")
        # an adapter trained on identity labels records only the label texts
        mapping = self.verbalizer or saved.get("verbalizer") or {label: label for label in saved.get("labels", [])}
        if not template or not mapping:
            raise ConfigError(
                f"ensemble member {self.describe()}: no template or label words "
                + ("recorded in its training state (trained elsewhere?)" if self.adapter else "(zero-shot)")
                + "; give template and verbalizer"
            )
        return dataclasses.replace(
            self,
            template=template,
            verbalizer=Verbalizer(mapping).mapping,  # raw labels as row cells hold them ("1", not 1)
            max_length=self.max_length or saved.get("max_length"),
            task_column=self.task_column or saved.get("task_column"),
        )


@dataclass
class EnsembleProbabilities:
    """Per row, each member's and the ensemble's probability of every raw label (in ``labels`` order)."""

    labels: list[str]
    members: list[EnsembleMember]  # resolved: each with the template and label words it used
    member_probs: list[list[list[float]]]  # [member][row][label]
    probs: list[list[float]]  # [row][label]: the members' mean

    def predictions(self, probs: Sequence[Sequence[float]] | None = None) -> list[str]:
        """The most probable raw label of each row (the first on a tie): the ensemble's, or ``probs``'."""
        rows = self.probs if probs is None else probs
        return [self.labels[max(range(len(p)), key=p.__getitem__)] for p in rows]


def ensemble_probabilities(
    members: Sequence[EnsembleMember],
    rows: Sequence[Mapping[str, Any]],
    *,
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
    load: Callable[[str], SoftPromptModel] | None = None,
    source: str = "data",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> EnsembleProbabilities:
    """Score ``rows`` with every member and average; see the module docstring. ``labels``: the raw label order
    (default: the first member's). ``load``: base model name -> `SoftPromptModel` (default `softprompt.load`;
    a caller holding loaded models may return them, and gets them back without the adapters loaded here).
    A member whose labels differ from the others' is one `ConfigError` naming it."""
    if not members:
        raise ConfigError("an ensemble needs at least one member")
    resolved = [m.resolved() for m in members]
    order = [str(label) for label in labels] if labels is not None else list(resolved[0].verbalizer or {})
    for i, m in enumerate(resolved):
        if set(m.verbalizer or {}) != set(order):
            raise ConfigError(
                f"ensemble member {i} ({m.describe()}): labels {sorted(m.verbalizer or {})} differ from "
                f"{'the labels given' if labels is not None else 'member 0'}'s {sorted(order)}; "
                "an ensemble averages probabilities over one label set"
            )
    for m in resolved:  # before any model loads
        Template(m.template or "").validate(column_names(rows), source=source)
    load = load or load_base
    bases: dict[str, list[int]] = {}
    for i, m in enumerate(resolved):
        bases.setdefault(m.model, []).append(i)
    member_probs: list[list[list[float]]] = [[] for _ in resolved]
    for name, indices in bases.items():
        started = time.perf_counter()
        model = load(name)
        for i in indices:
            member_probs[i] = _member_probabilities(model, resolved[i], i, rows, order, batch_size, source, progress)
        if log is not None:
            log(
                f"ensemble: {name}: {len(indices)} member(s) scored {len(rows)} rows in {time.perf_counter() - started:.0f} s"
            )
        del model  # before the next base loads: one in memory at a time
        gc.collect()
    mean = [[statistics.fmean(v) for v in zip(*row)] for row in zip(*member_probs)]
    return EnsembleProbabilities(order, resolved, member_probs, mean)


def _member_probabilities(
    model: SoftPromptModel,
    member: EnsembleMember,
    index: int,
    rows: Sequence[Mapping[str, Any]],
    order: list[str],
    batch_size: int,
    source: str,
    progress: bool,
) -> list[list[float]]:
    verbalizer = Verbalizer(member.verbalizer or {})
    texts = [Template(member.template or "").render(r) for r in rows]
    name = f"ensemble-member{index}" if member.adapter else None
    if name is not None:
        model.load_adapter(str(member.adapter), name=name)
    try:
        tasks = {}
        if name is not None and model.get_adapter(name).num_tasks:
            examples = [Example(text, None, dict(row)) for text, row in zip(texts, rows)]
            tasks[name] = [int(e.task) for e in with_adapter_tasks(model, name, examples, member.task_column, source)]
        probs = label_probabilities(
            model,
            texts,
            verbalizer.texts,
            [name],
            batch_size=batch_size,
            max_input_tokens=prompt_budget(model, verbalizer.texts, member.max_length),
            progress=progress,
            tasks=tasks,
        )
    finally:
        if name is not None:  # a caller's model is handed back as it came
            model.remove_adapter(name)
    columns = [verbalizer.raws.index(raw) for raw in order]
    return [[p[j] for j in columns] for p in probs]


def predict_ensemble_file(
    members: Sequence[EnsembleMember],
    data: str | Path,
    output: str | Path,
    *,
    id_column: str | None = None,
    label_name: str = "Label",
    probabilities: bool = False,
    batch_size: int = 16,
    data_format: str | None = None,
    encoding: str | None = None,
    load: Callable[[str], SoftPromptModel] | None = None,
    progress: bool = True,
) -> Path:
    """`predict_file` for an ensemble of `EnsembleMember`: a CSV of ``id_column`` (or ``row``) and the raw label,
    with ``probabilities`` one ``p_<raw label>`` column per label."""
    rows = load_rows(data, format=data_format, encoding=encoding)
    if id_column:
        require_columns(rows, [id_column], source=str(data))
    result = ensemble_probabilities(
        members, rows, batch_size=batch_size, load=load, source=str(data), progress=progress
    )
    return write_predictions(
        output,
        rows,
        result.predictions(),
        result.probs if probabilities else None,
        result.labels,
        id_column=id_column,
        label_name=label_name,
    )


__all__ = ["EnsembleMember", "EnsembleProbabilities", "ensemble_probabilities", "predict_ensemble_file"]
