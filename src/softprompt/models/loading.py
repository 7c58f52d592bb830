"""`softprompt.load`: a base model from a built-in name, a local directory or a hub id.

Names are tried in that order, the hub last. A name that is no built-in name and no local path but
resembles a built-in name (``smollm2``) fails at once with a suggestion, without asking the hub. Before
a hub download, one HEAD request without retries checks that the hub answers; when it does not (no
network, ``HF_HUB_OFFLINE=1``) only the local hub cache is tried, so an unreachable hub fails in a
moment instead of after huggingface_hub's retries (half a minute).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from softprompt.engine.model import SoftPromptModel
from softprompt.errors import SoftPromptError
from softprompt.models.builtin import resolve_builtin
from softprompt.models.names import BUILTIN_HUB_IDS

#: The frozen base's weight dtype: stored and multiplied in it; adapters, their gradients, optimizer state and losses
#: stay float32 whatever it is.
DTYPE_HELP = (
    "Frozen base weights' dtype: float32 (default), bfloat16 or float16 (adapters, gradients and optimizer "
    "state stay float32)."
)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
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


def load(name: str, *, dtype: str | torch.dtype | None = None, device: str | None = None) -> SoftPromptModel:
    """Load a frozen base model and its tokenizer, ready for adapters.

    ``name``: a built-in name (``softprompt models`` lists them), a local checkpoint directory or a
    Hugging Face hub id. Remote code is never executed (``trust_remote_code`` is always off). When the
    hub cannot be reached, a hub id loads from the local hub cache or fails at once.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SoftPromptError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    path = resolve_model_path(name)
    cache_only = not Path(path).exists() and not hub_answers(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=cache_only)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        base = cls.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=False, local_files_only=cache_only
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
        raise SoftPromptError(f"--model {name!r}: could not load a model there ({str(exc).splitlines()[0]})") from None
    if device:
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which typeshed types as an
        # unbound function (self expected as the first argument); the call is right
        base.to(device)  # type: ignore[arg-type]
    return SoftPromptModel(base, tokenizer, name_or_path=name)
