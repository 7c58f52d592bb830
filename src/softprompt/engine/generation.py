"""Text generation with per-row adapters.

A small decoding loop over `SoftPromptModel.prefill` / `advance`, which drive the model through
transformers' public cache objects (under the keyword `families.CacheArg` reads from the model);
`softprompt.engine.decode` picks each token (transformers' own logits warpers do temperature and top-p/top-k)
and decides when a row stops, by the rules the server uses too. We keep our own loop because ``model.generate``
cannot take a different soft prompt per row, and because rows that finish (end-of-sequence or a stop string)
leave the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from softprompt.engine import static_decode
from softprompt.engine.decode import Continuation, StopRule, feed_next, make_sampler, next_tokens
from softprompt.engine.tokens import encode_texts, eos_ids
from softprompt.errors import SoftPromptError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    max_input_tokens: int | None = None

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SoftPromptError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise SoftPromptError(f"temperature: expected a number above 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise SoftPromptError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise SoftPromptError(f"top_k: expected 0 (off) or a positive integer, got {self.top_k!r}")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or stop string) or "length"
    prompt_tokens: int = 0


def generate_batch(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters, cfg: GenerationConfig, on_token=None
) -> list[Generation]:
    """Decode new tokens for every row. ``on_token(row, token_id)`` is called as tokens appear (streaming)."""
    cfg.validate()
    tokenizer = model.tokenizer
    rule = StopRule(
        tokenizer,
        frozenset(eos_ids(tokenizer, model.base)) if tokenizer is not None else frozenset(),
        cfg.max_new_tokens,
        tuple(cfg.stop),
    )
    # One generator draws for the whole batch, so a seeded call returns the same rows every time.
    sampler = make_sampler(cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed) if cfg.do_sample else None
    rows = [Continuation() for _ in range(input_ids.shape[0])]
    active = list(range(len(rows)))  # the state's rows, by index into ``rows``
    # "static"/"compiled" (`model.decode`): the batch decodes in a preallocated slot pool where it can
    state = static_decode.start(model, model.prefill(input_ids, attention_mask, adapters), cfg.max_new_tokens)
    while True:
        tokens = next_tokens(state.logits, sampler)
        for slot, row in enumerate(active):
            token = int(tokens[slot])
            if rule.add(rows[row], token) and on_token is not None:
                on_token(row, token)
        keep = [slot for slot, row in enumerate(active) if rows[row].finish is None]
        if not keep:
            break
        active = [active[k] for k in keep]
        feed_next(model, state, keep, tokens[keep])
    return [
        Generation(row.text, row.tokens, row.finish_reason, int(attention_mask[i].sum())) for i, row in enumerate(rows)
    ]


def generate(
    model, prompts: str | Sequence[str], adapters=None, *, return_details: bool = False, **options
) -> list[str] | list[Generation]:
    """Generate a continuation of each prompt, each row with its own adapter (greedy by default).

    Options: max_new_tokens, do_sample, temperature, top_p, top_k, stop (strings), seed, max_input_tokens.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        return []
    cfg = GenerationConfig(**options)
    ids, mask = encode_texts(model.tokenizer, prompts, side="left", max_length=cfg.max_input_tokens)
    results = generate_batch(model, ids, mask, adapters, cfg)
    return results if return_details else [r.text for r in results]
