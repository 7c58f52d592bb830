"""`estimate_memory`: the peak memory per process of a training job, from the model's config alone.

No weights are read: the parameter count comes from the model built on the ``meta`` device, the
adapter's from its method class built the same way. The estimate follows how softprompt trains
(`softprompt.engine.model`): the frozen base runs the text once after each row's key/value prefix
(input methods first run the frozen model over their N virtual tokens, batch 1, with gradients), autograd
keeps what the frozen blocks need to pass gradients back into the prompt, and only label positions are
projected onto the vocabulary. The parts, per process (b = bytes of the weights' dtype, B = batch,
T = max length, S = N + T keys per query, h = hidden size, I = MLP width, H/K = query/key-value heads,
d = head dim, L = layers, V = vocabulary, R = label tokens per row):

- **weights**: every parameter and buffer at b bytes; ``int8``/``int8-weight``/``nf4`` store the decoder blocks'
  linear weights at 1 byte (+ a float32 scale per output row) / 0.5 byte (+ ~1/64 byte of block scales), the
  embeddings, norms and LM head stay at b (``int8-weight`` over 16-bit weights quantizes the LM head too, a tied
  one as a copy). ``fsdp``/``zero3`` divide it by the process count.
- **activations**: what autograd saves, per decoder layer (frozen weights need no saved inputs, so the
  linear layers save nothing)::

      norms      n_norm * B*T*(4h + 4)     RMSNorm upcasts to float32: its input and 1/rms per token
      attention  2*B*T*H*d*b               query (after RoPE) and SDPA's output
               + 2*B*S*H*d*b               keys and values after the prefix, repeated to H heads
               + B*H*T*4 + B*T*S*b         SDPA's log-sum-exp and its float attention mask
      MLP        3*B*T*I*b                 gate (SiLU input), SiLU output, up (gated MLPs; else B*T*I*b)
      cache      2*B*S*K*d*b               the key/value cache, alive until the backbone returns
                                           (shared with the saved keys/values when K == H)

  times L, plus the same for the prompt pass (B = 1, T = S = N, no mask) and the final norm and
  label log-probabilities (B*R*V*4) and RoPE's cos/sin (2*B*T*d*b); the first layer's input norm saves
  nothing (the embeddings need no gradient). ``int8`` (LLM.int8()) also keeps each quantized linear's input,
  ``B*T*(2h + I)*b`` per layer, and so does ``zero3`` (DeepSpeed's linear saves every linear's input, frozen or
  not). With gradient checkpointing a layer keeps only its input (B*T*h*b)
  and the prefix's keys/values in the cache (2*B*N*K*d*b: a checkpointed block drops the text's, see
  engine/checkpointing.py); one layer's full set is recomputed during the backward (counted under runtime).
- **adapters**: the adapter's float32 parameters, their gradients and AdamW's two float32 moments
  (16 bytes per parameter; the parameters are their own master copy).
- **runtime**: the backward's transients (about one layer's saved set, plus the label logits and their
  gradient), nf4's dequantized largest weight, 512 MiB of CUDA context on ``device="cuda"``, and under
  FSDP/ZeRO-3 twice the largest unit gathered whole (a layer, the embedding matrix or an untied head, whichever is
  largest): its all-gather's output buffer and the unsharded weight it is copied into are alive together, at the
  head's projection in the forward (every activation still kept) and again at the start of the backward.

Measured against CPU training on random-weight Llama shapes (``research/scale.py``, docs/benchmarks.md):
float32 and bfloat16 weights without checkpointing, and int8/nf4 bases (``research/scale.py --section quantized``).
Checkpointing is measured at the ~0.3B and ~1B shapes (the scale section); FSDP with 2 CPU processes at 60M and
150M parameters (``research/sharded.py``), and ZeRO-3 the same (``--sharding zero3``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from softprompt.models.precision import QUANTIZE_NAMES, quantizes_lm_head
from softprompt.engine.families import ModelShape
from softprompt.errors import SoftPromptError
from softprompt.methods import method_class, normalize_method
from softprompt.models.builtin import is_cached, model_dir
from softprompt.models.loading import hub_answers
from softprompt.models.names import BUILTIN_HUB_IDS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZATIONS = QUANTIZE_NAMES
SHARDINGS = ("none", "fsdp", "zero3")
DEVICES = ("cuda", "cpu")
#: Common GPU memory sizes, in GiB as the cards report them (RTX 4090/A10G, A100-40, L40S/A6000, A100/H100, H200).
GPUS_GIB = (24, 40, 48, 80, 141)
CUDA_CONTEXT_BYTES = 512 << 20
#: Bytes per nf4 weight: 4 bits plus double-quantized block scales (8 bits per 64 weights + fp32 per 256 blocks).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Gemma 2/3 norm the attention and MLP outputs as well as their inputs.
_FOUR_NORM_FAMILIES = ("gemma2", "gemma3", "gemma3_text")


@dataclass
class MemoryEstimate:
    """The predicted peak memory of one training process, in bytes, by part (see the module docstring)."""

    weights_bytes: int
    activations_bytes: int
    adapter_bytes: int
    runtime_bytes: int
    parameters: int
    adapter_parameters: int
    job: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes + self.adapter_bytes + self.runtime_bytes

    def fits(self) -> dict[str, bool]:
        """Whether the job fits each common GPU size (``"80GB": True``)."""
        return {f"{gib}GB": self.total_bytes <= gib << 30 for gib in GPUS_GIB}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        out["fits"] = self.fits()
        return out


# ------------------------------------------------------------------------------------------- config
def model_config(model: str) -> PretrainedConfig:
    """The config of ``model`` (built-in name, local folder or hub id) without its weights.

    A built-in name reads its cached checkpoint's config, else its hub id's. The hub is asked only when it
    answers (see `hub_answers`); otherwise only its local cache is tried, and a miss is one line.
    """
    if model in BUILTIN_HUB_IDS and is_cached(model):
        model = str(model_dir(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SoftPromptError(f"--model {model!r}: no config.json in that folder")
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    if model.startswith((".", "/", "~")) or path.exists():
        raise SoftPromptError(f"--model {model!r}: no such local folder")
    repo = BUILTIN_HUB_IDS.get(model, model)
    cache_only = not hub_answers(repo)
    try:
        return AutoConfig.from_pretrained(repo, trust_remote_code=False, local_files_only=cache_only)
    except (OSError, ValueError) as exc:
        if cache_only:
            raise SoftPromptError(
                f"--model {model!r}: its config.json is not cached and the Hugging Face hub "
                f"({huggingface_hub.constants.ENDPOINT}) is not reachable"
            ) from None
        raise SoftPromptError(f"--model {model!r}: no model config there ({str(exc).splitlines()[0]})") from None


def device_memory(device: str) -> int | None:
    """Bytes a job may use on ``device``: a CUDA card's total memory, or the CPU's available RAM (psutil when
    installed, else ``/proc/meminfo``); None where unknown (another device type, no CUDA, no such file)."""
    kind = torch.device(device)
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(kind.index or 0).total_memory)
    if kind.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        found = [line.split()[1] for line in lines if line.startswith("MemAvailable:")]
        return int(found[0]) * 1024 if found else None  # reported in kB
    return int(psutil.virtual_memory().available)


def _count(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def _meta_model(config: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return model


def _adapter_parameters(method: str, shape: ModelShape, options: dict[str, Any]) -> int:
    cls = method_class(method, source="--method")
    config = cls.config_class.from_dict(options, source=f"--method {method}")
    with torch.device("meta"):
        adapter = cls(config, shape)
    return sum(p.numel() for p in adapter.parameters())


# ------------------------------------------------------------------------------------------- terms
def _check(value: str, name: str, known: tuple[str, ...]) -> str:
    if value not in known:
        raise SoftPromptError(f"--{name}: expected one of {', '.join(known)}, got {value!r}")
    return value


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SoftPromptError(f"--{name}: expected a positive integer, got {value!r}")
    return value


def layer_activation_bytes(
    *,
    batch: int,
    queries: int,
    keys: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    norms: int = 2,
    gated: bool = True,
    masked: bool = True,
) -> tuple[int, int]:
    """(saved, cache) bytes of one decoder layer's forward with gradients into its keys/values prefix:
    what autograd saves, and its key/value cache (zero when the saved keys/values are the cache itself)."""
    b, tokens = dtype_bytes, batch * queries
    saved = norms * tokens * (4 * hidden + 4)
    saved += 2 * tokens * heads * head_dim * b + 2 * batch * keys * heads * head_dim * b
    saved += tokens * heads * 4 + (tokens * keys * b if masked else 0)
    saved += (3 if gated else 1) * tokens * intermediate * b
    cache = 0 if kv_heads == heads else 2 * batch * keys * kv_heads * head_dim * b
    return saved, cache


def _largest_unit(model: PreTrainedModel, params: int, layers: int) -> int:
    """Parameters of the largest piece a sharded base gathers whole at once: a decoder layer, the embedding matrix
    or an untied LM head (each its own FSDP unit; ZeRO-3 gathers per module). With a 32k+ vocabulary and a small
    hidden size the embedding or head outweighs a layer (~5x at 60M parameters)."""
    blocks = getattr(model.base_model, "layers", None)
    layer = _count(blocks[0]) if isinstance(blocks, torch.nn.ModuleList) and len(blocks) else params // layers
    tables = [_count(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return max([layer, *tables])


def _quantized_weight_bytes(model: PreTrainedModel, quantize: str, dtype_bytes: int) -> int:
    """Weights with the decoder blocks' linear layers quantized (embeddings, norms stay at b; the LM head too, except
    under int8-weight over a 16-bit base, which quantizes an untied copy of a tied head)."""
    quantized, linear_bytes = 0, 0.0
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and (module is not head or quantizes_lm_head(quantize, dtype_bytes)):
            rows, cols = module.weight.shape
            linear_bytes += rows * cols * (NF4_BYTES if quantize == "nf4" else 1 + 4 / cols)
            quantized += 0 if module is head and tied else rows * cols
    return int(linear_bytes + (_count(model) - quantized) * dtype_bytes)


def _activations(
    shape: ModelShape,
    text: PretrainedConfig,
    method: str,
    b: int,
    batch: int,
    n: int,
    t: int,
    r: int,
    checkpointing: bool,
    quantize: str = "none",
    saves_linear_inputs: bool = False,
) -> tuple[int, int]:
    """(one text layer's saved bytes, all activation bytes) of the job (see the module docstring)."""
    h = shape.hidden_size
    gated = getattr(text, "intermediate_size", None) is not None
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    layer = functools.partial(
        layer_activation_bytes,
        hidden=h,
        intermediate=intermediate,
        heads=shape.num_attention_heads,
        kv_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        dtype_bytes=b,
        norms=4 if shape.model_type in _FOUR_NORM_FAMILIES else 2,
        gated=gated,
    )

    def linear_inputs(tokens: int) -> int:
        # LLM.int8() keeps each quantized linear's float input for its backward: the attention norm's output
        # (q/k/v), the MLP norm's output (gate/up) and the down projection's; o_proj's is a view of SDPA's output.
        # So does ZeRO-3: DeepSpeed swaps F.linear for its own autograd function (memory_efficient_linear, on by
        # default), which saves every linear's input and weight whether or not the weight needs a gradient.
        return tokens * (2 * h + intermediate) * b if quantize == "int8" or saves_linear_inputs else 0

    text_saved, text_cache = layer(batch=batch, queries=t, keys=n + t)
    text_saved += linear_inputs(batch * t)
    if checkpointing:  # each layer keeps its input, and its cache only the prefix (each block drops the text's)
        kv = 2 * batch * n * shape.num_key_value_heads * shape.head_dim * b
        activations = shape.num_layers * (batch * t * h * b + kv)
    else:
        activations = shape.num_layers * (text_saved + text_cache)
    if method_class(method).adds == "input":  # the prompt's own pass over the frozen model, batch 1
        prompt_saved, prompt_cache = layer(batch=1, queries=n, keys=n, masked=False)
        prompt_saved += linear_inputs(n)
        activations += shape.num_layers * (prompt_saved + prompt_cache)
    # The label log-probabilities and RoPE's cos/sin. The final norm saves what the first layer's input norm
    # does not (the embeddings need no gradient): the two cancel.
    activations += batch * r * shape.vocab_size * 4 + 2 * batch * t * shape.head_dim * b
    return text_saved, activations


def estimate_memory(
    model: str | PretrainedConfig,
    *,
    method: str = "prompt_tuning",
    num_virtual_tokens: int = 8,
    batch_size: int = 8,
    max_length: int = 256,
    label_tokens: int = 16,
    dtype: str = "float32",
    quantize: str | None = "none",
    gradient_checkpointing: bool = False,
    processes: int = 1,
    sharding: str = "none",
    device: str = "cuda",
    method_options: dict[str, Any] | None = None,
) -> MemoryEstimate:
    """Predict the peak memory of one training process (``batch_size`` is per process).

    ``model``: a built-in name, local folder or hub id (only its ``config.json`` is read) or a config.
    ``label_tokens``: tokens per row that carry loss (a label or answer; the prompt carries none).
    Raises `SoftPromptError` naming the flag for a bad value.
    """
    method_class(method, source="--method")
    _check(dtype, "dtype", tuple(DTYPE_BYTES))
    quantize = _check(quantize or "none", "quantize", QUANTIZATIONS)
    _check(sharding, "sharding", SHARDINGS)
    _check(device, "device", DEVICES)
    for value, name in (
        (num_virtual_tokens, "num-virtual-tokens"),
        (batch_size, "batch-size"),
        (max_length, "max-length"),
        (label_tokens, "label-tokens"),
        (processes, "processes"),
    ):
        _positive(value, name)
    config = model if isinstance(model, PretrainedConfig) else model_config(model)
    shape = ModelShape.from_config(config)
    if shape.is_encoder_decoder:
        raise SoftPromptError(
            "--model: estimate-memory models decoder-only bases; encoder-decoder models are not modelled yet"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    adapter_params = _adapter_parameters(
        method, shape, {**(method_options or {}), "num_virtual_tokens": num_virtual_tokens}
    )
    b = DTYPE_BYTES[dtype]
    meta = _meta_model(config)
    params = _count(meta)
    weights = params * b if quantize == "none" else _quantized_weight_bytes(meta, quantize, b)
    sharded = sharding != "none" and processes > 1
    if sharded:
        weights = -(-weights // processes)

    n, t, r = num_virtual_tokens, max_length, min(label_tokens, max_length)
    text_saved, activations = _activations(
        shape, text, method, b, batch_size, n, t, r, gradient_checkpointing, quantize, sharded and sharding == "zero3"
    )
    label_logits = batch_size * r * shape.vocab_size * 4
    runtime = text_saved + 2 * label_logits  # one layer's backward transients; label logits and their gradient
    if gradient_checkpointing:  # the recomputed layer's saved set lives beside its backward transients
        runtime += text_saved
    if sharded:
        runtime += 2 * _largest_unit(meta, params, shape.num_layers) * b
    if quantize == "nf4":  # bitsandbytes dequantizes one weight at a time for the backward
        head = meta.get_output_embeddings()
        runtime += max(m.weight.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear) and m is not head) * b
    if device == "cuda":
        runtime += CUDA_CONTEXT_BYTES
    job = dict(
        method=normalize_method(method),
        num_virtual_tokens=n,
        batch_size=batch_size,
        max_length=t,
        label_tokens=r,
        dtype=dtype,
        quantize=quantize,
        gradient_checkpointing=gradient_checkpointing,
        processes=processes,
        sharding=sharding,
        device=device,
    )
    return MemoryEstimate(
        weights_bytes=int(weights),
        activations_bytes=int(activations),
        adapter_bytes=16 * adapter_params,
        runtime_bytes=int(runtime),
        parameters=params,
        adapter_parameters=adapter_params,
        job=job,
    )
