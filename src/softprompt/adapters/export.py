"""Export soft prompts for other inference engines: vLLM's prompt-embeddings input.

An input-method adapter (prompt tuning, P-tuning) is nothing but ``n`` vectors placed before the
input's token embeddings, so any engine that accepts prompt *embeddings* can serve it unchanged: the
request's embeddings are ``concat(soft_prompt [n, hidden], embed_tokens(text) [L, hidden])``. That is
exactly what softprompt computes: virtual tokens take positions ``0..n-1``, the text (with its usual
special tokens, e.g. BOS) follows at ``n``.

Prefix tuning and cartridges cannot be exported this way: they add keys and values at *every* layer, which
no input-embedding sequence can reproduce; nor can adaption prompts, which add gated attention inside
layers. Serve them with ``softprompt serve``.

Files written by `export_prompt_embeddings`:

* ``*.safetensors``: one tensor ``prompt_embeds`` ``[n, hidden]`` plus string metadata (method,
  num_virtual_tokens, hidden_size, base_model, dtype, format);
* ``*.pt``: the bare tensor saved with ``torch.save``, the form vLLM's OpenAI-compatible server takes
  (base64-encoded, see `encode_for_vllm`) and ``torch.load(..., weights_only=True)`` reads.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from softprompt.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_config, read_tensors
from softprompt.errors import SoftPromptError
from softprompt.fileio import atomic_write_bytes
from softprompt.methods import PEFT_TYPES, SoftPromptMethod, method_class
from softprompt.models.loading import DTYPES

FORMAT = "softprompt-prompt-embeds/1"
TENSOR_KEY = "prompt_embeds"
KV_MESSAGE = (
    "adapter: it adds keys and values at every layer, which cannot be expressed as "
    "input embeddings; serve it with 'softprompt serve' instead"
)
GATED_MESSAGE = (
    "adapter: it adds gated attention inside layers, which cannot be expressed as "
    "input embeddings; serve it with 'softprompt serve' instead"
)


def _kv_message(method: str) -> str:
    """Why a key/value or gated method (prefix tuning, cartridge, adaption prompt) has no input embeddings."""
    message = GATED_MESSAGE if method_class(method).adds == "gated" else KV_MESSAGE
    return f"is a {method.replace('_', '-')} {message}"


def _check_exportable(cls: type[SoftPromptMethod], where: str) -> None:
    """One error line unless adapters of method class ``cls`` are a single ``[n, hidden]`` table of input embeddings."""
    method = cls.config_class.method
    if cls.adds != "input":
        raise SoftPromptError(f"{where} {_kv_message(method)}")
    if cls.has_tasks:
        raise SoftPromptError(
            f"{where} is a {method.replace('_', '-')} adapter, one prompt per task picked per row; export takes "
            "single-prompt adapters, serve it with 'softprompt serve' (model NAME:TASK) instead"
        )


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SoftPromptError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def prompt_embeddings(source, name: str | None = None) -> tuple[torch.Tensor, dict]:
    """``([n, hidden] float32 tensor, info)`` of an input-method adapter.

    ``source``: a `SoftPromptModel` holding adapter ``name``, or an adapter directory (ours or PEFT's;
    no base model needed).
    """
    if hasattr(source, "adapters") and hasattr(source, "shape"):
        if name is None:
            raise SoftPromptError("name: give the adapter to export from this model")
        adapter = source.get_adapter(name)
        _check_exportable(type(adapter), f"adapter {name!r}")
        with torch.no_grad():
            table = adapter.input_embeddings().detach().float().cpu().contiguous()
        info = {"method": adapter.config.method, "base_model": str(source.name_or_path or "")}
        return table, info
    folder = Path(source)
    if not folder.is_dir():
        raise SoftPromptError(f"{folder}: no such adapter directory")
    peft = read_peft_config(folder / CONFIG_FILE)
    method = PEFT_TYPES[peft["peft_type"]]
    _check_exportable(method_class(method), str(folder))
    tensors = read_tensors(folder / WEIGHTS_FILE)
    if "prompt_embeddings" not in tensors:
        raise SoftPromptError(f"{folder / WEIGHTS_FILE}: no 'prompt_embeddings' tensor")
    try:
        n = int(peft["num_virtual_tokens"])
    except (KeyError, TypeError, ValueError):
        raise SoftPromptError(f"{folder / CONFIG_FILE}: missing or malformed num_virtual_tokens") from None
    table = tensors["prompt_embeddings"]
    if table.dim() != 2 or table.shape[0] < n:
        raise SoftPromptError(
            f"{folder / WEIGHTS_FILE}: prompt_embeddings has shape {tuple(table.shape)}, "
            f"expected [{n} (x submodules), hidden]"
        )
    # Encoder-decoder files keep PEFT's unused second copy of the rows: the first n are the prompt.
    return table[:n].float().contiguous(), {
        "method": method,
        "base_model": str(peft.get("base_model_name_or_path") or ""),
    }


def export_prompt_embeddings(
    source, output: str | Path, name: str | None = None, *, dtype: str | torch.dtype | None = None
) -> Path:
    """Write an input-method adapter's ``[n, hidden]`` virtual-token embeddings to ``output``.

    The suffix picks the format: ``.safetensors`` (tensor ``prompt_embeds`` + metadata) or ``.pt``
    (``torch.save`` of the bare tensor). ``dtype``: float32 (default), bfloat16 or float16 — use the
    dtype the serving engine runs the model in.
    """
    output = Path(output)
    table, info = prompt_embeddings(source, name)
    table = table.to(_dtype(dtype)).contiguous()
    if output.suffix == ".safetensors":
        metadata = {
            "format": FORMAT,
            "method": info["method"],
            "num_virtual_tokens": str(table.shape[0]),
            "hidden_size": str(table.shape[1]),
            "base_model": info["base_model"],
            "dtype": str(table.dtype).replace("torch.", ""),
        }
        data = save({TENSOR_KEY: table}, metadata=metadata)
    elif output.suffix == ".pt":
        buffer = io.BytesIO()
        torch.save(table, buffer)
        data = buffer.getvalue()
    else:
        raise SoftPromptError(f"{output}: expected a .safetensors or .pt file name")
    atomic_write_bytes(output, data)
    return output


def build_prompt_embeds(model, name: str | None, text: str) -> torch.Tensor:
    """``[n + L, hidden]``: adapter ``name``'s soft prompt followed by the embeddings of ``text``'s tokens.

    This is one request's input for an engine that takes prompt embeddings; the text is tokenised as
    `SoftPromptModel.generate` does (special tokens included) and embedded with the base model's own
    input embedding layer (so model-specific scaling, e.g. Gemma's, is applied). ``name=None``: text only.
    """
    if model.tokenizer is None:
        raise SoftPromptError("this model has no tokenizer")
    ids = model.tokenizer(text)["input_ids"]
    if not ids:
        raise SoftPromptError(f"input text {text!r} tokenises to no tokens")
    embed = model.base.get_input_embeddings()
    with torch.no_grad():
        text_embeds = embed(torch.tensor(ids, device=model.device))
        if name is None:
            return text_embeds.detach().cpu()
        table, _ = prompt_embeddings(model, name)
        return torch.cat([table.to(text_embeds.dtype).to(text_embeds.device), text_embeds]).detach().cpu()


def encode_for_vllm(embeds: torch.Tensor) -> str:
    """Base64 of ``torch.save(embeds)``: the ``prompt_embeds`` field of vLLM's OpenAI-compatible completions API."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported ``.safetensors`` file (for checks and tooling)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


__all__ = [
    "FORMAT",
    "TENSOR_KEY",
    "build_prompt_embeds",
    "encode_for_vllm",
    "export_prompt_embeddings",
    "prompt_embeddings",
    "read_metadata",
]
