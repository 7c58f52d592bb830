"""The models a run uses: smollm2-135m (full mode) or a tiny random Llama built in-process (quick mode).

Both systems under test wrap the *same* frozen base model object: softprompt's `SoftPromptModel` and
PEFT's `PeftModel` (one per method family, since PEFT cannot hold prompt- and prefix-tuning adapters in
one model). Every PEFT adapter is loaded from the files softprompt saved for the matching adapter, so
both start from identical weights (and the first loss of a training step is checked to agree).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

TINY = "tiny-llama"
PEFT_TYPES = {"prompt_tuning": "prompt", "p_tuning": "prompt", "prefix_tuning": "prefix"}


# ------------------------------------------------------------------------------------------ tiny model
@functools.cache
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tiny_llama(seed: int = 0):
    """A 2-layer Llama with grouped-query attention and a byte-level tokenizer (as tests/tiny.py), no I/O."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    base = LlamaForCausalLM(config).eval()
    return base, tokenizer


# ------------------------------------------------------------------------------------------ loading
def model_path(name: str) -> str:
    """A built-in name (e.g. smollm2-135m) becomes its local converted checkpoint; a directory passes."""
    from softprompt.models.loading import resolve_model_path

    return resolve_model_path(name)


def load_base(source: str):
    """``(base model in float32, eval mode, frozen; tokenizer)`` for TINY or a checkpoint directory."""
    if source == TINY:
        base, tokenizer = tiny_llama()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    base.requires_grad_(False)
    return base, tokenizer


# ------------------------------------------------------------------------------------------ both systems
@dataclass
class Systems:
    """One base model, softprompt around it, and PEFT models around it, with matching adapters."""

    base: torch.nn.Module
    tokenizer: object
    ours: object  # softprompt.SoftPromptModel
    peft: dict = field(default_factory=dict)  # "prompt" / "prefix" -> PeftModel
    _tmp: tempfile.TemporaryDirectory = field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="spbench-"))

    @classmethod
    def build(cls, source: str) -> Systems:
        from softprompt import SoftPromptModel

        base, tokenizer = load_base(source)
        return cls(base, tokenizer, SoftPromptModel(base, tokenizer, name_or_path=source))

    def add(
        self,
        name: str,
        method: str,
        num_virtual_tokens: int,
        *,
        peft: bool = True,
        trainable: bool = False,
        seed: int = 0,
        **config,
    ) -> None:
        """Add adapter ``name`` to softprompt and (``peft``) the same weights to PEFT under the same name."""
        self.ours.add_adapter(name, method=method, num_virtual_tokens=num_virtual_tokens, seed=seed, **config)
        if peft:
            self.copy_to_peft(name, trainable=trainable)

    def copy_to_peft(self, name: str, *, trainable: bool = False) -> None:
        from peft import PeftModel

        path = Path(self._tmp.name) / name
        self.ours.save_adapter(name, str(path))
        kind = PEFT_TYPES[self.ours.adapters[name].config.method]
        if kind not in self.peft:
            self.peft[kind] = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.peft[kind].load_adapter(str(path), adapter_name=name)
        model = self.peft[kind]
        model.eval()
        if trainable:
            # PEFT refuses `is_trainable=True` for prompt-learning files; make it what `get_peft_model`
            # would have built for training: the adapter's parameters trainable, not in inference mode.
            model.peft_config[name].inference_mode = False
            for param in model.prompt_encoder[name].parameters():
                param.requires_grad_(True)

    def peft_for(self, name: str):
        """The PeftModel holding adapter ``name``, switched to it."""
        for model in self.peft.values():
            if name in model.peft_config:
                model.set_adapter(name)
                return model
        raise KeyError(name)

    def peft_params(self, name: str) -> list[torch.nn.Parameter]:
        model = self.peft_for(name)
        return list(model.prompt_encoder[name].parameters())

    def ours_params(self, name: str) -> list[torch.nn.Parameter]:
        return list(self.ours.adapters[name].parameters())


def describe_model(base) -> dict:
    cfg = base.config
    return {
        "model_type": cfg.model_type,
        "parameters": sum(p.numel() for p in base.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }
