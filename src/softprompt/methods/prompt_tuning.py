"""Prompt tuning (Lester et al., 2021): ``n`` trainable embeddings placed before the input.

Same semantics and file layout as PEFT's ``PROMPT_TUNING``: the table is initialised from text
(repeated or cut to ``n`` tokens), from randomly sampled vocabulary embeddings, or at random, and is
saved as ``prompt_embeddings`` (``[n * submodules, hidden]``; encoder-decoder models keep PEFT's
unused second copy so files load in PEFT unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.methods.base import MethodConfig, SoftPromptMethod, repeat_to
from softprompt.options import OptionError, check_choice, option

INITS = ("text", "sample_vocab", "random")


@dataclass
class PromptTuningConfig(MethodConfig):
    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    init: str = option(
        "auto",
        "How to start the virtual tokens: text (embeddings of init_text), sample_vocab (embeddings of random "
        "vocabulary tokens), random (N(0, 1), as PEFT's RANDOM), or auto (text when init_text is given, else "
        "sample_vocab).",
        choices=(*INITS, "auto"),
    )
    init_text: str | None = option(None, "Text whose token embeddings start the prompt (repeated or cut to fit).")

    def validate(self) -> None:
        super().validate()
        if self.init == "auto":
            self.init = "text" if self.init_text else "sample_vocab"
        check_choice(self.init, "init", INITS)
        if self.init == "text" and not self.init_text:
            raise OptionError("init_text", "required when init is 'text' (the text whose embeddings start the prompt)")


def init_from_text(word_embeddings: nn.Embedding, token_ids: list[int], n: int) -> torch.Tensor:
    """Embeddings of ``token_ids`` repeated or cut to ``n`` rows (PEFT's TEXT init)."""
    ids = repeat_to(token_ids, n)
    weight = word_embeddings.weight
    with torch.no_grad():
        return word_embeddings(torch.tensor(ids, device=weight.device)).detach().float().cpu().clone()


def init_from_vocab(word_embeddings: nn.Embedding, n: int, generator: torch.Generator) -> torch.Tensor:
    """Embeddings of ``n`` uniformly sampled vocabulary tokens (PEFT's SAMPLE_VOCAB init)."""
    ids = torch.randint(0, word_embeddings.num_embeddings, (n,), generator=generator)
    with torch.no_grad():
        return word_embeddings(ids.to(word_embeddings.weight.device)).detach().float().cpu().clone()


def init_random(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Standard-normal rows, as ``nn.Embedding``'s default (PEFT's RANDOM init)."""
    return torch.randn(n, dim, generator=generator)


class PromptTuning(SoftPromptMethod):
    adds = "input"
    config_class = PromptTuningConfig
    config: PromptTuningConfig

    def __init__(self, config: PromptTuningConfig, shape: ModelShape, weight: torch.Tensor | None = None):
        super().__init__(config, shape)
        rows = config.num_virtual_tokens * self.submodules
        if weight is None:
            weight = torch.zeros(rows, shape.hidden_size)
        self.embedding = nn.Parameter(weight.float().clone())

    @classmethod
    def create(
        cls,
        config: PromptTuningConfig,
        shape: ModelShape,
        *,
        word_embeddings: nn.Embedding,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> PromptTuning:
        rows = config.num_virtual_tokens * (2 if shape.is_encoder_decoder else 1)
        if config.init == "text":
            weight = init_from_text(word_embeddings, tokenize(config.init_text), rows)
        elif config.init == "sample_vocab":
            weight = init_from_vocab(word_embeddings, rows, generator)
        else:
            weight = init_random(rows, shape.hidden_size, generator)
        return cls(config, shape, weight)

    def input_embeddings(self, task: int | None = None) -> torch.Tensor:
        return self.embedding[: self.num_virtual_tokens]

    def materialized(self) -> torch.Tensor:
        return self.embedding.detach()

    def load_materialized(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.copy_(tensor.float())

    def peft_config_fields(self) -> dict:
        text_init = self.config.init == "text"
        return {
            "prompt_tuning_init": {"text": "TEXT", "sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[
                self.config.init
            ],
            "prompt_tuning_init_text": self.config.init_text if text_init else None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        init = {"TEXT": "text", "SAMPLE_VOCAB": "sample_vocab"}.get(str(peft.get("prompt_tuning_init")), "random")
        if init == "text" and not peft.get("prompt_tuning_init_text"):
            init = "random"
        return {**super().config_from_peft(peft), "init": init, "init_text": peft.get("prompt_tuning_init_text")}
