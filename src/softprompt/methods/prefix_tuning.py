"""Prefix tuning (Li & Liang, 2021): trainable keys and values of ``n`` virtual tokens at every layer.

Same semantics and file layout as PEFT's ``PREFIX_TUNING``: while training, an optional two-layer MLP
(``prefix_projection``) reparameterises the prefix for stability; the saved ``prompt_embeddings`` is the
materialised ``[n, layers * 2 * token_dim]`` table, so inference needs no MLP. Grouped-query models get
prefixes with their key/value head count, as PEFT does.

PEFT only starts the table at random (N(0, 1), far from the scale of any real key or value, so the
untrained prefix scrambles every layer's attention). softprompt can also start it from real
activations, as Li & Liang recommend: the keys and values the frozen model computes for a text
(``init: text``) or for sampled vocabulary tokens (``init: sample_vocab``, the default without a text
or projection MLP). A prefix started from a text is then exactly what prompt tuning started from the
same text gives the model's layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.methods.base import MethodConfig, SoftPromptMethod, repeat_to
from softprompt.options import OptionError, check_choice, check_int, option

INITS = ("random", "text", "sample_vocab")


@dataclass
class PrefixTuningConfig(MethodConfig):
    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    prefix_projection: bool = option(
        False, "Reparameterise the prefix with a two-layer MLP while training (materialised when saved)."
    )
    encoder_hidden_size: int | None = option(
        None, "Hidden width of the reparameterisation MLP (default: the prefix token width)."
    )
    init: str = option(
        "auto",
        "How to start the prefix: random (N(0, 1), as PEFT), text (the keys/values the frozen model computes "
        "for init_text), sample_vocab (the same for random vocabulary tokens), or auto (random with the "
        "projection MLP, else text when init_text is given, else sample_vocab).",
        choices=(*INITS, "auto"),
    )
    init_text: str | None = option(None, "Text whose keys/values (per layer) start the prefix.")

    def validate(self) -> None:
        super().validate()
        if self.init == "auto":
            # The MLP cannot start at given activations; otherwise real activations beat N(0, 1) by far
            # (docs/results.md, prefix tuning's init).
            if self.prefix_projection is not False:
                self.init = "random"
            else:
                self.init = "text" if self.init_text else "sample_vocab"
        check_choice(self.init, "init", INITS)
        if self.init == "text" and not self.init_text:
            raise OptionError("init_text", "required when init is 'text' (the text whose keys/values start the prefix)")
        if self.init != "random" and self.prefix_projection is True:
            raise OptionError(
                "init",
                f"{self.init!r} needs prefix_projection: false (the MLP's output cannot be "
                "set to given activations); use init: random with prefix_projection",
            )
        if not isinstance(self.prefix_projection, bool):
            raise OptionError("prefix_projection", f"expected true or false, got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None:
            check_int(self.encoder_hidden_size, "encoder_hidden_size", minimum=1, maximum=1 << 16)


class PrefixInit(Protocol):
    """The init fields of a method whose key/value prefix starts from the frozen model's activations."""

    num_virtual_tokens: int
    init: str
    init_text: str | None


def prefix_init_ids(config: PrefixInit, *, word_embeddings, tokenize, generator: torch.Generator) -> list[int]:
    """The tokens whose keys/values start a prefix (``init`` text or sample_vocab): ``init_text`` repeated or cut
    to ``num_virtual_tokens`` tokens, or that many vocabulary tokens drawn with ``generator``."""
    n = config.num_virtual_tokens
    if config.init == "text":
        assert config.init_text is not None  # the config's validation requires it for init: text
        return repeat_to(tokenize(config.init_text), n)
    return torch.randint(0, word_embeddings.num_embeddings, (n,), generator=generator).tolist()


