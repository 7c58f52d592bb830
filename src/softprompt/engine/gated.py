"""Gated prompt attention (adaption prompts): each row's prompt keys/values per layer, and the term they add.

A gated method (``adds = "gated"``, `softprompt.methods.adaption_prompt`) gives some layers a prompt that every
text query attends to in a softmax of its own; that attention's output times the layer's gate is added to the
layer's attention output. `SoftPromptModel` projects each adapter's prompts through the layers' own key/value
projections (`project`), stacks a batch's rows into a `GatedBatch` (`stack`: rows of other adapters, or of
none, get zero values, so they gain nothing) and passes it to the backbone as the keyword `KWARG`;
transformers hands it on to the attention function (`softprompt.engine.attention.attention`), which adds
`GatedBatch.term`. A decode state keeps its batch's `GatedBatch` (rows selected, repeated and merged with the
cache's), so every decoding step attends to the prompts too. Nothing enters the key/value cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.engine.families import FamilyQuirks, GatedAttention, ModelShape
from softprompt.errors import SoftPromptError

# The keyword the backbone's forward passes down to every attention call.
KWARG = "softprompt_gated"

# One adapter: layer -> (key [kv_heads, n, head_dim], value [kv_heads, n, head_dim], gate [1]).
AdapterGated = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def project(attention: nn.Module, spec: GatedAttention, shape: ModelShape, prompt: torch.Tensor):
    """Key and value ``[kv_heads, n, head_dim]`` of ``prompt`` ``[n, hidden]`` through the layer's own key and
    value projections, without rotary positions (as PEFT and the paper)."""
    if spec.value is None:  # fused query/key/value projection
        _, key, value = getattr(attention, spec.key)(prompt).split(shape.hidden_size, dim=-1)
    else:
        key, value = getattr(attention, spec.key)(prompt), getattr(attention, spec.value)(prompt)
    heads = shape.num_key_value_heads
    return key.view(-1, heads, shape.head_dim).transpose(0, 1), value.view(-1, heads, shape.head_dim).transpose(0, 1)


def unprojection(attention: nn.Module, spec: GatedAttention) -> torch.Tensor | None:
    """For a family where PEFT adds the gated output after the output projection (GPT-2): the inverse of that
    projection's matrix (float64), so that adding ``term @ inverse`` before it adds ``term`` after it. The
    attention interface only sees the projection's input; the projection's bias is added once either way."""
    if spec.added_after is None:
        return None
    proj = getattr(attention, spec.added_after)
    # nn.Linear stores [out, in] (x @ W.T); transformers' Conv1D stores [in, out] (x @ W).
    weight = proj.weight.T if isinstance(proj, nn.Linear) else proj.weight
    return torch.linalg.inv(weight.detach().double())


class Projector:
    """A model's side of gated prompts: each adapter's prompts projected by the layers they sit in, and a
    batch's rows stacked (with the output projections' inverses where the family needs them, computed once)."""

    def __init__(self, base: nn.Module, quirks: FamilyQuirks, shape: ModelShape):
        self.base, self.shape = base, shape
        self.blocks = quirks.blocks[0] if quirks.blocks else ""
        self.spec = quirks.gated
        self._inverses: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    def attention(self, layer: int) -> nn.Module:
        assert self.spec is not None  # adapters refuse families without a GatedAttention row
        blocks = self.base.get_submodule(self.blocks)
        assert isinstance(blocks, nn.ModuleList)
        return blocks[layer].get_submodule(self.spec.attention)

    def check(self, method: str, *, attention_installed: bool) -> None:
        """Raise unless gated prompts can be added to this model: the term is added in softprompt's attention
        function (`softprompt.engine.attention.install`), which only models on transformers' SDPA attention
        interface run."""
        if not attention_installed:
            implementation = getattr(getattr(self.base, "config", None), "_attn_implementation", None)
            raise SoftPromptError(
                f"{method}: needs transformers' SDPA attention interface, which this {self.shape.model_type!r} "
                f"model does not run (attn_implementation={implementation!r})"
            )

    def adapter(self, prompts: dict[int, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> AdapterGated:
        """One adapter's `SoftPromptMethod.gated_prompts` as keys, values and gates."""
        assert self.spec is not None
        out = {}
        for layer, (prompt, gate) in prompts.items():
            key, value = project(self.attention(layer), self.spec, self.shape, prompt.to(dtype))
            out[layer] = (key, value, gate)
        return out

    def batch(
        self, names: Sequence[str | None], adapters: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> GatedBatch | None:
        """The rows' gated prompts (rows whose adapter, ``adapters[name]``, is a `SoftPromptMethod` with ``adds ==
        "gated"``), projected by their layers in ``dtype``; None when no row has any."""
        unique = [n for n in dict.fromkeys(names) if n is not None and adapters[n].adds == "gated"]
        if not unique:
            return None
        assert self.spec is not None  # adapters refuse families without a GatedAttention row
        per_adapter = {n: self.adapter(adapters[n].gated_prompts(), dtype) for n in unique}
        layers = {i for prompts in per_adapter.values() for i in prompts}
        inverses = {}
        for layer in layers:
            if (layer, device) not in self._inverses:
                self._inverses[layer, device] = unprojection(self.attention(layer), self.spec)
            inverse = self._inverses[layer, device]
            if inverse is not None:
                inverses[layer] = inverse
        return stack(names, per_adapter, inverses, device)


@dataclass
class GatedLayer:
    """One layer's gated prompts for a batch, rows right-padded to the longest prompt."""

    keys: torch.Tensor  # [batch, kv_heads, n, head_dim]
    values: torch.Tensor  # [batch, kv_heads, n, head_dim]; zero for rows without a prompt in this layer
    mask: torch.Tensor  # [batch, n] bool: the keys each row attends to
    gate: torch.Tensor  # [batch]

    def index(self, rows: torch.Tensor) -> GatedLayer:
        return GatedLayer(self.keys[rows], self.values[rows], self.mask[rows], self.gate[rows])

    def widen(self, n: int) -> GatedLayer:
        """Right-pad the prompt axis to ``n`` masked keys."""
        pad = n - self.keys.shape[2]
        if pad == 0:
            return self
        return GatedLayer(
            F.pad(self.keys, (0, 0, 0, pad)), F.pad(self.values, (0, 0, 0, pad)), F.pad(self.mask, (0, pad)), self.gate
        )

    @classmethod
    def empty(cls, like: GatedLayer, rows: int) -> GatedLayer:
        """``rows`` rows that add nothing (zero values), shaped like ``like``."""
        keys = like.keys.new_zeros((rows, *like.keys.shape[1:]))
        mask = like.mask.new_ones((rows, like.mask.shape[1]))
        return cls(keys, torch.zeros_like(keys), mask, like.gate.new_zeros(rows))


@dataclass
class GatedBatch:
    """Every row's gated prompts in the layers that have any, and what `term` needs beyond them."""

    layers: dict[int, GatedLayer]  # never empty
    # Layer -> inverse of its output projection, where the term is added after that projection (`unprojection`).
    unproject: dict[int, torch.Tensor]

    def term(self, attention: nn.Module, query: torch.Tensor) -> torch.Tensor | None:
        """``[batch, q, heads, head_dim]`` to add to the attention output of ``layer`` for ``query``
        ``[batch, heads, q, head_dim]`` (rotary positions applied); None when no row has a prompt there.
        ``attention`` is the layer's attention module (transformers numbers it by ``layer_idx``).

        PEFT's formula: ``gate * softmax(q k^T / sqrt(head_dim)) v``, the softmax in float32, the query heads
        that share a key/value head (grouped-query attention) attending to the same prompt keys."""
        layer = getattr(attention, "layer_idx", None)
        if not isinstance(layer, int) or layer not in self.layers:
            return None
        entry = self.layers[layer]
        batch, heads, queries, dim = query.shape
        kv_heads = entry.keys.shape[1]
        group = heads // kv_heads
        # Query head h uses key/value head h // group, so each group's heads are consecutive.
        q = query.reshape(batch, kv_heads, group * queries, dim)
        scores = q @ entry.keys.to(query.dtype).transpose(2, 3) / dim**0.5
        scores = scores.masked_fill(~entry.mask[:, None, None, :], float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = entry.gate.to(query.dtype)[:, None, None, None] * probs
        out = (probs @ entry.values.to(query.dtype)).view(batch, heads, queries, dim).transpose(1, 2)
        inverse = self.unproject.get(layer)
        if inverse is not None:
            flat = out.reshape(batch, queries, heads * dim)
            out = (flat.double() @ inverse).to(query.dtype).view(batch, queries, heads, dim)
        return out

    @property
    def rows(self) -> int:
        return next(iter(self.layers.values())).gate.shape[0]

    def select(self, rows: torch.Tensor) -> GatedBatch:
        """Keep ``rows`` (indices or a boolean mask), as `DecodeState.select`."""
        return GatedBatch({i: e.index(rows) for i, e in self.layers.items()}, self.unproject)

    def repeat(self, times: int) -> GatedBatch:
        gate = next(iter(self.layers.values())).gate
        return self.select(torch.arange(self.rows, device=gate.device).repeat_interleave(times))


def concat(a: GatedBatch | None, rows_a: int, b: GatedBatch | None, rows_b: int) -> GatedBatch | None:
    """The rows of ``a`` then those of ``b`` (either may be None: rows without gated prompts)."""
    if a is None and b is None:
        return None
    layers: dict[int, GatedLayer] = {}
    parts = (a.layers if a else {}, b.layers if b else {})
    for layer in sorted({*parts[0], *parts[1]}):
        x, y = parts[0].get(layer), parts[1].get(layer)
        like = x if x is not None else y
        assert like is not None
        x = x if x is not None else GatedLayer.empty(like, rows_a)
        y = y if y is not None else GatedLayer.empty(like, rows_b)
        n = max(x.keys.shape[2], y.keys.shape[2])
        x, y = x.widen(n), y.widen(n)
        layers[layer] = GatedLayer(
            torch.cat([x.keys, y.keys]),
            torch.cat([x.values, y.values]),
            torch.cat([x.mask, y.mask]),
            torch.cat([x.gate, y.gate]),
        )
    unproject = {**(a.unproject if a else {}), **(b.unproject if b else {})}
    return GatedBatch(layers, unproject)


def stack(
    names: Sequence[str | None],
    per_adapter: dict[str, AdapterGated],
    unproject: dict[int, torch.Tensor],
    device: torch.device,
) -> GatedBatch | None:
    """Each row's gated prompts (``per_adapter[name]``; rows whose name is not there get none), or None when
    no row has any."""
    unique = [n for n in dict.fromkeys(names) if n is not None and n in per_adapter]
    if not unique:
        return None
    slot = torch.tensor([unique.index(n) if n in unique else len(unique) for n in names], device=device)
    layers = {}
    for layer in sorted({i for name in unique for i in per_adapter[name]}):
        entries = [per_adapter[name].get(layer) for name in unique]
        like = next(e for e in entries if e is not None)
        n = max(e[0].shape[1] for e in entries if e is not None)
        zero_kv = like[0].new_zeros((like[0].shape[0], n, like[0].shape[2]))
        keys, values, masks, gates = [], [], [], []
        for entry in [*entries, None]:  # the last slot: rows without a prompt in this layer
            if entry is None:
                keys.append(zero_kv)
                values.append(zero_kv)
                masks.append(torch.ones(n, dtype=torch.bool, device=device))
                gates.append(like[2].new_zeros(1))
                continue
            k, v, gate = entry
            pad = n - k.shape[1]
            keys.append(F.pad(k, (0, 0, 0, pad)))
            values.append(F.pad(v, (0, 0, 0, pad)))
            masks.append(torch.arange(n, device=device) < k.shape[1])
            gates.append(gate)
        layers[layer] = GatedLayer(
            torch.stack(keys)[slot], torch.stack(values)[slot], torch.stack(masks)[slot], torch.cat(gates)[slot]
        )
    return GatedBatch(layers, {i: m for i, m in unproject.items() if i in layers})
