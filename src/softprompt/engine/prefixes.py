"""Key/value prefixes: each adapter's cached per-layer prefix, and a batch's rows stacked into one.

`SoftPromptModel` computes an adapter's prefix (running the frozen model over an input method's prompt,
or reading a prefix-tuning adapter's keys/values); this module keeps the computed ones until their
adapter's parameters change (`PromptKVCache`) and lays a batch's prefixes out row by row (`stack_prefixes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprompt.engine.adapter_name import split_row_key

# Per layer: keys and values, [kv_heads, n, head_dim] for one adapter or [batch, kv_heads, n, head_dim] stacked.
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
# An adapter's prefix: its per-layer keys/values and the hidden state of its last virtual token (input methods).
AdapterPrefix = tuple[LayerKV, torch.Tensor | None]


@dataclass
class BatchPrefix:
    """The key/value prefixes of one batch, left-padded to the longest prompt and masked."""

    layers: LayerKV  # per layer: [batch, kv_heads, N, head_dim]
    mask: torch.Tensor  # [batch, N]
    lengths: torch.Tensor  # [batch] real prefix length per row
    # Hidden state of each row's last virtual token (input methods), to predict the text's first token.
    last_hidden: torch.Tensor | None
    has_last_hidden: torch.Tensor  # [batch] bool


@dataclass
class _Entry:
    key: tuple  # dtype, device and autocast dtype the prefix was computed for
    params: list[torch.Tensor]  # the adapter's parameter values then
    layers: LayerKV
    last_hidden: torch.Tensor


class PromptKVCache:
    """Input-method adapters' computed prefixes by row key (an adapter's name, or ``NAME:TASK`` for a task of one),
    valid while their parameters keep their values."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def get(self, name: str, key: tuple, params: Sequence[torch.Tensor]) -> AdapterPrefix | None:
        """The prefix stored for ``name`` if it was computed under ``key`` from these parameter values."""
        entry = self._entries.get(name)
        # Parameters are compared by value, not by version counter: fused optimizers (torch's AdamW(fused=True),
        # the default of transformers' Trainer) update them in place without bumping it.
        if (
            entry is not None
            and entry.key == key
            and len(entry.params) == len(params)
            and all(torch.equal(old, p) for old, p in zip(entry.params, params))
        ):
            return entry.layers, entry.last_hidden
        return None

    def put(
        self, name: str, key: tuple, params: Sequence[torch.Tensor], layers: LayerKV, last_hidden: torch.Tensor
    ) -> None:
        """Store ``name``'s prefix, with a copy of the parameter values it was computed from."""
        self._entries[name] = _Entry(key, [p.detach().clone() for p in params], layers, last_hidden)

    def drop(self, name: str) -> None:
        """Forget adapter ``name``'s prefixes, of every task (its adapter was replaced or removed)."""
        for key in [k for k in self._entries if split_row_key(k)[0] == name]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


def stack_prefixes(
    names: Sequence[str | None], per_adapter: dict[str, AdapterPrefix], device: torch.device
) -> BatchPrefix | None:
    """Each row's prefix (``per_adapter[name]``; ``None``: none) left-padded to the longest and masked.
    None when no row has an adapter."""
    unique = list(dict.fromkeys(n for n in names if n is not None))
    if not unique:
        return None
    lengths = {name: per_adapter[name][0][0][0].shape[1] for name in unique}
    width = max(lengths.values())
    batch = len(names)
    if len(unique) == 1 and None not in names:
        return _shared_prefix(per_adapter[unique[0]], width, batch, device)
    index = torch.tensor([unique.index(n) if n is not None else len(unique) for n in names], device=device)
    layers = []
    for layer in range(len(per_adapter[unique[0]][0])):
        keys, values = [], []
        for name in unique:
            k, v = per_adapter[name][0][layer]
            pad = width - k.shape[1]
            keys.append(F.pad(k, (0, 0, pad, 0)))
            values.append(F.pad(v, (0, 0, pad, 0)))
        keys.append(torch.zeros_like(keys[0]))
        values.append(torch.zeros_like(values[0]))
        layers.append((torch.stack(keys)[index], torch.stack(values)[index]))
    row_lengths = torch.tensor([lengths[n] if n is not None else 0 for n in names], device=device)
    mask = (torch.arange(width, device=device)[None] >= (width - row_lengths)[:, None]).long()
    hidden = [per_adapter[n][1] if n is not None else None for n in names]
    has_hidden = torch.tensor([h is not None for h in hidden], device=device)
    last_hidden = None
    if has_hidden.any():
        filler = next(h for h in hidden if h is not None)
        last_hidden = torch.stack([h if h is not None else torch.zeros_like(filler) for h in hidden])
    return BatchPrefix(layers, mask, row_lengths, last_hidden, has_hidden)


def _shared_prefix(prefix: AdapterPrefix, width: int, batch: int, device: torch.device) -> BatchPrefix:
    """Every row uses one adapter (the common case): broadcast views instead of padded copies."""
    kv, hidden = prefix
    layers = [(k[None].expand(batch, -1, -1, -1), v[None].expand(batch, -1, -1, -1)) for k, v in kv]
    ones = torch.ones(batch, dtype=torch.bool, device=device)
    last_hidden = hidden[None].expand(batch, -1) if hidden is not None else None
    return BatchPrefix(
        layers,
        torch.ones(batch, width, dtype=torch.long, device=device),
        torch.full((batch,), width, device=device),
        last_hidden,
        ones if hidden is not None else ~ones,
    )


def prepend_prompts(
    embeds: torch.Tensor, attention_mask: torch.Tensor, prompts: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder inputs of encoder-decoder models: each row's input prompt (``prompts[i]``, ``[n, hidden]``; None:
    none) before its real tokens, right-padded. Returns the embeddings and their mask."""
    rows, masks = [], []
    for i, prompt in enumerate(prompts):
        real = embeds[i][attention_mask[i] == 1]
        if prompt is not None:
            real = torch.cat([prompt.to(embeds.dtype), real], dim=0)
        rows.append(real)
    longest = max(r.shape[0] for r in rows)
    for r in rows:
        masks.append(torch.cat([torch.ones(r.shape[0]), torch.zeros(longest - r.shape[0])]))
    padded = torch.stack([F.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])
    return padded, torch.stack(masks).long().to(embeds.device)
