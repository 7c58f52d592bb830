"""`softprompt.load`: a base model from a built-in name, a local directory or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from softprompt.engine.model import SoftPromptModel
from softprompt.errors import SoftPromptError
from softprompt.models.builtin import resolve_builtin
from softprompt.models.names import BUILTIN_HUB_IDS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_model_path(name: str) -> str:
    """A built-in name becomes its local cached checkpoint; anything else passes through."""
    if name in BUILTIN_HUB_IDS:
        return str(resolve_builtin(name))
    return name


def load(name: str, *, dtype: str | torch.dtype | None = None, device: str | None = None) -> SoftPromptModel:
    """Load a frozen base model and its tokenizer, ready for adapters.

    ``name``: a built-in name (``softprompt models`` lists them), a local checkpoint directory or a
    Hugging Face hub id. Remote code is never executed (``trust_remote_code`` is always off).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SoftPromptError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    path = resolve_model_path(name)
    local = Path(path)
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise SoftPromptError(f"--model {name!r}: no such local directory, and not a hub id or built-in name")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        base = cls.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise SoftPromptError(f"--model {name!r}: could not load a model there ({str(exc).splitlines()[0]})") from None
    if device:
        base.to(device)
    return SoftPromptModel(base, tokenizer, name_or_path=name)
