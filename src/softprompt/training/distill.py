"""``--objective distill``: train a key/value adapter (a cartridge) to stand for a long document.

The student is the model with the adapter and *without* the document; the teacher is the same frozen model
reading the document: an extra, frozen cartridge whose keys/values are the ones the model computes for the
whole document (computed once at set-up, then reused as the teacher's prefix for every batch). The loss is
KL(teacher || student) of the next-token distributions at the label tokens (every token of language-modelling
rows), averaged over them; the teacher runs under ``no_grad``. Both prefixes are key/value prefixes, so both
score exactly the same positions, and a student equal to the document's own keys/values has loss 0.

Training rows are queries about the document: ``--data`` when given, else self-study
(`softprompt.data.selfstudy`): questions written by the frozen model from chunks of the document and
answered by the teacher, saved as ``<output>/selfstudy/<adapter>.jsonl`` (read back when it matches).
A cartridge without its own ``init_text`` starts from the document's first tokens, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from softprompt.data.selfstudy import read_context, saved_rows, self_study_rows, write_rows
from softprompt.engine.model import SoftPromptOutput
from softprompt.engine.tokens import pad_batch, pad_id
from softprompt.errors import ConfigError
from softprompt.methods.cartridge import Cartridge, CartridgeConfig
from softprompt.options import flag
from softprompt.training.config import TrainConfig
from softprompt.training.jobs import AdapterJob, prepare_job

TEACHER_SUFFIX = "-teacher"
SELF_STUDY_DIR = "selfstudy"


@dataclass
class Teacher:
    """The frozen model reading a document. ``adapter``: a frozen cartridge holding the keys/values of the whole
    document, computed once; None where a sliding-window layer cannot keep the whole document (Gemma 3's): then
    the teacher reads the document's ``ids`` again before each row, document and row in one forward."""

    adapter: str | None
    ids: list[int]  # the document as `document_text` spells it
    document: str

    def forward(self, model, input_ids, attention_mask, labels) -> SoftPromptOutput:
        """The teacher's output at the rows' label tokens (``labels`` must not mark a row's first token, which a
        key/value prefix does not predict; see `scored_labels`)."""
        if self.adapter is not None:
            return model(input_ids, attention_mask, adapters=[self.adapter] * len(input_ids), labels=labels)
        real = attention_mask.bool()
        rows = [self.ids + ids[keep].tolist() for ids, keep in zip(input_ids, real)]
        ids, mask = pad_batch(rows, pad_id(model.tokenizer))
        full = torch.full_like(ids, -100)
        for r, (row_labels, keep) in enumerate(zip(labels, real)):
            kept = row_labels[keep]
            full[r, ids.shape[1] - len(kept) :] = kept
        return model(ids, mask, labels=full)

    def prompt(self, model, text: str) -> str:
        """``text`` as a generation or scoring prompt for `adapter`: the document written before it when the
        teacher re-reads it (after a beginning-of-sequence token where the cached teacher's rows have one)."""
        return text if self.adapter is not None else self.document + document_text(model, text)


def scored_labels(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` without each row's first real token (a key/value prefix does not predict it) and padding."""
    labels = labels.masked_fill(attention_mask.to(labels.device) == 0, -100)
    first = attention_mask.long().argmax(-1, keepdim=True).to(labels.device)
    return labels.scatter(1, first, -100)


class DistillLoss:
    """The distill objective (`softprompt.training.objectives.Objective`); ``teachers`` maps each student
    adapter to its `Teacher` (the model reading the student's document)."""

    def __init__(self, teachers: dict[str, Teacher]):
        self.teachers = teachers

    def __call__(self, model, input_ids, attention_mask, adapters, labels) -> SoftPromptOutput:
        labels = scored_labels(attention_mask, labels.to(input_ids.device))
        counts = (labels != -100).sum(1).tolist()
        groups: dict[int, list[int]] = {}  # rows by teacher (each reads its own document)
        for row, name in enumerate(adapters):
            groups.setdefault(id(self.teachers[name]), []).append(row)
        per_row: list[torch.Tensor | None] = [None] * len(counts)
        with torch.no_grad():
            for rows in groups.values():
                pick = torch.tensor(rows, device=input_ids.device)
                teacher = self.teachers[adapters[rows[0]]]
                out = teacher.forward(model, input_ids[pick], attention_mask[pick], labels[pick])
                assert out.label_logits is not None  # a forward with labels
                for row, logits in zip(rows, out.label_logits.split([counts[r] for r in rows])):
                    per_row[row] = logits
        student = model(input_ids, attention_mask, adapters=adapters, labels=labels)
        teacher_logits = torch.cat([t for t in per_row if t is not None])
        return SoftPromptOutput(loss=kl_loss(student.label_logits, teacher_logits), label_logits=student.label_logits)

    def remove_teachers(self, model) -> None:
        for teacher in self.teachers.values():
            if teacher.adapter is not None and teacher.adapter in model.adapters:
                model.remove_adapter(teacher.adapter)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), both ``[tokens, vocab]``."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


def document_text(model, document: str) -> str:
    """The document as the teacher reads it: after the beginning-of-sequence token for tokenizers that add one."""
    tokenizer = model.tokenizer
    adds_bos = tokenizer.bos_token is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token + document if adds_bos else document


def context_window(model) -> int | None:
    config = model.base.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def add_teacher(
    model, name: str, document: str, *, max_length: int, where: str = "--context", reread: bool | None = None
) -> Teacher:
    """The `Teacher` reading ``document`` (as `document_text` spells it) for adapter ``name``: by default a frozen
    cartridge ``<name>-teacher`` registered with the whole document's keys/values, or, where a sliding-window
    layer of the model cannot keep them (``reread`` True forces it), the document re-read before each row. The
    document plus ``max_length`` tokens of query must fit the context window."""
    if model.shape.is_encoder_decoder:
        raise ConfigError(f"{flag('objective')}: distill needs a causal model (the teacher reads the document first)")
    token_ids = model.tokenizer(document_text(model, document), add_special_tokens=False)["input_ids"]
    tokens = len(token_ids)
    window = context_window(model)
    if window is not None and tokens + max_length > window:
        raise ConfigError(
            f"{where}: is {tokens:,} tokens; with {flag('max_length')} {max_length} that exceeds the model's "
            f"context window of {window:,} tokens"
        )
    if reread:
        return Teacher(None, token_ids, document)
    teacher = name[: 64 - len(TEACHER_SUFFIX)] + TEACHER_SUFFIX
    model.check_new_name(teacher)
    ids = torch.tensor([token_ids])
    cache = model.prefill(ids, torch.ones_like(ids), None).cache  # the document at positions 0..n-1, once
    layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    if any(key.shape[1] != tokens for key, _ in layers):  # a sliding-window layer kept only the last tokens
        return Teacher(None, token_ids, document)
    # Built here rather than through `add_adapter`: a document may be longer than a trainable prefix may be.
    config = CartridgeConfig(num_virtual_tokens=tokens, num_frozen_tokens=0, init="random")
    adapter = Cartridge.seeded(config, model.shape, torch.Generator().manual_seed(0))
    adapter.load_kv(layers)
    adapter.requires_grad_(False)
    model.register(teacher, adapter)
    return Teacher(teacher, token_ids, document)


def prepare_distill(config: TrainConfig, model) -> tuple[list[AdapterJob], DistillLoss]:
    """Each adapter's teacher and training rows (given, or self-study's) and the distill objective."""
    jobs, teachers = [], {}
    try:
        for spec in config.resolved_adapters():
            prefix = f"adapters ({spec.name}): " if config.adapters else ""
            assert spec.context is not None  # check_objective requires it
            where = f"{prefix}{flag('context')} {spec.context}"
            document = read_context(spec.context, where)
            teachers[spec.name] = add_teacher(model, spec.name, document, max_length=config.max_length, where=where)
            options = spec.method_options
            if spec.method == "cartridge" and options.get("init", "auto") == "auto" and not options.get("init_text"):
                options["init_text"] = document_text(model, document)  # the paper's start: the document's first tokens
            if spec.data:
                jobs.append(prepare_job(spec))
                continue
            path = Path(config.output).expanduser() / SELF_STUDY_DIR / f"{spec.name}.jsonl"
            rows = saved_rows(path, document, spec.seed, spec.synthetic_queries)
            if rows is None:
                was_training = model.training
                model.eval()
                rows = self_study_rows(
                    model,
                    document,
                    teachers[spec.name],
                    queries=spec.synthetic_queries,
                    chunk_tokens=spec.chunk_tokens,
                    seed=spec.seed,
                    batch_size=config.batch_size,
                )
                model.train(was_training)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_rows(path, rows)
            jobs.append(prepare_job(spec, rows=rows, source=str(path)))
    except BaseException:
        DistillLoss(teachers).remove_teachers(model)
        raise
    return jobs, DistillLoss(teachers)


__all__ = [
    "TEACHER_SUFFIX",
    "DistillLoss",
    "Teacher",
    "add_teacher",
    "document_text",
    "kl_loss",
    "prepare_distill",
    "scored_labels",
]
