"""Examples as token ids, and the batches of an epoch (what the training loop and `example_loss` feed the model).

* A causal-LM example is the tokens of the rendered template (with the tokenizer's special tokens,
  exactly as scoring and generation tokenise a prompt), then the tokens of the label text (tokenised
  on its own, no special tokens), then end-of-sequence; the loss covers the label tokens only (PEFT's
  RAFT example). Data without a label column is language modelling on the whole text. Encoder-decoder
  models (T5) take the template on the encoder and the label text + eos as decoder targets.
* An epoch is a seeded order of all rows (of every adapter still training), cut into batches, grouped
  into optimizer steps of ``grad_accum`` batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from softprompt.data import Example
from softprompt.engine.adapter_name import row_key
from softprompt.engine.tokens import pad_batch
from softprompt.errors import ConfigError
from softprompt.training.config import flag


@dataclass
class Encoded:
    """One tokenised example. Causal: ``labels`` align with ``input_ids``; seq2seq: decoder targets."""

    input_ids: list[int]
    labels: list[int]
    adapter: str | None


def encode_example(tokenizer, example: Example, *, seq2seq: bool, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example (see the module docstring). Long prompts keep their end."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = tokenizer(example.text)["input_ids"]  # with special tokens, as scoring and generation do
    if example.target is None:
        if seq2seq:
            raise ConfigError(
                f"{flag('label_column')}: encoder-decoder models learn to write a label text; "
                f"language modelling without a label column needs a causal model"
            )
        ids = (prompt + eos)[:max_length]
        labels = list(ids)
        if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
            labels[0] = -100  # nothing predicts the beginning-of-sequence token
        return ids, labels
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + eos
    if seq2seq:
        return prompt[-max_length:], target[:max_length]
    target = target[: max_length - 1]  # at least one prompt token stays
    room = max_length - len(target)
    if len(prompt) > room:
        prompt = prompt[-room:]
    return prompt + target, [-100] * len(prompt) + target


def encode_examples(model, examples: Sequence[Example], adapter: str | None, max_length: int) -> list[Encoded]:
    """Every example encoded for ``model`` (a `SoftPromptModel`), tagged with the adapter that trains on it (and the
    example's task of it: ``NAME:TASK``)."""
    seq2seq = model.shape.is_encoder_decoder
    return [
        Encoded(*encode_example(model.tokenizer, e, seq2seq=seq2seq, max_length=max_length), row_key(adapter, e.task))
        for e in examples
    ]


def collate(items: Sequence[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Right-padded ``(input_ids, attention_mask, labels, adapter per row)`` of a batch."""
    ids, mask = pad_batch([it.input_ids for it in items], pad, side="right")
    labels, _ = pad_batch([it.labels for it in items], -100, side="right")
    return ids, mask, labels, [it.adapter for it in items]


def epoch_groups(
    items: Sequence[Encoded], epoch: int, seed: int, batch_size: int, grad_accum: int
) -> list[list[list[Encoded]]]:
    """The epoch's optimizer steps: groups of ``grad_accum`` batches, in a seeded order of all rows."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(items), generator=generator).tolist()
    batches = [[items[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    return [batches[s : s + grad_accum] for s in range(0, len(batches), grad_accum)]


__all__ = ["Encoded", "collate", "encode_example", "encode_examples", "epoch_groups"]
