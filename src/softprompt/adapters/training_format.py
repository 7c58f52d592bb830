"""How an adapter trained here rendered its data, so inference can render raw text the same way.

Training records its template, columns, label words and length limit beside the adapter
(``training_state.json``); loading an adapter attaches them as ``adapter.training_format``:

    model.load_adapter("runs/demo/sentiment", name="a")
    model.generate(softprompt.format_inputs(model, ["great day!"], "a"), adapters="a")
    model.get_adapter("a").training_format.labels   # the label words it was trained to produce

An adapter trained elsewhere (PEFT) or added in code has ``training_format = None`` and gets its text as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from softprompt.data.templates import Template
from softprompt.engine.adapter_name import split_row_key
from softprompt.errors import ConfigError


@dataclass(frozen=True)
class TrainingFormat:
    """The data settings an adapter was trained with (any may be missing in older or hand-made files)."""

    template: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    task_column: str | None = None  # each row's task (multitask adapters)
    verbalizer: dict[str, str] | None = None  # raw label value -> label words
    labels: tuple[str, ...] = ()  # the label words, in training order
    max_length: int | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> TrainingFormat:
        """Read the training metadata saved with an adapter (``training_state.json``; ``{}`` gives an empty one)."""
        data = meta.get("data")
        if not isinstance(data, dict):
            data = {}
        verbalizer = data.get("verbalizer")
        return cls(
            template=data.get("template") or None,
            text_column=data.get("text_column") or None,
            label_column=data.get("label_column") or None,
            task_column=data.get("task_column") or None,
            verbalizer={str(k): str(v) for k, v in verbalizer.items()} if isinstance(verbalizer, dict) else None,
            labels=tuple(meta.get("labels") or ()),
            max_length=meta.get("max_length") or None,
        )

    def settings(self) -> dict:
        """The recorded settings as a dict holding only the keys that were recorded (``template``,
        ``text_column``, ``label_column``, ``task_column``, ``verbalizer``, ``labels``, ``max_length``)."""
        values = {
            "template": self.template,
            "text_column": self.text_column,
            "label_column": self.label_column,
            "task_column": self.task_column,
            "verbalizer": self.verbalizer,
            "labels": list(self.labels),
            "max_length": self.max_length,
        }
        return {k: v for k, v in values.items() if v}

    def format(self, text: str) -> str:
        """``text`` rendered through the recorded template (unchanged when none was recorded)."""
        if not self.template:
            return text
        template = Template(self.template)
        if len(template.fields) > 1:
            raise ConfigError(
                f"the adapter's template {self.template!r} reads columns {', '.join(map(repr, template.fields))}; "
                f"a single text fills only one: format the text yourself and send it as is (raw)"
            )
        return template.render({field: text for field in template.fields})

    def label_words(self, labels: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """``(names, words)``: the labels to report and the words the model scores for them.

        No ``labels``: the recorded labels (raw values where a verbalizer was recorded). Given ``labels``
        that are raw values of the recorded verbalizer score its words; any other label scores itself."""
        mapping = self.verbalizer or {}
        if labels is None:
            # the verbalizer's keys were saved sorted: report them in the order of the recorded label words
            order = {word: i for i, word in enumerate(self.labels)}
            names = (
                sorted(mapping, key=lambda raw: order.get(mapping[raw], len(order))) if mapping else list(self.labels)
            )
            if not names:
                raise ConfigError("labels: the adapter records no label words; give the candidate labels")
        else:
            names = list(labels)
        return names, [mapping.get(name, name) for name in names]


def format_inputs(model, texts: Sequence[str], adapters: str | Sequence[str | None] | None = None) -> list[str]:
    """Each text rendered through the recorded template of the adapter it goes to (``adapters``: one name for
    all, or one per text, ``None`` for the bare model), ready for ``model.generate`` or ``model.score``.
    Texts for the bare model, or for an adapter that records no template, are returned as they are."""
    texts = list(texts)
    names = [adapters] * len(texts) if adapters is None or isinstance(adapters, str) else list(adapters)
    if len(names) != len(texts):
        raise ConfigError(f"adapters: {len(names)} names for {len(texts)} texts; give one name or one per text")
    out = []
    for text, name in zip(texts, names):
        recorded = model.get_adapter(split_row_key(name)[0]).training_format if name is not None else None
        out.append(recorded.format(text) if recorded is not None else text)
    return out


__all__ = ["TrainingFormat", "format_inputs"]
