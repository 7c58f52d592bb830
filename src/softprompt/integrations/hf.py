"""Training a softprompt adapter with transformers' `Trainer` or TRL's `SFTTrainer`.

    model = softprompt.load("smollm2-135m")
    model.add_adapter("sft", method="prompt_tuning", num_virtual_tokens=8)
    trainable = TrainableAdapter(model, "sft")
    trainer = Trainer(model=trainable, args=..., train_dataset=..., callbacks=[SaveAdapterCallback()])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
    trainable.save_pretrained("out/sft")  # PEFT's layout: adapter_config.json + adapter_model.safetensors

Why a wrapper and not the `SoftPromptModel` itself: the trainers call ``model(**batch)`` with no adapter
names, read ``.loss`` from a dict-like output, and save ``model.state_dict()`` when the model is not a
`PreTrainedModel`. `TrainableAdapter` binds one adapter, returns a transformers `ModelOutput`, and its state
dict is that adapter's trainable tensors only, so a checkpoint's ``model.safetensors`` holds kilobytes
(never the frozen base, whose tied embeddings safetensors would refuse), and `Trainer`'s own reloading of a
non-`PreTrainedModel` (``resume_from_checkpoint``, ``load_best_model_at_end``) restores exactly the adapter.
`SaveAdapterCallback` adds PEFT's files to every checkpoint, so any ``checkpoint-N`` loads in PEFT too.

Virtual tokens never enter the sequence: they live in the key/value prefix, so the logits and hidden states
the trainers see have the text's own length (PEFT's prompt learning prepends them, which breaks the label
shapes TRL expects).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from softprompt.adapters.peft_format import load_adapter, save_adapter
from softprompt.engine.model import SoftPromptModel
from softprompt.errors import SoftPromptError


class _PromptedBackbone:
    """What TRL's fused LM head calls as ``model.base_model``: the text's hidden states after the prompt."""

    def __init__(self, model: SoftPromptModel, name: str):
        self.model = model
        self.name = name

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_ignored,
    ) -> BaseModelOutput:
        # ``use_cache`` and the like arrive here too; the engine builds its own cache.
        if attention_mask is None and position_ids is not None:
            raise SoftPromptError(
                "padding-free or packed batches are not supported: every row needs its own "
                "prompt; set padding_free=False and packing=False"
            )
        hidden = self.model.text_hidden_states(input_ids, attention_mask, adapters=self.name)
        return BaseModelOutput(last_hidden_state=hidden)


class TrainableAdapter(nn.Module):
    """One adapter of a `SoftPromptModel`, shaped for transformers' `Trainer` and TRL's `SFTTrainer`.

    Only the adapter's parameters train (the base model is frozen); its state dict is the adapter's tensors.
    """

    main_input_name = "input_ids"
    # `forward` returns the mean loss over label tokens, so `Trainer` scales it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, model: SoftPromptModel, name: str):
        super().__init__()
        self.model = model
        self.adapter_name = name
        self.adapter = model.get_adapter(name)  # raises, naming the loaded adapters, when there is none

    @classmethod
    def from_pretrained(cls, model: SoftPromptModel, path: str | Path, name: str | None = None) -> TrainableAdapter:
        """Load a saved adapter (with its training state, so reparameterised adapters continue exactly) to train
        further."""
        adapter = load_adapter(model, path, name=name, resume=True)
        return cls(model, next(n for n, a in model.adapters.items() if a is adapter))

    # ------------------------------------------------------------------ what the trainers call
    @property
    def config(self):
        return self.model.base.config

    @property
    def generation_config(self):
        return self.model.base.generation_config

    @property
    def base_model(self) -> _PromptedBackbone:
        return _PromptedBackbone(self.model, self.adapter_name)

    def _transformers_base(self) -> PreTrainedModel:
        base = self.model.base
        assert isinstance(base, PreTrainedModel)  # SoftPromptModel holds it as a plain nn.Module
        return base

    def get_input_embeddings(self) -> nn.Module:
        return self._transformers_base().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self._transformers_base().get_output_embeddings()

    def add_model_tags(self, tags: list[str] | str) -> None:
        """TRL tags the models it trains for their hub card; an adapter's card is written when it is pushed
        (`softprompt.adapters.hub`), so the tags are not kept."""

    def activation_checkpointing_enable(self, **_options) -> None:
        """``gradient_checkpointing=True`` in the training arguments: the engine's own checkpointing of the blocks
        (non-reentrant, the frozen base kept in eval mode; `softprompt.engine.checkpointing`), whatever the options."""
        self.model.gradient_checkpointing = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """The adapter's loss over label tokens (``labels`` align with ``input_ids``, -100 = no loss); without
        labels, the text's logits. ``task_ids``: each row's task of a multitask adapter (a data set column of that
        name reaches here, as in PEFT). ``use_cache`` is accepted for the trainers and ignored."""
        out = self.model(
            input_ids,
            attention_mask,
            adapters=self.adapter_name,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            task_ids=task_ids,
        )
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    # ------------------------------------------------------------------ saving and loading
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.adapter.state_dict(destination=destination, prefix=prefix + "adapter.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {k[len("adapter.") :]: v for k, v in state_dict.items() if k.startswith("adapter.")}
        others = [k for k in state_dict if not k.startswith("adapter.")]
        if strict and others:
            raise SoftPromptError(f"not this adapter's weights: {', '.join(others[:5])}")
        result = self.adapter.load_state_dict(own, strict=strict, assign=assign)
        result.unexpected_keys.extend(others)
        return result

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the adapter in PEFT's layout (plus softprompt's files), loadable by ``peft.PeftModel.from_pretrained``
        and ``SoftPromptModel.load_adapter``. Other files in the directory are kept."""
        save_adapter(self.model, self.adapter_name, save_directory)


class SaveAdapterCallback(TrainerCallback):
    """Add PEFT's adapter files to every checkpoint the trainer writes, so each ``checkpoint-N`` loads in PEFT."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and isinstance(model, TrainableAdapter):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                model.save_pretrained(folder)
        return control
