"""Model-family quirks, in one table.

Everything the engine needs to know about an architecture is read from its config through
`ModelShape.from_config`; the few things that cannot be read generically live in `FAMILY_QUIRKS`,
keyed by `config.model_type`. Adding a family means adding a row here, not `if` chains elsewhere.
`CacheArg` reads, from a model's forward, how that transformers release names the key/value cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from softprompt.errors import SoftPromptError


@dataclass(frozen=True)
class GatedAttention:
    """Where an adaption prompt (`softprompt.methods.adaption_prompt`) meets a family's attention, as PEFT's
    ``TRANSFORMERS_MODEL_CONFIG`` says: the prompt's keys and values come from the layer's own projections."""

    # The attention submodule of a block (under `FamilyQuirks.blocks`), and its key and value projections.
    attention: str
    key: str
    # None: ``key`` is a fused query/key/value projection whose output splits in three (GPT-2's c_attn).
    value: str | None
    # PEFT adds the gated output after this output projection, unprojected (GPT-2), instead of before it.
    added_after: str | None = None


@dataclass(frozen=True)
class FamilyQuirks:
    # Rotary / learned absolute positions take explicit position ids. ALiBi models (Bloom) derive
    # positions from the attention mask instead and have no `position_ids` argument.
    takes_position_ids: bool = True
    # Config attribute holding a final tanh soft-cap on the logits (Gemma), applied where we compute
    # logits ourselves (the training forward only projects label positions).
    logit_softcap_attr: str | None = None
    # Encoder-decoder families put input soft prompts on the encoder and KV prefixes on the
    # decoder's self-attention, exactly as PEFT does.
    encoder_decoder: bool = False
    # Encoder-decoder: the LM head reads the decoder's output times d_model ** -0.5 when the config ties the embeddings
    # (T5's ``scale_decoder_outputs``), so the training forward can project only label positions (engine/seq2seq.py).
    decoder_output_scaled: bool = False
    # Paths (from the `*ForCausalLM` / `*ForConditionalGeneration` model) of the module lists holding
    # the transformer blocks: the units FSDP shards one at a time (`softprompt.training.distributed.fsdp_units`).
    # Empty: the family cannot be sharded (FSDP launches refuse it with a clear error).
    blocks: tuple[str, ...] = ()
    # How adaption prompts attend in this family; None: the method does not support it.
    gated: GatedAttention | None = None


FAMILY_QUIRKS: dict[str, FamilyQuirks] = {
    "gpt2": FamilyQuirks(blocks=("transformer.h",), gated=GatedAttention("attn", "c_attn", None, added_after="c_proj")),
    "llama": FamilyQuirks(blocks=("model.layers",), gated=GatedAttention("self_attn", "k_proj", "v_proj")),
    "mistral": FamilyQuirks(blocks=("model.layers",), gated=GatedAttention("self_attn", "k_proj", "v_proj")),
    "qwen2": FamilyQuirks(blocks=("model.layers",)),
    "gemma": FamilyQuirks(blocks=("model.layers",)),
    "gemma2": FamilyQuirks(logit_softcap_attr="final_logit_softcapping", blocks=("model.layers",)),
    "gemma3_text": FamilyQuirks(logit_softcap_attr="final_logit_softcapping", blocks=("model.layers",)),
    "bloom": FamilyQuirks(takes_position_ids=False, blocks=("transformer.h",)),
    "t5": FamilyQuirks(encoder_decoder=True, decoder_output_scaled=True, blocks=("encoder.block", "decoder.block")),
    "mt5": FamilyQuirks(encoder_decoder=True, decoder_output_scaled=True, blocks=("encoder.block", "decoder.block")),
}


def _first_attr(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class ModelShape:
    """The numbers an adapter must agree with. Saved in every adapter and checked on load."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    is_encoder_decoder: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
        layers = _first_attr(config, ("num_hidden_layers", "n_layer", "num_layers"))
        heads = _first_attr(config, ("num_attention_heads", "n_head", "num_heads"))
        if hidden is None or layers is None or heads is None:
            raise SoftPromptError(
                f"model type {config.model_type!r}: could not read hidden size, layer count and head count "
                "from its config; add the family to softprompt.engine.families.FAMILY_QUIRKS"
            )
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            model_type=config.model_type,
            hidden_size=int(hidden),
            num_layers=int(layers),
            num_attention_heads=int(heads),
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(config.vocab_size),
            is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        )

    @property
    def prefix_heads(self) -> int:
        """Heads of a KV prefix: the key/value heads (grouped-query attention stores fewer)."""
        return self.num_key_value_heads

    @property
    def prefix_token_dim(self) -> int:
        """Width of one layer's key (or value) for one virtual token, as PEFT's `token_dim` for prefixes."""
        return self.head_dim * self.num_key_value_heads


def gated_families() -> list[str]:
    """The families adaption prompts support."""
    return [name for name, quirks in FAMILY_QUIRKS.items() if quirks.gated is not None]


def quirks_for(model_type: str) -> FamilyQuirks:
    """The quirks row of a family; unknown decoder-only families get the common defaults."""
    return FAMILY_QUIRKS.get(model_type, FamilyQuirks())


@dataclass(frozen=True)
class CacheArg:
    """The name a model's forward takes its key/value cache by, and returns it under.

    transformers 5.25 renamed ``past_key_values`` to ``cache`` (keyword and output field); the old keyword still
    works there with a FutureWarning until 5.40, and older releases (and remote-code models that kept it) know only
    ``past_key_values``. Read once per model from the forward's signature, never from version numbers.
    """

    name: str

    @classmethod
    def of(cls, forward: Callable[..., Any]) -> CacheArg:
        """The cache name of ``forward`` (a module's bound ``forward``): ``cache`` where its signature has it."""
        return cls("cache" if "cache" in inspect.signature(forward).parameters else "past_key_values")

    def kwargs(self, cache: Any) -> dict[str, Any]:
        """Keyword arguments that pass ``cache`` to the forward."""
        return {self.name: cache}

    def read(self, output: Any) -> Any:
        """The cache a forward returned in ``output``."""
        return getattr(output, self.name)
