"""CPT, context-aware prompt tuning (Blau et al., 2024): few-shot examples as a trainable context.

Same semantics and file layout as PEFT's ``CPT`` (causal models only). The virtual tokens are the embeddings
of ``cpt_token_ids`` (a few labelled examples written out: template, input, label, ...), frozen, plus a
trainable delta that starts at zero. ``cpt_tokens_type_mask`` types each token: for example ``i`` (from 0)
``4i+1`` input template, ``4i+2`` input, ``4i+3`` output template, ``4i+4`` label (0: none). Training

* updates the deltas of template and input tokens only (labels and type 0 stay as written);
* adds the context's label tokens to the loss, each weighted 1 (``opt_weighted_loss_type: none``) or, with
  ``decay``, ``opt_loss_decay_factor ** k`` for the k-th example counted back from the end (the row's own
  label tokens weigh 1): `prompt_targets`, which the engine applies to every row of the adapter;
* projects every delta back onto an L2 ball after each optimizer step (`after_step`): radius
  ``opt_projection_epsilon`` for inputs, ``opt_projection_format_epsilon`` for templates, both times
  ``sqrt(hidden / 2048)`` as PEFT scales them.

PEFT's users pass token ids; here ``cpt_examples: K`` also builds them from the first K training examples
(cycling through the labels so each is shown), each rendered through the job's template and typed by its
pieces: literals before the last field are input template, the fields input, the literal after the last
field output template, then the label text and a newline separator (a template token).
``cpt_mask`` is kept for PEFT's files (PEFT only checks its length). One deliberate difference: a row's
own label tokens always carry loss here, while PEFT types them ``max(type mask) + 4`` and so drops them
when the context's largest type is not a label's (a multiple of 4; its default all-1 mask, for one). Saved as PEFT saves it:
``prompt_embeddings`` = context + delta; a loaded table is the context, with a zero delta.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.errors import ConfigError
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.options import OptionError, check_choice, check_int, check_number, option

if TYPE_CHECKING:
    from softprompt.data import Example, Template

LOSS_TYPES = ("none", "decay")
MIN_EPSILON = 1e-10  # PEFT's radius for label tokens (their deltas never move anyway)
SEPARATOR = "\n"  # between built examples


@dataclass
class CPTConfig(MethodConfig):
    method = "cpt"
    peft_type = "CPT"

    cpt_token_ids: list[int] | None = option(
        None,
        "Token ids of the context (labelled examples written out); num_virtual_tokens becomes their count. "
        "Give them, or cpt_examples.",
    )
    cpt_tokens_type_mask: list[int] | None = option(
        None,
        "Type of each context token: 4i+1 input template, 4i+2 input, 4i+3 output template, 4i+4 label of "
        "example i (0: none); default all 1.",
    )
    cpt_mask: list[int] | None = option(None, "PEFT's cpt_mask (kept in its files; default all 1).")
    cpt_examples: int = option(
        0,
        "Build the context from this many training examples (rendered through the template, cycling through "
        "the labels) instead of cpt_token_ids; 0: use cpt_token_ids.",
    )
    opt_weighted_loss_type: str = option(
        "none",
        "Weights of the context's label tokens in the loss: none (all 1) or decay (opt_loss_decay_factor ** k "
        "for the k-th example counted back from the row's own label).",
        choices=LOSS_TYPES,
    )
    opt_loss_decay_factor: float = option(1.0, "Factor of the decay weighting (0 to 1).")
    opt_projection_epsilon: float = option(
        0.1, "Radius of the L2 ball each input token's update is projected onto after every step."
    )
    opt_projection_format_epsilon: float = option(
        0.1, "Radius of the L2 ball each template token's update is projected onto after every step."
    )

    def validate(self) -> None:
        check_int(self.cpt_examples, "cpt_examples", minimum=0, maximum=512)
        check_choice(self.opt_weighted_loss_type, "opt_weighted_loss_type", LOSS_TYPES)
        check_number(self.opt_loss_decay_factor, "opt_loss_decay_factor", minimum=0.0)
        if self.opt_loss_decay_factor > 1:
            raise OptionError("opt_loss_decay_factor", f"expected at most 1, got {self.opt_loss_decay_factor}")
        check_number(self.opt_projection_epsilon, "opt_projection_epsilon", minimum=0.0)
        check_number(self.opt_projection_format_epsilon, "opt_projection_format_epsilon", minimum=0.0)
        if self.cpt_token_ids is None:
            if not self.cpt_examples:
                raise OptionError(
                    "cpt_token_ids",
                    "required (the context's token ids), or cpt_examples to build it from training rows",
                )
            for name in ("cpt_tokens_type_mask", "cpt_mask"):
                if getattr(self, name) is not None:
                    raise OptionError(name, "given without cpt_token_ids (the tokens it marks)")
            super().validate()
            return
        ids = _int_list(self.cpt_token_ids, "cpt_token_ids", minimum=0)
        if not ids:
            raise OptionError("cpt_token_ids", "is empty; expected the token ids of at least one token")
        n = len(ids)
        for name in ("cpt_tokens_type_mask", "cpt_mask"):
            values = getattr(self, name)
            values = [1] * n if values is None else _int_list(values, name, minimum=0)
            if len(values) != n:
                raise OptionError(name, f"has {len(values)} entries but cpt_token_ids has {n}; expected one per token")
            setattr(self, name, values)
        self.cpt_token_ids = ids
        self.num_virtual_tokens = n
        super().validate()


def _int_list(values: Any, where: str, *, minimum: int) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise OptionError(where, f"expected a list of integers, got {values!r}")
    return [check_int(v, f"{where}[{i}]", minimum=minimum) for i, v in enumerate(values)]


def context_from_examples(
    examples: Sequence[Example], template: Template, count: int, tokenize: Callable[[str], list[int]]
) -> tuple[list[int], list[int]]:
    """``(token_ids, type_mask)`` of ``count`` labelled examples written out (see the module docstring)."""
    by_label: dict[str | None, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.target, []).append(example)
    if None in by_label:
        raise ConfigError("--cpt-examples: CPT's context shows labelled examples; the data needs a --label-column")
    queues = list(by_label.values())
    chosen: list[Example] = []
    while len(chosen) < min(count, len(examples)):  # one of each label in turn, in file order
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    ids: list[int] = []
    types: list[int] = []
    for i, example in enumerate(chosen):
        pieces = template.pieces(example.row)
        last_field = max((j for j, (_, is_field) in enumerate(pieces) if is_field), default=-1)
        for j, (text, is_field) in enumerate(pieces):
            kind = 2 if is_field else 3 if j > last_field else 1
            tokens = tokenize(text) if text else []
            ids += tokens
            types += [4 * i + kind] * len(tokens)
        # The separator is a template token of this example, so the context ends with types up to 4K, as
        # PEFT's loss wants: it types the input after the context as label 4K + 4.
        for text, kind in ((example.target or "", 4), (SEPARATOR, 1)):
            tokens = tokenize(text)
            ids += tokens
            types += [4 * i + kind] * len(tokens)
    return ids, types


class CPT(SoftPromptMethod):
    adds = "input"
    config_class = CPTConfig
    config: CPTConfig

    context: torch.Tensor
    trainable_rows: torch.Tensor
    epsilon: torch.Tensor

    def __init__(self, config: CPTConfig, shape: ModelShape):
        super().__init__(config, shape)
        if shape.is_encoder_decoder:
            raise ConfigError("method cpt: causal language models only (as PEFT's CPT)")
        if config.cpt_token_ids is None or config.cpt_tokens_type_mask is None:
            raise ConfigError("method cpt: needs its context: cpt_token_ids, or cpt_examples when training")
        n = config.num_virtual_tokens
        self.register_buffer("context", torch.zeros(n, shape.hidden_size))  # PEFT's frozen `embedding`
        self.delta = nn.Parameter(torch.zeros(n, shape.hidden_size))
        types = torch.tensor(config.cpt_tokens_type_mask)
        kind = torch.remainder(types, 4)
        self.register_buffer("trainable_rows", (kind != 0).float()[:, None], persistent=False)
        scale = math.sqrt(shape.hidden_size / 2048)
        epsilon = torch.full((n,), MIN_EPSILON)
        epsilon[(types > 0) & ((kind == 1) | (kind == 3))] = config.opt_projection_format_epsilon * scale
        epsilon[(types > 0) & (kind == 2)] = config.opt_projection_epsilon * scale
        self.register_buffer("epsilon", epsilon, persistent=False)

    @classmethod
    def create(
        cls,
        config: CPTConfig,
        shape: ModelShape,
        *,
        word_embeddings: nn.Embedding,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> CPT:
        adapter = cls(config, shape)
        ids = torch.tensor(config.cpt_token_ids, device=word_embeddings.weight.device)
        if int(ids.max()) >= word_embeddings.num_embeddings:
            raise ConfigError(
                f"cpt_token_ids: id {int(ids.max())} is outside the model's vocabulary "
                f"({word_embeddings.num_embeddings} tokens)"
            )
        with torch.no_grad():
            adapter.context.copy_(word_embeddings(ids).float().cpu())
        return adapter

    @classmethod
    def options_from_examples(
        cls,
        options: dict[str, Any],
        examples: Sequence[Example],
        template: Template,
        tokenize: Callable[[str], list[int]],
    ) -> dict[str, Any]:
        if options.get("cpt_token_ids") is not None:  # the context as given: its length is the prompt's
            return {**options, "num_virtual_tokens": len(options["cpt_token_ids"])}
        ids, types = context_from_examples(examples, template, options.get("cpt_examples") or 0, tokenize)
        return {**options, "cpt_token_ids": ids, "cpt_tokens_type_mask": types, "num_virtual_tokens": len(ids)}

    def input_embeddings(self, task: int | None = None) -> torch.Tensor:
        return self.context + self.delta * self.trainable_rows

    def prompt_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        types = torch.tensor(self.config.cpt_tokens_type_mask)
        is_label = (types > 0) & (torch.remainder(types, 4) == 0)
        targets = torch.where(is_label, torch.tensor(self.config.cpt_token_ids), -100)
        weights = torch.ones(len(types))
        if self.config.opt_weighted_loss_type == "decay":
            # The row's own label weighs 1; the context's labels, newest first, the factor's powers 1, 2, ...
            for k, label_type in enumerate(types[is_label].unique().flip(0).tolist(), start=1):
                weights[types == label_type] = self.config.opt_loss_decay_factor**k
        return targets, weights

    def after_step(self) -> None:
        with torch.no_grad():
            delta = self.delta * self.trainable_rows
            norm = delta.norm(dim=1)
            epsilon = self.epsilon.to(delta.device)
            scale = torch.where(norm > 0, epsilon / torch.maximum(norm, epsilon), torch.ones_like(norm))
            self.delta.copy_(delta * scale[:, None])

    def materialized(self) -> torch.Tensor:
        return self.input_embeddings().detach()

    def load_materialized(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.context.copy_(tensor.float())
            self.delta.zero_()

    def peft_config_fields(self) -> dict:
        c = self.config
        return {
            "cpt_token_ids": c.cpt_token_ids,
            "cpt_mask": c.cpt_mask,
            "cpt_tokens_type_mask": c.cpt_tokens_type_mask,
            "opt_weighted_loss_type": c.opt_weighted_loss_type,
            "opt_loss_decay_factor": c.opt_loss_decay_factor,
            "opt_projection_epsilon": c.opt_projection_epsilon,
            "opt_projection_format_epsilon": c.opt_projection_format_epsilon,
            "tokenizer_name_or_path": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        # PEFT's defaults where a field is absent (its config turns a missing context into [0]).
        fields = {
            "cpt_token_ids": peft.get("cpt_token_ids") or [0],
            "cpt_mask": peft.get("cpt_mask"),
            "cpt_tokens_type_mask": peft.get("cpt_tokens_type_mask"),
            "opt_weighted_loss_type": peft.get("opt_weighted_loss_type") or "none",
            "opt_loss_decay_factor": peft.get("opt_loss_decay_factor", 1.0),
            "opt_projection_epsilon": peft.get("opt_projection_epsilon", 0.1),
            "opt_projection_format_epsilon": peft.get("opt_projection_format_epsilon", 0.1),
        }
        return {**super().config_from_peft(peft), **fields}
