"""Log-probabilities of given tokens: every prompt token after the first, and the most likely alternatives.

This is what OpenAI's ``echo`` with ``logprobs`` returns, and what lm-evaluation-harness sums to score a
continuation. It runs the scoring path of `softprompt.engine.scoring` (`SoftPromptModel.prefill`, then
`SoftPromptModel.advance` over right-padded tokens), with the context cut after the first token, so under an
adapter a continuation's summed log-probability is what ``model.score(context, [continuation])`` computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from softprompt.engine.tokens import pad_batch
from softprompt.errors import SoftPromptError

MAX_TOP = 20  # most alternatives one position may report (OpenAI's chat limit)


@dataclass
class TokenLogprob:
    """One token's log-probability and the ``top`` most likely tokens at its position (id, log-probability)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def pick(logits: torch.Tensor, tokens: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """For each row of ``logits`` [rows, vocab] (raw scores at one position each): the log-probability of
    ``tokens[row]`` and the ``top`` most likely tokens, most likely first."""
    if not 0 <= top <= MAX_TOP:
        raise SoftPromptError(f"top: expected 0-{MAX_TOP} alternatives, got {top}")
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(-1, torch.as_tensor(list(tokens), device=logprobs.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(top, -1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens, chosen, tops)]


def prompt_logprobs(model, prompts: Sequence[Sequence[int]], adapters, top: int = 0) -> list[list[TokenLogprob]]:
    """Per prompt (token ids, one adapter name or None per row): `TokenLogprob` of every token after the first
    (the first has no preceding text to be scored from), given the tokens before it and the row's adapter."""
    if any(len(p) == 0 for p in prompts):
        raise SoftPromptError("prompt: a prompt has no tokens")
    if model.shape.is_encoder_decoder:
        raise SoftPromptError("prompt log-probabilities need a decoder-only model (this one is encoder-decoder)")
    first = torch.tensor([[p[0]] for p in prompts], dtype=torch.long)
    state = model.prefill(first, torch.ones_like(first), adapters)
    positions = [state.logits[:, None]]  # [rows, 1, vocab]: predicts token 1
    middle = [list(p[1:-1]) for p in prompts]  # fed to predict tokens 2 .. n-1
    if any(middle):
        ids, mask = pad_batch(middle, 0, side="right")
        positions.append(model.advance(state, ids, mask))
    logits = torch.cat(positions, 1)
    results = []
    for row, prompt in enumerate(prompts):
        count = len(prompt) - 1
        results.append(pick(logits[row, :count], prompt[1:], top) if count else [])
    return results
