"""``python -m research.sharded``: each process's peak memory of one FSDP training step on CPU, against the estimate.

Two gloo processes (``accelerate launch`` with ``configs/accelerate/cpu_gloo_fsdp_2proc.yaml``, as
``tests/training/test_distributed.py`` launches them) each build the same random-weight Llama of a `research.scale`
shape, add a 20-token prompt, shard the frozen base with softprompt's FSDP2 (`Distributed.shard_base`, the path
``softprompt train`` takes), then run one forward + backward + gradient all-reduce + AdamW step on their own batch
of 4 x 256 tokens (16 label tokens per row). Measured per process, as in `research.scale`: the growth of resident
memory from after the process group starts to the step's peak (``VmHWM``, reset once the base is sharded), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed tensor leaves the process (live tensors). The estimate is
``softprompt.estimate_memory(..., processes=2, sharding="fsdp", device="cpu")`` for the same per-process job.

    python -m research.sharded                  # 60m and 150m: research/results/sharded.json
    python -m research.sharded --case 60m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from research.harness import hwm_kib, reset_hwm, rss_kib
from research.scale import ALLOCATORS, BATCH, LABEL_TOKENS, LENGTH, SHAPES, TOKENS, job_batch, llama_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_gloo_fsdp_2proc.yaml"
CASES = ("60m", "150m")
PROCESSES = 2
MIB = 1 << 20


def estimate(shape: str):
    """`softprompt.estimate_memory` of one process's job (``batch_size`` is per process)."""
    import softprompt

    return softprompt.estimate_memory(
        llama_config(shape),
        num_virtual_tokens=TOKENS,
        batch_size=BATCH,
        max_length=LENGTH,
        label_tokens=LABEL_TOKENS,
        processes=PROCESSES,
        sharding="fsdp",
        device="cpu",
    )


def measure(shape: str) -> dict:
    """One process of the launch: its measured bytes (weights after sharding, step peak) and the step's seconds."""
    import gc

    import torch
    from transformers import LlamaForCausalLM

    import softprompt
    from softprompt.training.distributed import current

    torch.set_num_threads(1)
    dist = current()  # the process group (gloo) and FSDP settings of the launch
    assert dist.fsdp is not None and dist.world_size == PROCESSES, dist
    gc.collect()
    if not reset_hwm():
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs (Linux >= 4.0 needed)")
    start = rss_kib() * 1024
    torch.manual_seed(0)  # the same base on every process, as every process loads the same checkpoint
    model = softprompt.SoftPromptModel(LlamaForCausalLM(llama_config(shape)))
    params = list(model.add_adapter("a", num_virtual_tokens=TOKENS, init="random").parameters())
    model.train()
    dist.shard_base(model)
    gc.collect()
    built = rss_kib() * 1024
    reset_hwm()
    torch.manual_seed(1 + dist.rank)  # each process's own rows
    ids, labels = job_batch(SHAPES[shape][-1])
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    started = time.perf_counter()
    loss = dist.batch_loss(model(ids, adapters="a", labels=labels))
    assert loss is not None
    loss.backward()
    dist.sync_gradients(optimizer, float(loss))
    optimizer.step()
    seconds = time.perf_counter() - started
    peak = hwm_kib() * 1024
    return {"rank": dist.rank, "weights_bytes": built - start, "total_bytes": peak - start, "step_seconds": seconds}


def launch(shape: str) -> dict:
    """Both processes of one case, and the estimate beside them."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    command += ["-m", "research.sharded", "--in-process", "--case", shape]
    env = {**os.environ, **ALLOCATORS["tensors"], "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=900)
    ranks = sorted(
        (json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")),
        key=lambda r: r["rank"],
    )
    predicted = estimate(shape)
    return {
        "case": shape,
        "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"), SHAPES[shape])),
        "parameters": predicted.parameters,
        "job": predicted.job,
        "estimate": predicted.to_dict(),
        "processes": ranks,
    }


def line(row: dict) -> str:
    est = row["estimate"]["total_bytes"]
    peaks = [p["total_bytes"] for p in row["processes"]]
    return (
        f"{row['case']:<5} {row['parameters'] / 1e6:6.1f}M  weights/process "
        + " / ".join(f"{p['weights_bytes'] / MIB:.1f}" for p in row["processes"])
        + f" MiB (est {row['estimate']['weights_bytes'] / MIB:.1f})  peak/process "
        + " / ".join(f"{p / MIB:.1f}" for p in peaks)
        + f" MiB (est {est / MIB:.1f}, {est / max(peaks) - 1:+.1%})  step "
        + " / ".join(f"{p['step_seconds']:.1f}" for p in row["processes"])
        + " s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, action="append", help="Run only these shapes.")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print("RESULT " + json.dumps(measure(args.case[0])), flush=True)
        return 0
    path = Path(__file__).parent / "results" / "sharded.json"
    rows = {r["case"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for shape in args.case or CASES:
        rows[shape] = launch(shape)
        print(line(rows[shape]), flush=True)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps([rows[c] for c in CASES if c in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
