"""A GGUF file -> a plain float32 transformers checkpoint, checked against the GGUF-loaded model.

transformers loads the GGUF (dequantized to float32) but refuses to ``save_pretrained`` it, so
`convert_gguf` rebuilds a plain model from its config, copies the weights over, saves a normal
checkpoint (``config.json``, ``model.safetensors``, tokenizer files) and reloads it to check identical
weights and tokenization.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from softprompt.errors import SoftPromptError
from softprompt.models.pypi import say

no_init_weights: Callable[[], contextlib.AbstractContextManager[object]]
try:
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - older/newer transformers
    from contextlib import nullcontext as no_init_weights

# Probe strings for the tokenizer check after saving: spaces, newlines, digits, accents, emoji, CJK.
_TOKENIZER_PROBES = (
    "Hello world!",
    " leading space, then  two spaces and\ttab\n\nnew paragraph",
    "In 2024, 12345 people paid $3.50 each.",
    "héllo wörld: naïve café 🙂👍🏽 日本語のテキスト",
)
_CHAT_PROBE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Is this tweet positive? I love it!"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And this one?"},
]


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Turn transformers' progress bars off while converting when ``enabled`` is false.

    Its GGUF loader uses ``tqdm`` directly, not transformers' switchable one, so that one is wrapped too.
    """
    if enabled:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils: types.ModuleType | None
    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # pragma: no cover - moved in another transformers
        gguf_utils = None
    # the module's globals, where its loader looks tqdm up (typed stubs know no such attribute)
    loader_globals = vars(gguf_utils) if gguf_utils is not None else {}
    original = loader_globals.get("tqdm")
    if original is not None:
        loader_globals["tqdm"] = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            loader_globals["tqdm"] = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_gguf(gguf_path: Path):
    """The GGUF model (fully dequantized to float32) and its tokenizer, as transformers loads them."""
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        output_loading_info=True,
        trust_remote_code=False,
    )
    # transformers annotates the model alone; output_loading_info=True returns (model, loading info)
    model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in info.get("missing_keys", ()) if k not in tied]
    if missing:
        raise SoftPromptError(
            f"{gguf_path.name}: transformers found no weights in the GGUF file for "
            f"{', '.join(sorted(missing)[:5])}; this file cannot be converted"
        )
    return model.eval(), tokenizer


def rebuild_plain_model(model):
    """A plain (unquantized) copy of ``model``: same class and config, ``quantization_config`` dropped.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model; this copy saves normally. The
    weights are copied exactly and tied embeddings stay tied.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with no_init_weights():  # every weight is overwritten below: skip the random initialisation (seconds for 270M)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
        emb, head = plain.get_input_embeddings(), plain.get_output_embeddings()
        if head is not None and head.weight is not emb.weight:
            raise SoftPromptError("internal error: the rebuilt model's lm_head is not tied to its embeddings")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Save ``model`` (as :func:`rebuild_plain_model` makes it) and ``tokenizer`` into ``out``."""
    model.save_pretrained(str(out), max_shard_size="100GB")
    tokenizer.save_pretrained(str(out))


def verify_checkpoint(out: Path, model, tokenizer) -> None:
    """Reload ``out`` and check it against ``model``/``tokenizer``: identical weights, same tokenization.

    Raises :class:`SoftPromptError` naming the first difference.
    """
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref_state, new_state = model.state_dict(), saved.state_dict()
    if set(ref_state) != set(new_state):
        raise SoftPromptError(
            f"conversion check failed in {out}: parameter names differ ({sorted(set(ref_state) ^ set(new_state))[:5]})"
        )
    for key, value in ref_state.items():
        if value.shape != new_state[key].shape or not torch.equal(value, new_state[key]):
            raise SoftPromptError(f"conversion check failed in {out}: weight {key} differs from the GGUF model")
    if (
        getattr(model.config, "tie_word_embeddings", False)
        and saved.get_output_embeddings().weight is not saved.get_input_embeddings().weight
    ):
        raise SoftPromptError(f"conversion check failed in {out}: lm_head is not tied to the embeddings")
    del saved
    tok = AutoTokenizer.from_pretrained(str(out))
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if getattr(tok, attr, None) != getattr(tokenizer, attr, None):
            raise SoftPromptError(
                f"conversion check failed in {out}: tokenizer {attr} "
                f"{getattr(tok, attr, None)!r} != {getattr(tokenizer, attr, None)!r}"
            )
    if len(tok) != len(tokenizer):
        raise SoftPromptError(f"conversion check failed in {out}: tokenizer size {len(tok)} != {len(tokenizer)}")
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    for text in (*_TOKENIZER_PROBES, " ".join(specials) + " after specials"):
        a, b = tokenizer(text)["input_ids"], tok(text)["input_ids"]
        if a != b or tokenizer.decode(a) != tok.decode(b):
            raise SoftPromptError(
                f"conversion check failed in {out}: the saved tokenizer encodes {text!r} "
                f"as {b[:12]}, the GGUF one as {a[:12]}"
            )
    if tokenizer.chat_template:
        a = tokenizer.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
        b = tok.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
        if a != b:
            raise SoftPromptError(f"conversion check failed in {out}: the chat template renders differently")


def convert_gguf(gguf_path: Path, out: Path, *, name_or_path: str, progress: bool) -> None:
    """GGUF file -> plain float32 checkpoint in ``out``, checked against the GGUF-loaded model.

    ``name_or_path`` is recorded as the config's ``_name_or_path`` (the hub id the model stands for);
    ``progress`` shows a line per step and transformers' progress bars on stderr.
    """
    started = time.perf_counter()
    say(progress, f"softprompt: loading {gguf_path.name} with transformers (dequantizing to float32)")
    with _progress_bars(progress):
        gguf_model, tokenizer = _load_gguf(gguf_path)
        plain = rebuild_plain_model(gguf_model)
        del gguf_model
        plain.config._name_or_path = name_or_path
        max_len = getattr(plain.config, "max_position_embeddings", None)
        if isinstance(max_len, int) and max_len > 0:
            tokenizer.model_max_length = max_len  # the GGUF tokenizer leaves it unbounded
        say(progress, "softprompt: saving the checkpoint (safetensors) and checking it")
        save_checkpoint(plain, tokenizer, out)
        verify_checkpoint(out, plain, tokenizer)
    say(progress, f"softprompt: converted in {time.perf_counter() - started:.1f} s")
