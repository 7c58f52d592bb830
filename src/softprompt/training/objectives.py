"""Training objectives: the loss of one batch, pluggable into the loop (`softprompt.training.loop.Trainer`).

An objective is called as ``objective(model, input_ids, attention_mask, adapters, labels)`` and returns a
`SoftPromptOutput` with ``loss`` (the mean over label tokens) and ``label_logits`` (one row per label token,
what distributed training counts). ``lm`` is cross-entropy on the data's tokens; ``distill``
(`softprompt.training.distill`) is the KL divergence to the frozen model reading a document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from softprompt.data.selfstudy import read_context
from softprompt.methods import METHODS
from softprompt.options import OptionError, flag
from softprompt.training.adapter_config import ResolvedAdapter


class Objective(Protocol):
    def __call__(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list, labels: torch.Tensor
    ): ...


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list, labels: torch.Tensor):
    """Cross-entropy of the label tokens (the model's own loss)."""
    return model(input_ids, attention_mask, adapters=adapters, labels=labels)


def check_objective(objective: str, adapters: Sequence[ResolvedAdapter]) -> None:
    """The adapters fit the objective: distill needs a --context and a key/value method per adapter (its
    teacher is a key/value prefix, and only kv students score the same label positions); lm takes no --context."""
    for spec in adapters:
        prefix = f"adapters ({spec.name}): " if len(adapters) > 1 else ""
        if objective == "lm" and spec.context:
            raise OptionError(prefix + flag("context"), "is only read with --objective distill")
        if objective != "distill":
            continue
        if not spec.context:
            raise OptionError(prefix + flag("context"), "required with --objective distill (the document to distil)")
        read_context(spec.context, prefix + flag("context"))  # a missing or empty file fails before any loading
        if METHODS[spec.method].adds != "kv":
            kv = ", ".join(m for m, cls in METHODS.items() if cls.adds == "kv")
            raise OptionError(prefix + flag("objective"), f"distill trains key/value methods ({kv}), not {spec.method}")


__all__ = ["Objective", "check_objective", "lm_loss"]
