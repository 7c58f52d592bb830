"""Label scoring: rank candidate label strings by their log-likelihood after each input.

One prefill runs every input (with its own adapter) once; the resulting cache is repeated once per
candidate and all candidates are scored in a single batched pass, so the input is never re-encoded.
Compared with generate-and-match this always returns a valid label and costs one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from softprompt.engine.tokens import encode_texts, pad_batch, pad_id
from softprompt.errors import SoftPromptError


@dataclass
class LabelScores:
    label: str  # the best candidate
    scores: dict[str, float]  # candidate -> total (or mean) log-probability

    def probabilities(self) -> dict[str, float]:
        """Scores renormalised over the candidates."""
        values = torch.tensor(list(self.scores.values()))
        return dict(zip(self.scores, torch.softmax(values, 0).tolist()))


def score_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapters,
    candidates: Sequence[Sequence[int]],
    normalize: str = "sum",
) -> torch.Tensor:
    """``[batch, num_candidates]`` log-likelihoods of candidate token sequences after each row."""
    if normalize not in ("sum", "mean"):
        raise SoftPromptError(f"normalize: expected 'sum' or 'mean', got {normalize!r}")
    if any(len(c) == 0 for c in candidates):
        raise SoftPromptError("labels: a candidate label tokenises to no tokens")
    state = model.prefill(input_ids, attention_mask, adapters)
    batch, count = input_ids.shape[0], len(candidates)
    first = torch.log_softmax(state.logits, -1)  # [batch, vocab]: predicts each candidate's first token
    cand_ids, cand_mask = pad_batch(candidates, pad_id(model.tokenizer) if model.tokenizer else 0, side="right")
    cand_ids, cand_mask = cand_ids.to(first.device), cand_mask.to(first.device)
    totals = first[:, cand_ids[:, 0]]  # [batch, count]
    if cand_ids.shape[1] > 1:
        state.repeat(count)
        tokens = cand_ids.repeat(batch, 1)
        mask = cand_mask.repeat(batch, 1)
        logprobs = torch.log_softmax(model.advance(state, tokens[:, :-1], mask[:, :-1]), -1)
        picked = logprobs.gather(-1, tokens[:, 1:, None])[..., 0] * mask[:, 1:]
        totals = totals + picked.sum(-1).view(batch, count)
    if normalize == "mean":
        totals = totals / cand_mask.sum(-1)[None].to(totals.dtype)
    return totals


def score(
    model,
    texts: str | Sequence[str],
    labels: Sequence[str],
    adapters=None,
    *,
    normalize: str = "sum",
    max_input_tokens: int | None = None,
) -> list[LabelScores]:
    """Per row: the log-likelihood of every candidate label and the best one."""
    if isinstance(texts, str):
        texts = [texts]
    labels = list(labels)
    if not labels:
        raise SoftPromptError("labels: give at least one candidate label")
    if len(set(labels)) != len(labels):
        raise SoftPromptError("labels: candidate labels must be distinct")
    if not texts:
        return []
    ids, mask = encode_texts(model.tokenizer, texts, side="left", max_length=max_input_tokens)
    candidates = [model.tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    totals = score_ids(model, ids, mask, adapters, candidates, normalize=normalize).cpu()
    results = []
    for row in totals:
        scores = dict(zip(labels, row.tolist()))
        results.append(LabelScores(labels[int(row.argmax())], scores))
    return results
