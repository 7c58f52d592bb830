"""``softprompt estimate-memory``: a training job's peak memory per process, from the model's config alone."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from softprompt.models.precision import DTYPE_HELP, QUANTIZE_HELP
from softprompt.cli.common import model_option
from softprompt.methods import METHODS
from softprompt.models.memory import GPUS_GIB, estimate_memory
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option

NAME = "estimate-memory"
HELP = "Predict a training job's peak memory per process (reads the model's config.json only)."
EXAMPLES = """
    Splits the peak into frozen weights, activations, adapters (+ gradients and AdamW state) and
    runtime, and says which common GPUs it fits. --batch-size is per process.

    examples:
      softprompt estimate-memory --model smollm2-135m
      softprompt estimate-memory --model meta-llama/Llama-3.1-8B --dtype bfloat16 --gradient-checkpointing \\
          --batch-size 8 --max-length 512 --num-virtual-tokens 20
      softprompt estimate-memory --model ./my-model --quantize nf4 --processes 4 --sharding fsdp --json
    """


@dataclass
class EstimateMemoryOptions:
    """The options of ``softprompt estimate-memory``."""

    model: str | None = model_option("Base model: built-in name, local folder or hub id (only config.json is read).")
    method: str = option("prompt_tuning", f"Soft-prompt method: {', '.join(METHODS)} (default prompt_tuning).")
    num_virtual_tokens: int = option(8, "Virtual tokens of the adapter.")
    batch_size: int = option(8, "Examples per forward pass, per process.")
    max_length: int = option(256, "Longest example in tokens (prompt + label).")
    label_tokens: int = option(16, "Tokens per example that carry loss (the label or answer).")
    dtype: str = option("float32", DTYPE_HELP)
    quantize: str = option("none", QUANTIZE_HELP)
    gradient_checkpointing: bool = option(False, "Recompute each decoder block in the backward pass.")
    processes: int = option(1, "Training processes (GPUs).")
    sharding: str = option("none", "Frozen weights across processes: none (DDP), fsdp or zero3 (default none).")
    device: str = option("cuda", "cuda (adds the CUDA context) or cpu (default cuda).")
    json: bool = option(False, "Print JSON: total_bytes and each part.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, EstimateMemoryOptions)


def _size(n: int) -> str:
    return f"{n / (1 << 30):8.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):8.1f} MiB"


def run(args: argparse.Namespace) -> int:
    estimate = estimate_memory(
        args.model,
        method=args.method,
        num_virtual_tokens=args.num_virtual_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        label_tokens=args.label_tokens,
        dtype=args.dtype,
        quantize=args.quantize,
        gradient_checkpointing=args.gradient_checkpointing,
        processes=args.processes,
        sharding=args.sharding,
        device=args.device,
    )
    if args.json:
        print(json.dumps({"model": args.model, **estimate.to_dict()}, indent=2))
        return 0
    print(
        f"{args.model}: {estimate.parameters / 1e9:.3f}B parameters, adapter {estimate.adapter_parameters:,}; "
        f"peak per process:"
    )
    for label, value in (
        ("weights", estimate.weights_bytes),
        ("activations", estimate.activations_bytes),
        ("adapters + grads + AdamW", estimate.adapter_bytes),
        ("runtime", estimate.runtime_bytes),
        ("total", estimate.total_bytes),
    ):
        print(f"  {label:<26}{_size(value)}")
    fits = estimate.fits()
    print("fits: " + ", ".join(f"{gib} GB {'yes' if fits[f'{gib}GB'] else 'no'}" for gib in GPUS_GIB))
    return 0
