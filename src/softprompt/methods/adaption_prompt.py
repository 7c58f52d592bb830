"""Adaption prompts (LLaMA-Adapter, Zhang et al., 2023): learned prompts attended through a zero-initialised gate.

Same semantics and file layout as PEFT's ``ADAPTION_PROMPT``. Each of the top ``adapter_layers`` layers has
its own prompt of ``num_virtual_tokens`` vectors (PEFT's ``adapter_len``) in the hidden space and a scalar
gate. The layer projects the prompt through its own key and value projections (no rotary position), every
text query attends to those keys in a softmax of their own, and the result, times the gate, is added to the
layer's attention output. The gate starts at zero, so a new adapter is exactly the base model and training
moves away from it smoothly. Nothing enters the key/value cache: the engine adds the gated term in its
attention function at every step (``adds = "gated"``, `softprompt.engine.gated`).

Supported families are those with a `GatedAttention` row in `softprompt.engine.families` (PEFT's: Llama,
Mistral, GPT-2). Saved as PEFT saves it: ``adapter_config.json`` with ``adapter_len``, ``adapter_layers`` and
``target_modules``; per adapted layer ``...<attention>.adaption_prompt`` ``[1, n, hidden]`` and
``...<attention>.adaption_gate`` ``[1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompt.engine.families import GatedAttention, ModelShape, gated_families, quirks_for
from softprompt.errors import AdapterMismatchError, ConfigError, SoftPromptError
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.options import check_int, option


@dataclass
class AdaptionPromptConfig(MethodConfig):
    method = "adaption_prompt"
    peft_type = "ADAPTION_PROMPT"

    adapter_layers: int = option(
        1, "How many of the top layers get a gated prompt (PEFT's adapter_layers; at most the model's layer count)."
    )

    def validate(self) -> None:
        super().validate()
        check_int(self.adapter_layers, "adapter_layers", minimum=1)


def gated_spec(model_type: str) -> GatedAttention:
    """The family's `GatedAttention` row; a `SoftPromptError` naming the supported families if it has none."""
    spec = quirks_for(model_type).gated
    if spec is None:
        raise SoftPromptError(
            f"adaption_prompt: model family {model_type!r} is not supported; supported families: "
            f"{', '.join(gated_families())}"
        )
    return spec


class AdaptionPrompt(SoftPromptMethod):
    adds = "gated"
    config_class = AdaptionPromptConfig
    config: AdaptionPromptConfig

    def __init__(self, config: AdaptionPromptConfig, shape: ModelShape):
        super().__init__(config, shape)
        self.spec = gated_spec(shape.model_type)
        if config.adapter_layers > shape.num_layers:
            raise ConfigError(f"adapter_layers: {config.adapter_layers} exceeds the model's {shape.num_layers} layers")
        layers, n = config.adapter_layers, config.num_virtual_tokens
        # N(0, 1) prompts, as PEFT and the paper's official code; the gates start at zero ("zero-init attention").
        self.prompts = nn.Parameter(torch.randn(layers, n, shape.hidden_size))
        self.gates = nn.Parameter(torch.zeros(layers))

    @classmethod
    def create(
        cls,
        config: AdaptionPromptConfig,
        shape: ModelShape,
        *,
        word_embeddings,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> AdaptionPrompt:
        return cls.seeded(config, shape, generator)

    @property
    def first_layer(self) -> int:
        return self.shape.num_layers - self.config.adapter_layers

    def gated_prompts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {self.first_layer + i: (self.prompts[i], self.gates[i : i + 1]) for i in range(len(self.prompts))}

    def _peft_key(self, layer: int, what: str) -> str:
        blocks = quirks_for(self.shape.model_type).blocks[0]
        return f"base_model.model.{blocks}.{layer}.{self.spec.attention}.adaption_{what}"

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (prompt, gate) in self.gated_prompts().items():
            out[self._peft_key(layer, "prompt")] = prompt.detach()[None]
            out[self._peft_key(layer, "gate")] = gate.detach()
        return out

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        n, hidden = self.config.num_virtual_tokens, self.shape.hidden_size
        with torch.no_grad():
            for i, layer in enumerate(self.gated_prompts()):
                for what, param, shape in (("prompt", self.prompts, (1, n, hidden)), ("gate", self.gates, (1,))):
                    key = self._peft_key(layer, what)
                    if key not in tensors:
                        raise SoftPromptError(f"{source}: no {key!r} tensor (an adaption prompt for this model)")
                    if tuple(tensors[key].shape) != shape:
                        raise AdapterMismatchError(
                            f"{source}: {key} has shape {tuple(tensors[key].shape)}, this model needs {shape}"
                        )
                    param[i].copy_(tensors[key].reshape(shape[1:]).float())

    def training_state(self) -> dict[str, torch.Tensor]:
        # The PEFT weights file holds every parameter exactly: no second copy to resume from.
        return {}

    def peft_config_fields(self) -> dict:
        return {
            "adapter_len": self.config.num_virtual_tokens,
            "adapter_layers": self.config.adapter_layers,
            "target_modules": self.spec.attention,
        }

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        return {"num_virtual_tokens": int(peft["adapter_len"]), "adapter_layers": int(peft["adapter_layers"])}
