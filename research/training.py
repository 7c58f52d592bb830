"""Section 1: one training step (forward + backward + AdamW on the adapter), softprompt vs PEFT.

Same frozen base, same adapter weights, same batch (``rows`` x ``length`` real tokens, loss on the
last ``label_tokens``), same optimizer. Time: interleaved medians in this process. Peak memory: a
fresh process per (config, system), see `measure_memory`.
"""

from __future__ import annotations

import gc

import torch

from . import harness
from .models import Systems

CONFIGS = [("prompt_tuning", 8), ("prompt_tuning", 20), ("prefix_tuning", 20)]
DTYPES = ["fp32", "bf16"]
LR = 1e-3

MEMORY_METHOD = (
    "resident-set high-water mark (Linux VmHWM) of a fresh process per (config, system): the process "
    "loads the model and builds the adapter, frees what it can (gc, malloc_trim), resets VmHWM to the "
    "current RSS through /proc/self/clear_refs after one warm-up step, runs {steps} training steps and reports VmHWM minus that "
    "baseline: every byte the step made resident (activations, gradients, logits, optimizer state, "
    "allocator slack), whoever allocated it. Processes are forked from a clean fork server that has only "
    "imported the libraries (no model, no compute)"
)


def tag(method: str, n: int) -> str:
    return {"prompt_tuning": "pt", "prefix_tuning": "prefix", "p_tuning": "ptune"}[method] + str(n)


def make_step(system: str, systems: Systems, name: str, batch, dtype: str):
    """A closure running one training step of ``system`` ("softprompt" or "peft"); returns the loss."""
    ids, mask, labels = batch
    if system == "softprompt":
        model = systems.ours
        model.train()
        params = systems.ours_params(name)

        def forward():
            return model(ids, mask, adapters=name, labels=labels).loss
    else:
        model = systems.peft_for(name)
        params = systems.peft_params(name)

        def forward():
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    optimizer = torch.optim.AdamW(params, lr=LR)
    bf16 = dtype == "bf16"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def run(systems: Systems, batch, *, repeats: int, warmup: int, configs=CONFIGS, dtypes=DTYPES, log=print) -> list[dict]:
    rows = []
    for method, n in configs:
        for dtype in dtypes:
            name = f"train-{tag(method, n)}-{dtype}"
            systems.add(name, method, n, trainable=True, seed=0)
            steps = {s: make_step(s, systems, name, batch, dtype) for s in ("softprompt", "peft")}
            first = {s: fn() for s, fn in steps.items()}  # first step: also checks both compute the same loss
            times = harness.interleaved(steps, repeats=repeats, warmup=max(warmup - 1, 0))
            ours, theirs = harness.median_ms(times["softprompt"]), harness.median_ms(times["peft"])
            rows.append(
                {
                    "method": method,
                    "num_virtual_tokens": n,
                    "dtype": dtype,
                    "softprompt_ms": ours,
                    "peft_ms": theirs,
                    "ratio": harness.ratio(ours, theirs),
                    "softprompt_runs_ms": [t * 1000 for t in times["softprompt"]],
                    "peft_runs_ms": [t * 1000 for t in times["peft"]],
                    "softprompt_spread": harness.spread(times["softprompt"]),
                    "peft_spread": harness.spread(times["peft"]),
                    "first_loss_softprompt": first["softprompt"],
                    "first_loss_peft": first["peft"],
                }
            )
            log(
                f"  train {tag(method, n):>8} {dtype}: softprompt {ours:8.1f} ms  peft {theirs:8.1f} ms  "
                f"ratio {rows[-1]['ratio']:.2f}  (first loss {first['softprompt']:.4f} vs {first['peft']:.4f})"
            )
            gc.collect()
    return rows


# ------------------------------------------------------------------------------------------ memory
def measure_memory(spec: dict) -> dict:
    """Runs in a fresh process: peak resident memory added by ``spec['steps']`` training steps."""
    torch.set_num_threads(spec["threads"])
    systems = Systems.build(spec["source"])
    name = "mem"
    systems.add(name, spec["method"], spec["num_virtual_tokens"], peft=spec["system"] == "peft", trainable=True, seed=0)
    batch = tuple(torch.tensor(x) for x in spec["batch"])
    step = make_step(spec["system"], systems, name, batch, spec["dtype"])
    step()  # warm-up: one-time library set-up and the optimizer's state are not a step's peak
    gc.collect()
    harness.malloc_trim()
    baseline = harness.rss_kib()
    if not harness.reset_hwm():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs); peak memory needs Linux >= 4.0")
    for _ in range(spec["steps"]):
        step()
    peak = harness.hwm_kib()
    return {"baseline_mib": baseline / 1024, "peak_mib": peak / 1024, "step_peak_mib": (peak - baseline) / 1024}


def run_memory(
    source: str, batch, *, threads: int, steps: int, configs=CONFIGS, dtypes=DTYPES, log=print
) -> list[dict]:
    """Peak memory per (config, dtype, system), each in its own fresh process (one at a time)."""
    from .memserver import MemoryServer

    plain = [t.tolist() for t in batch]
    out = []
    with MemoryServer() as server:
        for method, n in configs:
            for dtype in dtypes:
                out.append(_memory_row(server, source, plain, method, n, dtype, threads, steps, log))
    return out


def _memory_row(server, source, plain, method, n, dtype, threads, steps, log) -> dict:
    row = {"method": method, "num_virtual_tokens": n, "dtype": dtype}
    for system in ("softprompt", "peft"):
        spec = {
            "source": source,
            "method": method,
            "num_virtual_tokens": n,
            "dtype": dtype,
            "system": system,
            "threads": threads,
            "steps": steps,
            "batch": plain,
        }
        row[system] = server.measure(spec)
    row["ratio"] = harness.ratio(row["softprompt"]["step_peak_mib"], row["peft"]["step_peak_mib"])
    log(
        f"  memory {tag(method, n):>8} {dtype}: softprompt {row['softprompt']['step_peak_mib']:7.1f} MiB  "
        f"peft {row['peft']['step_peak_mib']:7.1f} MiB  ratio {row['ratio']:.2f}"
    )
    return row
