"""``python -m research.sharded``: each process's peak memory of one sharded (FSDP or ZeRO-3) training step on CPU,
against the estimate.

Two gloo processes (``accelerate launch`` with ``configs/accelerate/cpu_gloo_fsdp_2proc.yaml``, as
``tests/training/test_distributed.py`` launches them) each build the same random-weight Llama of a `research.scale`
shape, add a 20-token prompt, shard the frozen base with softprompt's FSDP2 (`Distributed.shard_base`, the path
``softprompt train`` takes), then run one forward + backward + gradient all-reduce + AdamW step on their own batch
of 4 x 256 tokens (16 label tokens per row). Measured per process, as in `research.scale`: the growth of resident
memory from after the process group starts to the step's peak (``VmHWM``, reset once the base is sharded), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed tensor leaves the process (live tensors). The estimate is
``softprompt.estimate_memory(..., processes=2, sharding="fsdp", device="cpu")`` for the same per-process job.

``--sharding zero3`` does the same under DeepSpeed ZeRO-3 (``configs/accelerate/cpu_gloo_deepspeed_2proc.yaml``, as
the tests launch it; `Distributed.shard_base` partitions the base with DeepSpeed's parameter partitioner) against
``estimate_memory(..., sharding="zero3")``; its rows carry ``"sharding": "zero3"`` (FSDP rows have no such key).

    python -m research.sharded                  # FSDP, 60m and 150m: research/results/sharded.json
    python -m research.sharded --case 60m
    python -m research.sharded --sharding zero3 --case 60m
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

ROOT = Path(__file__).resolve().parents[1]
#: The accelerate config of each sharding (the tests' CPU twins); ZeRO-3's names its DeepSpeed file relative to ROOT.
CONFIGS = {
    "fsdp": ROOT / "configs" / "accelerate" / "cpu_gloo_fsdp_2proc.yaml",
    "zero3": ROOT / "configs" / "accelerate" / "cpu_gloo_deepspeed_2proc.yaml",
}
SHARDINGS = tuple(CONFIGS)
CASES = ("60m", "150m")
PROCESSES = 2
MIB = 1 << 20


def estimate(shape: str, sharding: str = "fsdp"):
    """`softprompt.estimate_memory` of one process's job (``batch_size`` is per process)."""
    import softprompt

    return softprompt.estimate_memory(
        llama_config(shape),
        num_virtual_tokens=TOKENS,
        batch_size=BATCH,
        max_length=LENGTH,
        label_tokens=LABEL_TOKENS,
        processes=PROCESSES,
        sharding=sharding,
        device="cpu",
    )


def row_key(row: dict) -> tuple[str, str]:
    """A result row's (sharding, case); rows without ``sharding`` are FSDP's (written before ZeRO-3 was measured)."""
    return row.get("sharding", "fsdp"), row["case"]


def measure(shape: str, sharding: str = "fsdp") -> dict:
    """One process of the launch: its measured bytes (weights after sharding, step peak) and the step's seconds."""
    import gc

    import torch
    from transformers import LlamaForCausalLM

    import softprompt
    from softprompt.training.distributed import current

    torch.set_num_threads(1)
    dist = current()  # the process group (gloo) and FSDP or ZeRO-3 settings of the launch
    wanted = dist.fsdp if sharding == "fsdp" else dist.zero
    assert wanted is not None and dist.world_size == PROCESSES, dist
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


def launch(shape: str, sharding: str = "fsdp") -> dict:
    """Both processes of one case, and the estimate beside them."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[sharding])]
    command += ["-m", "research.sharded", "--in-process", "--case", shape, "--sharding", sharding]
    env = {**os.environ, **ALLOCATORS["tensors"], "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    ranks = sorted(
        (json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")),
        key=lambda r: r["rank"],
    )
    predicted = estimate(shape, sharding)
    return {
        **({"sharding": sharding} if sharding != "fsdp" else {}),  # FSDP rows keep their original form
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
    sharding = row_key(row)[0]
    return (
        ("" if sharding == "fsdp" else f"{sharding} ")  # FSDP's line as before
        + f"{row['case']:<5} {row['parameters'] / 1e6:6.1f}M  weights/process "
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
    parser.add_argument("--sharding", choices=SHARDINGS, default="fsdp", help="How the base is sharded.")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print("RESULT " + json.dumps(measure(args.case[0], args.sharding)), flush=True)
        return 0
    path = Path(__file__).parent / "results" / "sharded.json"
    rows = {row_key(r): r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for shape in args.case or CASES:
        rows[args.sharding, shape] = row = launch(shape, args.sharding)
        print(line(row), flush=True)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(ordered(rows), indent=2))
    return 0


def ordered(rows: dict[tuple[str, str], dict]) -> list[dict]:
    """The rows FSDP's first (as the file had them before ZeRO-3), each sharding's in `CASES` order."""
    return [rows[s, c] for s in SHARDINGS for c in CASES if (s, c) in rows]


if __name__ == "__main__":
    sys.exit(main())
