"""Decoding: the state of a running batch, and the one rule that picks each next token and ends each row.

`SoftPromptModel.prefill` returns a `DecodeState` and `SoftPromptModel.advance` extends it. Both
`softprompt.engine.generation.generate_batch` and the server's batcher decode with what this module holds:

* `next_tokens` picks every row's next token: the argmax, or a draw from transformers' logits warpers
  (temperature, top-k, top-p) with the `Sampler`'s seeded generator, among the tokens a row's
  `LogitsConstraint` allows (a grammar, `softprompt.engine.constraints`; rows without one are untouched);
* `StopRule.add` adds the token to a row's `Continuation` and says when the row is done (end of sequence,
  a stop string, ``max_new_tokens``), with its final text;
* `feed_next` drops the finished rows and feeds the others their new token.

So a request served over HTTP returns what ``model.generate`` returns for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from softprompt.engine.gated import GatedBatch, concat

# Temperatures below this decode greedily (their limit): dividing logits by a denormal such as 1e-311
# overflows to inf, and softmax then gives NaN probabilities.
MIN_SAMPLING_TEMPERATURE = 1e-6


# ---------------------------------------------------------------------------- the state of a batch
@dataclass
class DecodeState:
    """Everything needed to continue a batch by more tokens: the public transformers cache plus masks."""

    cache: DynamicCache | EncoderDecoderCache
    attention_mask: torch.Tensor  # [batch, past]: prefix + text (+ generated) mask
    next_position: torch.Tensor  # [batch] position id of the next token (causal models)
    logits: torch.Tensor  # [batch, vocab] next-token logits
    encoder_hidden: torch.Tensor | None = None  # encoder-decoder only
    encoder_mask: torch.Tensor | None = None
    gated: GatedBatch | None = None  # the rows' gated prompts, attended at every step

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (finished rows leave a running batch)."""
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        self.logits = self.logits[rows]
        if self.encoder_hidden is not None:
            self.encoder_hidden = self.encoder_hidden[rows]
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask[rows]
        if self.gated is not None:
            self.gated = self.gated.select(rows)

    def repeat(self, times: int) -> None:
        """Repeat every row ``times`` times, consecutively (one copy per candidate label)."""
        self.cache.batch_repeat_interleave(times)
        self.attention_mask = self.attention_mask.repeat_interleave(times, 0)
        self.next_position = self.next_position.repeat_interleave(times, 0)
        self.logits = self.logits.repeat_interleave(times, 0)
        if self.encoder_hidden is not None:
            self.encoder_hidden = self.encoder_hidden.repeat_interleave(times, 0)
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.repeat_interleave(times, 0)
        if self.gated is not None:
            self.gated = self.gated.repeat(times)

    @property
    def mergeable(self) -> bool:
        """Whether `merge` and `trim` can work on this state: a causal model whose every cache layer is a plain
        full-width key/value tensor (sliding-window layers and encoder-decoder caches are not)."""
        if self.encoder_hidden is not None or not isinstance(self.cache, DynamicCache) or not self.cache.layers:
            return False
        width = self.attention_mask.shape[1]
        return all(
            type(layer) is DynamicLayer
            and layer.is_initialized
            and layer.keys is not None
            and layer.keys.dim() == 4
            and layer.keys.shape[-2] == width
            for layer in self.cache.layers
        )

    def merge(self, other: DecodeState) -> None:
        """Append the rows of ``other`` (both `mergeable`), left-padding the shorter cache with masked zeros.

        That changes no row's result: every row carries its own position ids and attention mask, the same
        mechanism that lets one batch mix prompt lengths.
        """
        self.gated = concat(self.gated, self.rows, other.gated, other.rows)
        wa, wb = self.attention_mask.shape[1], other.attention_mask.shape[1]
        width = max(wa, wb)
        for (x, xk, xv), (_, yk, yv) in zip(kv_layers(self.cache), kv_layers(other.cache)):
            x.keys = torch.cat([F.pad(xk, (0, 0, width - wa, 0)), F.pad(yk, (0, 0, width - wb, 0))])
            x.values = torch.cat([F.pad(xv, (0, 0, width - wa, 0)), F.pad(yv, (0, 0, width - wb, 0))])
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (width - wa, 0)), F.pad(other.attention_mask, (width - wb, 0))]
        )
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])

    def accepts(self, other: DecodeState) -> bool:
        """Whether `merge` can take ``other``'s rows."""
        return self.mergeable and other.mergeable

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its token ``tokens`` [rows]; the rows' next-token logits [rows, vocab]."""
        return model.advance(self, tokens[:, None])[:, -1]

    def trim(self) -> None:
        """Drop leading cache columns that no row attends to (`mergeable` states only)."""
        live = self.attention_mask.any(0)
        first = int(live.to(torch.int8).argmax()) if bool(live.any()) else 0
        if first > 0:
            for layer, keys, values in kv_layers(self.cache):
                layer.keys = keys[:, :, first:]
                layer.values = values[:, :, first:]
            self.attention_mask = self.attention_mask[:, first:]


