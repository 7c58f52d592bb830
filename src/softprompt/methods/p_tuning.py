"""P-tuning (Liu et al., 2021): virtual token embeddings produced by a small prompt encoder.

Same semantics and file layout as PEFT's ``P_TUNING``: an embedding table fed through an MLP (or a
bidirectional LSTM plus MLP) while training; the saved ``prompt_embeddings`` is the encoder's output
(``[n * submodules, hidden]``), so a loaded adapter is a plain table that costs nothing to apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.options import check_choice, check_int, check_number, option

ENCODERS = ("mlp", "lstm")


@dataclass
class PTuningConfig(MethodConfig):
    method = "p_tuning"
    peft_type = "P_TUNING"

    encoder_type: str = option(
        "mlp", "Prompt encoder: mlp (3 layers) or lstm (bidirectional LSTM + MLP).", choices=ENCODERS
    )
    encoder_hidden_size: int | None = option(None, "Hidden width of the prompt encoder (default: model width).")
    encoder_num_layers: int = option(2, "LSTM layers (the MLP always has 3 layers, as PEFT).")
    encoder_dropout: float = option(0.0, "Dropout between LSTM layers.")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.encoder_type, str):
            self.encoder_type = self.encoder_type.lower()
        check_choice(self.encoder_type, "encoder_type", ENCODERS)
        if self.encoder_hidden_size is not None:
            check_int(self.encoder_hidden_size, "encoder_hidden_size", minimum=1, maximum=1 << 16)
        check_int(self.encoder_num_layers, "encoder_num_layers", minimum=1, maximum=16)
        check_number(self.encoder_dropout, "encoder_dropout", minimum=0.0, below=1.0)


class PTuning(SoftPromptMethod):
    adds = "input"
    config_class = PTuningConfig
    config: PTuningConfig

    def __init__(self, config: PTuningConfig, shape: ModelShape):
        super().__init__(config, shape)
        dim = shape.hidden_size
        hidden = config.encoder_hidden_size or dim
        self.embedding = nn.Embedding(config.num_virtual_tokens * self.submodules, dim)
        self.encoded = True
        if config.encoder_type == "lstm":
            self.lstm_head = nn.LSTM(
                dim,
                hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    @classmethod
    def create(
        cls,
        config: PTuningConfig,
        shape: ModelShape,
        *,
        word_embeddings,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> PTuning:
        return cls.seeded(config, shape, generator)

    def _all_rows(self) -> torch.Tensor:
        if not self.encoded:
            return self.embedding.weight
        x = self.embedding.weight.unsqueeze(0)
        if self.config.encoder_type == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def input_embeddings(self, task: int | None = None) -> torch.Tensor:
        return self._all_rows()[: self.num_virtual_tokens]

    def materialized(self) -> torch.Tensor:
        # Dropout (LSTM encoder) must not leak into the saved table, whatever mode training left us in.
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._all_rows().detach()
        finally:
            self.train(was_training)

    def load_materialized(self, tensor: torch.Tensor) -> None:
        self.encoded = False
        for name in ("lstm_head", "mlp_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.embedding = nn.Embedding(tensor.shape[0], tensor.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.float())

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if "mlp_head.0.weight" not in state and self.encoded:
            self.load_materialized(state["embedding.weight"])
            return
        self.load_state_dict(state)

    def peft_config_fields(self) -> dict:
        return {
            "encoder_reparameterization_type": self.config.encoder_type.upper(),
            "encoder_hidden_size": self.config.encoder_hidden_size or self.shape.hidden_size,
            "encoder_num_layers": self.config.encoder_num_layers,
            "encoder_dropout": self.config.encoder_dropout,
        }

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        return {
            **super().config_from_peft(peft),
            "encoder_type": str(peft.get("encoder_reparameterization_type", "MLP")).lower(),
            "encoder_hidden_size": peft.get("encoder_hidden_size"),
            "encoder_num_layers": int(peft.get("encoder_num_layers", 2)),
            "encoder_dropout": float(peft.get("encoder_dropout", 0.0)),
        }