def layer_rows(shape: ModelShape) -> list[int]:
    """Row of each layer's key in PEFT's ``[2L, heads, n, head_dim]`` view (its value is the next row).

    Encoder-decoder models: PEFT duplicates the 2L rows and hands layer l the group of four rows
    starting at 4l (self-attention key, value, then an unused cross-attention pair), so decoder layer l
    reads rows 4l and 4l + 1 modulo 2L. We keep that layout so PEFT files mean the same.
    """
    step = 4 if shape.is_encoder_decoder else 2
    return [(step * layer) % (2 * shape.num_layers) for layer in range(shape.num_layers)]


def table_from_kv(layers: list[tuple[torch.Tensor, torch.Tensor]], shape: ModelShape) -> torch.Tensor:
    """The flat ``[n, layers * 2 * token_dim]`` table whose `kv_prefix` gives back per-layer ``(key, value)``
    (``[kv_heads, n, head_dim]`` each). Encoder-decoder layers that share rows keep the later layer's."""
    n = layers[0][0].shape[1]
    table = torch.zeros(2 * shape.num_layers, shape.prefix_heads, n, shape.head_dim)
    for row, (key, value) in zip(layer_rows(shape), layers):
        table[row], table[row + 1] = key.float().cpu(), value.float().cpu()
    return table.permute(2, 0, 1, 3).reshape(n, -1)


def kv_from_table(table: torch.Tensor, shape: ModelShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)``, each ``[kv_heads, n, head_dim]``, of a flat ``[n, layers * 2 * token_dim]``
    table (the inverse of `table_from_kv`)."""
    n = table.shape[0]
    # PEFT: view [n, 2L, heads, head_dim] -> [2L, heads, n, head_dim]; layer l uses rows 2l (key), 2l+1 (value).
    rows = table.view(n, shape.num_layers * 2, shape.prefix_heads, shape.head_dim).permute(1, 2, 0, 3)
    return [(rows[r], rows[r + 1]) for r in layer_rows(shape)]


class PrefixTuning(SoftPromptMethod):
    adds = "kv"
    config_class = PrefixTuningConfig
    config: PrefixTuningConfig

    def __init__(self, config: PrefixTuningConfig, shape: ModelShape):
        super().__init__(config, shape)
        n, dim = config.num_virtual_tokens, shape.prefix_token_dim
        width = shape.num_layers * 2 * dim
        self.projected = config.prefix_projection
        if self.projected:
            hidden = config.encoder_hidden_size or dim
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            # nn.Embedding's N(0, 1) init, as PEFT.
            self.embedding = nn.Embedding(n, width)

    @classmethod
    def create(
        cls,
        config: PrefixTuningConfig,
        shape: ModelShape,
        *,
        word_embeddings,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> PrefixTuning:
        adapter = cls.seeded(config, shape, generator)
        if config.init == "random":
            return adapter
        ids = prefix_init_ids(config, word_embeddings=word_embeddings, tokenize=tokenize, generator=generator)
        with torch.no_grad():
            adapter.embedding.weight.copy_(table_from_kv(text_kv(ids), shape))
        return adapter

    def flat(self) -> torch.Tensor:
        """``[n, layers * 2 * token_dim]``: the prefix of every layer, keys and values interleaved as PEFT."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def kv_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return kv_from_table(self.flat(), self.shape)

    def materialized(self) -> torch.Tensor:
        return self.flat().detach()

    def load_materialized(self, tensor: torch.Tensor) -> None:
        # A loaded adapter is a plain table: the MLP (if any) was folded in when it was saved.
        self.projected = False
        if hasattr(self, "transform"):
            del self.transform
        self.embedding = nn.Embedding(tensor.shape[0], tensor.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.float())

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if "transform.0.weight" not in state and self.projected:
            self.load_materialized(state["embedding.weight"])
            return
        self.load_state_dict(state)

    def peft_config_fields(self) -> dict:
        return {
            "prefix_projection": self.config.prefix_projection,
            "encoder_hidden_size": self.config.encoder_hidden_size or self.shape.prefix_token_dim,
            "init_weights": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        return {
            **super().config_from_peft(peft),
            "prefix_projection": bool(peft.get("prefix_projection", False)),
            "encoder_hidden_size": peft.get("encoder_hidden_size"),
        }
