"""``python -m research.scale_profile --case 300m-prompt-ckpt``: where one training step's peak memory goes, on CPU.

For one case of `research.scale` (its case builder, job and live-tensor allocator: every tensor its own mapping, so
resident memory is live tensors), in a fresh process, it measures the growth of resident memory over the weights
at each phase of the step, its peak within each phase (``VmHWM``, reset between phases), and what the forward
leaves for the backward: the tensors autograd saved (through ``torch.autograd.graph.saved_tensors_hooks``, each
storage once, by the module of the base that saved it; under checkpointing a block saves only its inputs, which
its checkpoint keeps), and the rest, which only other references keep alive. Beside them, computed sizes of the pieces the peak could hold: the
key/value cache of the whole text, the label positions' logits, one block's MLP activations. Linux only.

    python -m research.scale_profile --case 300m-prompt-ckpt --case 300m-prompt    # research/results/scale_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from research.harness import hwm_kib, rss_kib
from research.scale import (
    ALLOCATORS,
    BATCH,
    CASES,
    LABEL_TOKENS,
    LENGTH,
    MIB,
    SHAPES,
    TOKENS,
    Case,
    build,
    job_batch,
    reset_peak,
)

# every unquantized case of research.scale, and a small checkpointed one to try the profile on
PROFILED = {name: case for name, case in CASES.items() if case.quantize == "none"}
PROFILED["20m-prompt-ckpt"] = Case("20m", checkpointing=True)


def _parts(base) -> list[tuple[object, str]]:
    """The submodules of ``base`` whose saved tensors are told apart, each with the part of the model it is."""
    parts = []
    for name, module in base.named_modules():
        if name.rpartition(".")[0].endswith(".layers"):  # one transformer block
            parts.append((module, "blocks"))
        elif name.endswith("embed_tokens"):
            parts.append((module, "embeddings"))
        elif name.endswith("lm_head"):
            parts.append((module, "lm_head"))
        elif name.endswith(".norm"):
            parts.append((module, "final norm"))
    return parts


def profile(name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    case = PROFILED[name]
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[case.shape]
    item = 2 if case.dtype != "float32" else 4
    import softprompt  # noqa: F401  (imported before the baseline: its import is not the model's memory)

    ids, labels = job_batch(vocab)
    reset_peak()
    start = rss_kib() * 1024
    loss_fn, params, base = build(case)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    built = rss_kib() * 1024
    stack: list[str] = []
    handles = []

    def leave(module, inputs, output) -> None:  # a hook that returns something replaces the output
        stack.pop()

    for module, part in _parts(base):
        handles.append(module.register_forward_pre_hook(lambda m, a, p=part: stack.append(p) and None))
        handles.append(module.register_forward_hook(leave))
    saved: dict[int, tuple[str, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved.setdefault(storage.data_ptr(), (stack[-1] if stack else "engine (glue, loss)", storage.nbytes()))
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in base.parameters()}
    phases: dict[str, dict] = {}

    def phase(label: str, began: float) -> None:
        phases[label] = {
            "peak_over_weights_bytes": hwm_kib() * 1024 - built,
            "after_over_weights_bytes": rss_kib() * 1024 - built,
            "seconds": time.perf_counter() - began,
        }
        reset_peak()

    reset_peak()
    began = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(ids, labels)
    phase("forward", began)
    for handle in handles:
        handle.remove()
    began = time.perf_counter()
    loss.backward()
    del loss
    phase("backward", began)
    began = time.perf_counter()
    optimizer.step()
    phase("optimizer", began)
    by_part: dict[str, int] = {}
    for ptr, (part, nbytes) in saved.items():
        if ptr not in weights:  # a frozen weight saved by a matmul is the weights, already counted
            by_part[part] = by_part.get(part, 0) + nbytes
    text = LENGTH + (TOKENS if case.method == "prompt_tuning" else 0)
    head_dim = hidden // heads
    computed = {
        "block_inputs_checkpointed": layers * BATCH * LENGTH * hidden * item if case.checkpointing else 0,
        "kv_cache_whole_text": layers * 2 * BATCH * kv_heads * (LENGTH + TOKENS) * head_dim * item,
        "label_logits_float32": BATCH * LABEL_TOKENS * vocab * 4,
        "one_block_mlp": 3 * BATCH * text * intermediate * item,
        "one_block_attention_scores": BATCH * heads * LENGTH * (LENGTH + TOKENS) * 4,
    }
    retained = phases["forward"]["after_over_weights_bytes"]
    autograd = sum(by_part.values())
    return {
        "case": name,
        "weights_bytes": built - start,
        "phases": phases,
        "retained_after_forward": {
            "total_bytes": retained,
            "autograd_saved_bytes_by_part": by_part,
            "other_references_bytes": retained - autograd,
        },
        "computed_bytes": computed,
    }


def _print(row: dict) -> None:
    mib = lambda b: f"{b / MIB:7.1f}"  # noqa: E731
    print(f"{row['case']}: weights {mib(row['weights_bytes'])} MiB; over the weights:")
    for label, p in row["phases"].items():
        print(f"  {label:<9} peak {mib(p['peak_over_weights_bytes'])}  after {mib(p['after_over_weights_bytes'])} MiB")
    kept = row["retained_after_forward"]
    print(f"  kept for the backward {mib(kept['total_bytes'])} MiB:")
    for part, nbytes in sorted(kept["autograd_saved_bytes_by_part"].items()):
        print(f"    saved by autograd, {part:<20} {mib(nbytes)}")
    print(f"    other references                     {mib(kept['other_references_bytes'])}")
    print("  computed: " + ", ".join(f"{k} {mib(v).strip()}" for k, v in row["computed_bytes"].items()) + " MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(PROFILED), action="append")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print(json.dumps(profile(args.case[0])))
        return 0
    rows = []
    for case in args.case or ["300m-prompt-ckpt"]:
        out = subprocess.run(
            [sys.executable, "-m", "research.scale_profile", "--in-process", "--case", case],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **ALLOCATORS["tensors"]},
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        _print(row)
        rows.append(row)
    path = Path(__file__).parent / "results" / "scale_profile.json"
    ran = {row["case"] for row in rows}
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["case"] not in ran]
    path.write_text(json.dumps(kept + rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
