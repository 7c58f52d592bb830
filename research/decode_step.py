"""Per-step decode time of the three decode paths (issue 27): eager, static and compiled.

    nice -n 5 python -m research.decode_step [--model smollm2-135m] [--batches 1 16] [--tokens 64]
        [--dtypes float32 bfloat16] [--repeats 3] [--out research/results/decode-step.json]

For each dtype and batch size, ``model.generate`` (greedy, public API) runs ``--tokens`` new tokens and one
token; a step's time is their difference over the steps between. The paths alternate inside each round
(`research.harness.interleaved`). A compiled path's first call at each shape compiles: its extra time over a
steady call is reported as the compile time of that bucket (slots, capacity).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import softprompt
from research import harness

PROMPT = "Once upon a time, in a small village by the sea, there lived"
MODES = ("eager", "static", "compiled")


def _generate(model, mode: str, prompts: list[str], tokens: int) -> int:
    model.decode = mode
    out = model.generate(prompts, max_new_tokens=tokens, return_details=True)
    return max(len(g.token_ids) for g in out)


def measure(model, batch: int, tokens: int, repeats: int) -> dict:
    prompts = [f"{PROMPT} {i}" for i in range(batch)]
    compile_s = {}
    start = time.perf_counter()
    _generate(model, "compiled", prompts, tokens)  # compiles this bucket
    compile_s["first_call_s"] = time.perf_counter() - start
    steps = _generate(model, "eager", prompts, tokens) - 1
    fns = {}
    for mode in MODES:
        fns[f"{mode}-{tokens}"] = lambda mode=mode: _generate(model, mode, prompts, tokens)
        fns[f"{mode}-1"] = lambda mode=mode: _generate(model, mode, prompts, 1)
    times = harness.interleaved(fns, repeats=repeats, warmup=1)
    step_ms = {
        mode: (harness.median_ms(times[f"{mode}-{tokens}"]) - harness.median_ms(times[f"{mode}-1"])) / steps
        for mode in MODES
    }
    steady = harness.median_ms(times[f"compiled-{tokens}"]) / 1000
    compile_s["compile_s"] = compile_s["first_call_s"] - steady
    return {
        "batch": batch,
        "steps": steps,
        "step_ms": step_ms,
        "tokens_per_s": {mode: batch * 1000 / ms for mode, ms in step_ms.items()},
        "vs_eager": {mode: step_ms["eager"] / ms for mode, ms in step_ms.items()},
        **compile_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="research/results/decode-step.json")
    args = parser.parse_args(argv)
    harness.quiet()
    results = []
    for dtype in args.dtypes:
        model = softprompt.load(args.model, dtype=dtype)
        for batch in args.batches:
            row = {"dtype": dtype, **measure(model, batch, args.tokens, args.repeats)}
            results.append(row)
            steps = ", ".join(f"{m} {row['step_ms'][m]:.1f} ms ({row['vs_eager'][m]:.2f}x)" for m in MODES)
            print(f"{dtype} batch {batch}: per step {steps}; compile {row['compile_s']:.1f} s", flush=True)
    report = {"model": args.model, "tokens": args.tokens, "machine": harness.machine(2), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