def kv_layers(cache: DynamicCache | EncoderDecoderCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Each layer of a `DecodeState.mergeable` state's cache with its keys and values (all set there)."""
    layers = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        layers.append((layer, layer.keys, layer.values))
    return layers


# ---------------------------------------------------------------------------- the next token
@dataclass
class Sampler:
    """How a sampled decode draws: transformers' logits warpers and the generator (None: torch's global one)."""

    warpers: LogitsProcessorList
    generator: torch.Generator | None = None


def make_sampler(temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Sampler | None:
    """The `Sampler` for these options, or None (greedy) when ``temperature`` is below
    `MIN_SAMPLING_TEMPERATURE`, whose limit greedy decoding is."""
    if temperature < MIN_SAMPLING_TEMPERATURE:
        return None
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return Sampler(warpers, torch.Generator().manual_seed(seed) if seed is not None else None)


class LogitsConstraint(Protocol):
    """What a row may emit next (a grammar): `next_tokens` calls `mask` on that row's logits before it picks."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [vocab] of every token not allowed next to -inf, in place."""


def next_tokens(
    logits: torch.Tensor, sampler: Sampler | None, constraints: Sequence[LogitsConstraint | None] | None = None
) -> torch.Tensor:
    """Each row's next token, ``[rows]`` on the CPU: the argmax of ``logits`` [rows, vocab] (``sampler`` None),
    or one draw per row from the warped distribution. A row whose warped probabilities are not finite (a
    float16 overflow) takes its argmax; it still consumes its draw, so the other rows' draws do not shift.
    ``constraints``: per row, None or a `LogitsConstraint` that masks (a copy of) the row's logits first; the
    caller tells it the token picked."""
    if constraints is not None and any(c is not None for c in constraints):
        logits = logits.clone()  # the caller's logits stay the model's (log-probabilities are reported from them)
        for row, constraint in enumerate(constraints):
            if constraint is not None:
                constraint.mask(logits[row])
    greedy = logits.argmax(-1).cpu()
    if sampler is None:
        return greedy
    # The temperature/top-k/top-p warpers ignore input_ids, which transformers types as a LongTensor.
    probs = torch.softmax(sampler.warpers(None, logits).float(), -1).cpu()  # type: ignore[arg-type]
    broken = ~torch.isfinite(probs).all(-1)
    probs[broken] = F.one_hot(greedy[broken], probs.shape[-1]).to(probs.dtype)
    return torch.multinomial(probs, 1, generator=sampler.generator)[:, 0]


class RunningBatch(Protocol):
    """A batch being decoded: a `DecodeState`, or `softprompt.engine.static_decode.SlotState` (a slot pool)."""

    logits: torch.Tensor

    @property
    def mergeable(self) -> bool: ...

    @property
    def rows(self) -> int: ...

    def select(self, rows: torch.Tensor) -> None: ...

    def trim(self) -> None: ...

    def accepts(self, other: DecodeState) -> bool: ...

    def merge(self, other: DecodeState) -> None: ...

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor: ...


def feed_next(model, state: RunningBatch, keep: list[int], tokens: torch.Tensor, *, trim: bool = False) -> None:
    """Continue a batch by one token: keep only the rows ``keep`` (indices into the state's rows), feed row
    ``keep[i]`` its new token ``tokens[i]``, and leave the logits of the token after in ``state.logits``.
    ``trim``: also drop cache columns no kept row attends to (`DecodeState.mergeable` states only)."""
    if len(keep) < state.rows:
        state.select(torch.tensor(keep, device=state.logits.device))
        if trim:
            state.trim()
    state.logits = state.step(model, tokens)


# ---------------------------------------------------------------------------- when a row stops
class Continuation:
    """The tokens a row has generated, its text, and (once done) why it finished: "stop" or "length"."""

    __slots__ = ("tokens", "text", "finish")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""  # up to date at every token while stop strings (or streaming) need it; final once done
        self.finish: str | None = None

    @property
    def finish_reason(self) -> str:
        """Why the row finished ("stop" or "length"); only once it is done."""
        if self.finish is None:
            raise RuntimeError("the row is still decoding")
        return self.finish


class Detokenizer(Protocol):
    """What `StopRule` needs of a tokenizer."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class StopRule:
    """When a row stops: at an end-of-sequence token (not kept), as soon as its text contains a stop string
    (the text ends before the earliest one), or after ``max_new_tokens`` tokens."""

    tokenizer: Detokenizer | None  # decodes the text; None: a model without a tokenizer (text stays "")
    eos: frozenset[int]
    max_new_tokens: int
    stop: tuple[str, ...] = field(default_factory=tuple)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to its earliest stop string, and whether it had one."""
        cuts = [text.index(s) for s in self.stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could still grow into a stop string (what a stream
        holds back).

        Only suffixes starting with the stop string's first character can match, so those are the only ones
        compared (found with ``str.find``), longest first: a few C-level calls per step, not one per length.
        """
        best = 0
        for stop in self.stop:
            limit = min(len(stop) - 1, len(text))
            if limit <= best:
                continue
            first, end = stop[0], len(text)
            position = text.find(first, end - limit)
            while position != -1 and end - position > best:
                if stop.startswith(text[position:]):
                    best = end - position
                    break
                position = text.find(first, position + 1)
        return best

    def add(self, row: Continuation, token: int, *, track_text: bool = False) -> bool:
        """Add ``token`` to ``row``; returns whether it was kept (end-of-sequence tokens are not). When the row
        is done this sets ``row.finish`` and ``row.text`` to the final text. ``track_text``: keep ``row.text``
        current at every token (streaming), not only while stop strings need it."""
        kept = token not in self.eos
        if not kept:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if len(row.tokens) >= self.max_new_tokens:
                row.finish = "length"
        if row.finish is None and not (self.stop or track_text):
            return kept  # the text is decoded once, when the row is done
        row.text, hit = self.cut(self.decode(row.tokens))
        if hit:
            row.finish = "stop"
        return kept
