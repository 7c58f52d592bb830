"""``python -m research.scale``: `softprompt.estimate_memory` against the measured peak of one training step on CPU.

Each case builds a random-weight Llama from a `transformers.LlamaConfig` (no download) in a fresh process,
adds an adapter, and runs one forward + backward + AdamW step through `softprompt.SoftPromptModel`. Measured:
the growth of resident memory from before the model is built to the step's peak (``VmHWM``, reset after
imports through ``/proc/self/clear_refs``), and the weights alone (resident memory after building). Linux only.

Each case runs twice. With glibc's defaults (``rss``) freed tensors may stay in the process: glibc raises its
mmap threshold after large frees and then serves tensors from a heap it rarely trims. With
``MALLOC_MMAP_THRESHOLD_=65536`` (``tensors``) every tensor is its own mapping, returned on free, so the peak
is that of live tensors, the quantity the estimate models (as ``torch.cuda.max_memory_allocated`` would on a GPU).

    python -m research.scale            # every case (minutes on one core): a table, research/results/scale.json
    python -m research.scale --case 60m-prompt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# shape: hidden, layers, heads, kv heads, MLP width, vocabulary
SHAPES = {
    "20m": (256, 8, 8, 4, 688, 32000),
    "60m": (512, 8, 8, 8, 1376, 32000),
    "150m": (768, 16, 12, 4, 2048, 32000),
    "300m": (1024, 24, 16, 8, 2816, 32000),  # issue 23's ~0.3B target shape
}
# name: shape, method, dtype
CASES = {
    "20m-prompt": ("20m", "prompt_tuning", "float32"),
    "60m-prompt": ("60m", "prompt_tuning", "float32"),
    "150m-prompt": ("150m", "prompt_tuning", "float32"),
    "60m-prefix": ("60m", "prefix_tuning", "float32"),
    "150m-prompt-bf16": ("150m", "prompt_tuning", "bfloat16"),
    "300m-prompt": ("300m", "prompt_tuning", "float32"),
    "300m-prompt-bf16": ("300m", "prompt_tuning", "bfloat16"),
}
BATCH, LENGTH, TOKENS, LABEL_TOKENS = 4, 256, 20, 16
MIB = 1 << 20
ALLOCATORS = {"tensors": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}, "rss": {}}


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(case: str) -> dict:
    """One case in this process: measured and estimated bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import softprompt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape, method, dtype = CASES[case]
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
    )
    estimate = softprompt.estimate_memory(
        config,
        method=method,
        num_virtual_tokens=TOKENS,
        batch_size=BATCH,
        max_length=LENGTH,
        label_tokens=LABEL_TOKENS,
        dtype=dtype,
        device="cpu",
    )
    ids = torch.randint(0, vocab, (BATCH, LENGTH))
    labels = torch.full_like(ids, -100)
    labels[:, -LABEL_TOKENS:] = ids[:, -LABEL_TOKENS:]
    _reset_peak()
    start = _status("VmRSS")
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: never a float32 copy first
    base = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model = softprompt.SoftPromptModel(base)
    adapter = model.add_adapter("a", method=method, num_virtual_tokens=TOKENS, init="random")
    model.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    built = _status("VmRSS")
    model(ids, adapters="a", labels=labels).loss.backward()
    optimizer.step()
    peak = _status("VmHWM")
    measured = {"weights_bytes": built - start, "total_bytes": peak - start}
    return {
        "case": case,
        "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"), SHAPES[shape])),
        "method": method,
        "dtype": dtype,
        "parameters": estimate.parameters,
        "measured": measured,
        "estimate": estimate.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="Run only these cases.")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print(json.dumps(measure(args.case[0])))
        return 0
    rows = []
    for case in args.case or CASES:
        row: dict = {}
        for allocator, env in ALLOCATORS.items():
            out = subprocess.run(
                [sys.executable, "-m", "research.scale", "--in-process", "--case", case],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            row = {**result, "measured": {**row.get("measured", {}), allocator: result["measured"]}}
            est, got = row["estimate"], result["measured"]
            print(
                f"{case:<17} {allocator:<7} {row['parameters'] / 1e6:6.1f}M  "
                f"weights {got['weights_bytes'] / MIB:7.1f} MiB (est {est['weights_bytes'] / MIB:7.1f})  "
                f"peak {got['total_bytes'] / MIB:7.1f} MiB "
                f"(est {est['total_bytes'] / MIB:7.1f}, {est['total_bytes'] / got['total_bytes'] - 1:+.1%})",
                flush=True,
            )
        rows.append(row)
    path = Path(__file__).parent / "results" / "scale.json"
    path.parent.mkdir(exist_ok=True)
    ran = {row["case"] for row in rows}  # earlier results of the cases not run now are kept
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["case"] not in ran]
    order = list(CASES)
    path.write_text(json.dumps(sorted(kept + rows, key=lambda r: order.index(r["case"])), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
