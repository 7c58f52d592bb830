"""Turning text into padded id batches, without mutating the user's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from softprompt.errors import SoftPromptError


def pad_id(tokenizer) -> int:
    """The id used for padding: the pad token, else end-of-sequence, else 0 (pads are always masked)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    return 0


def pad_batch(rows: Sequence[Sequence[int]], pad: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one ``[batch, longest]`` tensor and its attention mask."""
    longest = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    *,
    side: str = "left",
    max_length: int | None = None,
    add_special_tokens: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise texts and pad them (left by default, for generation). Long texts keep their end."""
    rows = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    if max_length is not None:
        rows = [r[-max_length:] for r in rows]
    for text, row in zip(texts, rows):
        if not row:
            raise SoftPromptError(f"input text {text!r} tokenises to no tokens; give at least one character")
    return pad_batch(rows, pad_id(tokenizer), side)


def eos_ids(tokenizer, base_model=None) -> set[int]:
    """Every id that ends a generation: the tokenizer's eos plus the model's generation-config eos ids."""
    ids: set[int] = set()
    sources = [tokenizer]
    if base_model is not None:
        sources += [getattr(base_model, "generation_config", None), getattr(base_model, "config", None)]
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids
