"""`softprompt.load`: a base model from a built-in name, a local directory or a hub id.

Names are tried in that order, the hub last. A name that is no built-in name and no local path but
resembles a built-in name (``smollm2``) fails at once with a suggestion, without asking the hub. Before
a hub download, one HEAD request without retries checks that the hub answers; when it does not (no
network, ``HF_HUB_OFFLINE=1``) only the local hub cache is tried, so an unreachable hub fails in a
moment instead of after huggingface_hub's retries (half a minute).

``quantize="int8"|"nf4"`` loads the base's linear layers quantized by bitsandbytes (transformers'
`BitsAndBytesConfig`), ``quantize="int8-weight"`` int8 weight-only by torchao (transformers' `TorchAoConfig`:
int8 weights with one scale per output row, dequantized inside the matrix product, which on CPU is torch's
int8-weight kernel); a checkpoint saved quantized (``quantization_config`` in its config.json) loads
quantized as it is. A quantized base is placed on its device as it loads, never moved afterwards.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.errors import HfHubHTTPError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    TorchAoConfig,
)

from softprompt.models.precision import QUANTIZE_INSTALL, QUANTIZE_NAMES, QUANTIZE_PACKAGES, quantizes_lm_head
from softprompt.engine.decode_options import DEFAULT_DECODE, check_decode
from softprompt.engine.model import SoftPromptModel
from softprompt.errors import SoftPromptError
from softprompt.models.builtin import resolve_builtin
from softprompt.models.names import BUILTIN_HUB_IDS

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model_path(name: str) -> str:
    """A built-in name becomes its local cached checkpoint; a local path or a hub id passes through.

    Raises `SoftPromptError`, without any network call, for a path that does not exist and for a name
    without an organisation (no ``/``) that is close to a built-in name, suggesting that name.
    """
    if name in BUILTIN_HUB_IDS:
        return str(resolve_builtin(name))
    if Path(name).exists():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SoftPromptError(f"--model {name!r}: no such local directory, and not a hub id or built-in name")
    close = [] if "/" in name else difflib.get_close_matches(name.lower(), BUILTIN_HUB_IDS, n=1)
    if close:
        raise SoftPromptError(
            f"--model {name!r}: not a built-in model, local directory or hub id; did you mean {close[0]!r}?"
        )
    return name


def hub_answers(repo_id: str) -> bool:
    """Whether the Hugging Face hub answers a question about ``repo_id``: one HEAD request, no retries.

    Any HTTP answer counts, even "no such repository" (transformers then explains it). No answer -
    offline mode, no network, or no reply within ``HF_HUB_ETAG_TIMEOUT`` seconds - is ``False``.
    """
    if huggingface_hub.is_offline_mode():
        return False
    url = huggingface_hub.hf_hub_url(repo_id, "config.json")
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
    except (HfHubHTTPError, ValueError):  # an HTTP error status, or a malformed repo id: the hub is not at fault
        return True
    except Exception:
        return False
    return True


def check_device(device: str | None) -> None:
    """Raise `SoftPromptError` naming ``--device`` when it names an accelerator this machine lacks."""
    if not device:
        return
    try:
        where = torch.device(device)
    except RuntimeError:
        raise SoftPromptError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps") from None
    reason = None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else "no GPU"
            reason = f"CUDA is not available here ({built})"
        elif where.index is not None and where.index >= count:
            reason = f"this machine has {count} CUDA device(s), numbered from 0"
    elif where.type == "mps" and not torch.backends.mps.is_available():
        reason = "Apple's MPS is not available here"
    if reason:
        raise SoftPromptError(f"--device {device}: {reason}")


def require_package(package: str, what: str) -> None:
    """Import ``package`` (bitsandbytes or torchao), or raise `SoftPromptError` that starts with ``what`` and says
    how to install it."""
    try:
        __import__(package)  # transformers imports it again; this checks it is there
    except ImportError:
        raise SoftPromptError(f"{what}: needs {package}, which is not installed; {QUANTIZE_INSTALL}") from None
    except Exception as exc:  # installed but broken (a native library that does not load here)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SoftPromptError(f"{what}: {package} does not import here ({reason})") from None


def quantization_config(
    quantize: str | None, dtype: torch.dtype | None = None
) -> BitsAndBytesConfig | TorchAoConfig | None:
    """transformers' quantization config for ``quantize`` (None for ``"none"``): bitsandbytes' int8 (LLM.int8()) or
    nf4 computing in ``dtype`` (float32 by default), or torchao's int8 weight-only. Raises `SoftPromptError` naming
    ``--quantize``."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in QUANTIZE_NAMES:
        raise SoftPromptError(f"--quantize: expected one of {', '.join(QUANTIZE_NAMES)}, got {quantize!r}")
    require_package(QUANTIZE_PACKAGES[quantize], f"--quantize {quantize}")
    if quantize == "int8-weight":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Double quantization (QLoRA's): the block scales are quantized too, as models/memory.py counts them.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or torch.float32,
    )


def _quantized_load(name: str, config: Any, quantize: str | None, dtype: torch.dtype | None) -> dict[str, Any]:
    """The extra ``from_pretrained`` keywords for a quantized base: ``--quantize``, or a checkpoint saved quantized
    (its config.json's ``quantization_config``: it loads as saved). Empty for a plain base."""
    saved = getattr(config, "quantization_config", None)
    wanted = quantization_config(quantize, dtype)
    if saved is None:
        return {} if wanted is None else {"quantization_config": wanted}
    method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
    if wanted is not None:
        raise SoftPromptError(
            f"--quantize {quantize}: --model {name!r} is already quantized ({method}); leave --quantize out"
        )
    if method in ("bitsandbytes", "torchao"):
        require_package(method, f"--model {name!r} (saved quantized by {method})")
    return {}


def _int8_weight_head(base: PreTrainedModel) -> None:
    """``--quantize int8-weight`` over a 16-bit base quantizes the LM head as well (`quantizes_lm_head`).
    transformers' torchao path leaves it out when it is tied to the input embeddings, yet it is a fifth of
    smollm2-135m's weight bytes, read at every decoding step (compiled, bfloat16, one stream: 20.8 -> 18.5 ms per
    token). The head is untied first: the input embeddings stay in the base's dtype, since prompt embeddings and
    vocabulary initialisation read them. The config says so, so a saved checkpoint reloads with the same head."""
    from torchao.quantization import quantize_

    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head.weight) is not torch.nn.Parameter:
        return  # no head, or one torchao already quantized
    if not quantizes_lm_head("int8-weight", head.weight.element_size()):
        return
    config = base.config.quantization_config  # the TorchAoConfig the decoder's linear layers were quantized by
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    quantize_(head, config.quant_type)
    base.config.tie_word_embeddings = False
    config.modules_to_not_convert = []  # reloading quantizes lm_head like every linear


def _no_cpu_repacking(base: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their one autograd path. bitsandbytes 0.50 repacks a 4-bit weight in
    place on its first no-grad forward on a CPU with AVX512-BF16 (validation, generation); the repacked weight then
    multiplies through an op without autograd, so later training gets silently wrong adapter gradients (and the
    repacking fails outright on layers narrower than 64 inputs)."""
    for module in base.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (nn.Module types attributes as tensors)


def load(
    name: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    quantize: str | None = None,
    decode: str | None = None,
) -> SoftPromptModel:
    """Load a frozen base model and its tokenizer, ready for adapters.

    ``name``: a built-in name (``softprompt models`` lists them), a local checkpoint directory or a
    Hugging Face hub id. Remote code is never executed (``trust_remote_code`` is always off). When the
    hub cannot be reached, a hub id loads from the local hub cache or fails at once. ``quantize``:
    ``"none"`` (default), ``"int8"`` or ``"nf4"`` through bitsandbytes, ``"int8-weight"`` through torchao (see the
    module docstring). ``decode``: ``"eager"`` (default), ``"static"`` or ``"compiled"`` (`SoftPromptModel.decode`).
    """
    check_decode(DEFAULT_DECODE if decode is None else decode, "--decode")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SoftPromptError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    check_device(device)
    path = resolve_model_path(name)
    cache_only = not Path(path).exists() and not hub_answers(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=cache_only)
        quantized = _quantized_load(name, config, quantize, dtype)
        if quantized or getattr(config, "quantization_config", None) is not None:
            # Quantized weights are made on their device as they load: bitsandbytes' int8 weights cannot move later.
            quantized["device_map"] = {"": device or "cpu"}
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        base = cls.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=False, local_files_only=cache_only, **quantized
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=cache_only)
    except (OSError, ValueError) as exc:
        if cache_only:
            offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.is_offline_mode() else ""
            raise SoftPromptError(
                f"--model {name!r}: not a built-in model ({', '.join(BUILTIN_HUB_IDS)}), local directory or cached "
                f"hub model, and the Hugging Face hub ({huggingface_hub.constants.ENDPOINT}) is not reachable"
                f"{offline}"
            ) from None
        where = (
            f"--quantize {quantize}: --model {name!r} could not be quantized"
            if quantize not in (None, "none")
            else f"--model {name!r}: could not load a model there"
        )
        raise SoftPromptError(f"{where} ({str(exc).splitlines()[0]})") from None
    _no_cpu_repacking(base)
    if quantize == "int8-weight":
        _int8_weight_head(base)
    if device and "device_map" not in quantized:
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which typeshed types as an
        # unbound function (self expected as the first argument); the call is right
        base.to(device)  # type: ignore[arg-type]
    return SoftPromptModel(base, tokenizer, name_or_path=name, decode=decode or DEFAULT_DECODE)
