"""Text generation with per-row adapters.

A small decoding loop over `SoftPromptModel.start` / `advance`, which drive the model through
transformers' public cache objects (``past_key_values``); transformers' own logits warpers do
temperature and top-p/top-k. We keep our own loop because ``model.generate`` cannot take a different
soft prompt per row, and because rows that finish (end-of-sequence or a stop string) leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from softprompt.errors import SoftPromptError
from softprompt.engine.tokens import encode_texts, eos_ids


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


def _warpers(cfg: GenerationConfig) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters, cfg: GenerationConfig,
                   on_token=None) -> list[Generation]:
    """Decode new tokens for every row. ``on_token(row, token_id)`` is called as tokens appear (streaming)."""
    cfg.validate()
    tokenizer = model.tokenizer
    stops = eos_ids(tokenizer, model.base) if tokenizer is not None else set()
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    warpers = _warpers(cfg) if cfg.do_sample else None
    batch = input_ids.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    texts = [""] * batch
    active = list(range(batch))
    state = model.start(input_ids, attention_mask, adapters)
    for step in range(cfg.max_new_tokens):
        logits = state.logits
        if cfg.do_sample:
            probs = torch.softmax(warpers(None, logits).float(), -1).cpu()
            greedy = logits.argmax(-1).cpu()
            # A vanishing temperature (e.g. 1e-300) overflows to inf/nan: such rows decode greedily.
            broken = ~torch.isfinite(probs).all(-1) | (cfg.temperature < 1e-6)
            probs[broken] = torch.nn.functional.one_hot(greedy[broken], probs.shape[-1]).to(probs.dtype)
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_tokens = logits.argmax(-1).cpu()
        keep = []
        for slot, row in enumerate(active):
            token = int(next_tokens[slot])
            if token in stops:
                reasons[row] = "stop"
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if cfg.stop:
                texts[row] = tokenizer.decode(outputs[row], skip_special_tokens=True)
                if any(s in texts[row] for s in cfg.stop):
                    reasons[row] = "stop"
                    continue
            keep.append(slot)
        if not keep or step == cfg.max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=state.logits.device)
            state.select(index)
            next_tokens = next_tokens[keep]
            active = [active[k] for k in keep]
        state.logits = model.advance(state, next_tokens[:, None])[:, -1]
    results = []
    for row in range(batch):
        text = tokenizer.decode(outputs[row], skip_special_tokens=True) if tokenizer is not None else ""
        for s in cfg.stop:
            if s in text:
                text = text[: text.index(s)]
        results.append(Generation(text, outputs[row], reasons[row], int(attention_mask[row].sum())))
    return results


def generate(model, prompts: str | Sequence[str], adapters=None, *, return_details: bool = False,
             **options) -> list[str] | list[Generation]:
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
