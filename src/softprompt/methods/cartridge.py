"""Cartridges (Eyuboglu et al., 2025): a key/value prefix stored directly as parameters.

Same semantics and file layout as PEFT's ``CARTRIDGE``: served like prefix tuning without its MLP (per-layer
keys and values of ``n`` virtual tokens, grouped-query models at their key/value head count) and saved as
the same ``[n, layers * 2 * token_dim]`` ``prompt_embeddings`` table, with ``num_frozen_tokens`` in
``adapter_config.json``. The first ``num_frozen_tokens`` virtual tokens are frozen: many models use their
first tokens as an attention sink, and the paper found training them destabilises the cartridge. They are
a buffer, not a parameter, so no optimizer (weight decay included) and no ``requires_grad_(True)`` can
move them.

PEFT starts the table at random (N(0, 1)) unless one of its helpers copies in the cache of a prefill; here
``init: text`` does that prefill (the keys/values the frozen model computes for ``init_text``, repeated or
cut to ``n`` tokens), ``init: sample_vocab`` the same for random vocabulary tokens (the default without a
text), and `Cartridge.load_kv` takes any other cache, e.g. of a long document's first ``n`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.methods.prefix_tuning import INITS, kv_from_table, prefix_init_ids, table_from_kv
from softprompt.options import OptionError, check_choice, check_int, option


@dataclass
class CartridgeConfig(MethodConfig):
    method = "cartridge"
    peft_type = "CARTRIDGE"

    num_frozen_tokens: int = option(
        1,
        "Leading virtual tokens kept frozen (an attention sink, as the paper recommends); 0 to num_virtual_tokens - 1.",
    )
    init: str = option(
        "auto",
        "As prefix_tuning's: random, text, sample_vocab, or auto (text when init_text is given, else sample_vocab).",
        choices=(*INITS, "auto"),
    )
    init_text: str | None = option(None, "Text whose keys/values (per layer) start the cartridge.")

    def validate(self) -> None:
        super().validate()
        check_int(self.num_frozen_tokens, "num_frozen_tokens", minimum=0, maximum=self.num_virtual_tokens - 1)
        if self.init == "auto":
            self.init = "text" if self.init_text else "sample_vocab"
        check_choice(self.init, "init", INITS)
        if self.init == "text" and not self.init_text:
            raise OptionError(
                "init_text", "required when init is 'text' (the text whose keys/values start the cartridge)"
            )


class Cartridge(SoftPromptMethod):
    adds = "kv"
    config_class = CartridgeConfig
    config: CartridgeConfig

    frozen: torch.Tensor

    def __init__(self, config: CartridgeConfig, shape: ModelShape):
        super().__init__(config, shape)
        n, frozen = config.num_virtual_tokens, config.num_frozen_tokens
        table = torch.randn(n, shape.num_layers * 2 * shape.prefix_token_dim)  # N(0, 1), as PEFT
        self.register_buffer("frozen", table[:frozen].clone())
        self.trainable = nn.Parameter(table[frozen:].clone())

    @classmethod
    def create(
        cls,
        config: CartridgeConfig,
        shape: ModelShape,
        *,
        word_embeddings,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> Cartridge:
        adapter = cls.seeded(config, shape, generator)
        if config.init == "random":
            return adapter
        ids = prefix_init_ids(config, word_embeddings=word_embeddings, tokenize=tokenize, generator=generator)
        adapter.load_kv(text_kv(ids))
        return adapter

    def table(self) -> torch.Tensor:
        """``[n, layers * 2 * token_dim]``: frozen rows then trainable ones, in PEFT's layout."""
        return torch.cat([self.frozen, self.trainable], dim=0)

    def kv_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return kv_from_table(self.table(), self.shape)

    def load_kv(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start from a cache: per layer ``(key, value)``, each ``[kv_heads, n, head_dim]`` (for a transformers
        ``DynamicCache`` of one sequence: ``[(l.keys[0, :, :n], l.values[0, :, :n]) for l in cache.layers]``)."""
        self.load_materialized(table_from_kv(layers, self.shape))

    def materialized(self) -> torch.Tensor:
        return self.table().detach()

    def load_materialized(self, tensor: torch.Tensor) -> None:
        frozen = self.config.num_frozen_tokens
        with torch.no_grad():
            self.frozen.copy_(tensor[:frozen].float())
            self.trainable.copy_(tensor[frozen:].float())

    def training_state(self) -> dict[str, torch.Tensor]:
        # One table, equal to the saved weights, so the adapter file does not keep a second copy of it.
        return {"table": self.materialized().clone()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_materialized(state["table"])

    def peft_config_fields(self) -> dict:
        return {"num_frozen_tokens": self.config.num_frozen_tokens}

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        # PEFT's default when the field is absent.
        return {**super().config_from_peft(peft), "num_frozen_tokens": int(peft.get("num_frozen_tokens", 1))}
