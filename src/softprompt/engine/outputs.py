"""`SoftPromptOutput`: what a `SoftPromptModel` training / scoring forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SoftPromptOutput:
    loss: torch.Tensor | None = None
    # Without labels: [batch, seq, vocab] text logits. With labels: None (only label positions are projected).
    logits: torch.Tensor | None = None
    # With labels: [num_label_tokens, vocab] logits at exactly the positions that carry loss.
    label_logits: torch.Tensor | None = None
    # With labels: the token terms ``loss`` averages beyond the rows of ``label_logits`` (CPT's context labels).
    extra_tokens: int = 0

    @property
    def loss_tokens(self) -> int:  # how many token terms ``loss`` averages (processes sum them to share a mean)
        return (0 if self.label_logits is None else len(self.label_logits)) + self.extra_tokens


__all__ = ["SoftPromptOutput"]
