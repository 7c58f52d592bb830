"""What a request joining a running batch costs, and whether fusing its prefill into the decode step would help.

    python -m research.join [--model smollm2-135m] [--dtype bfloat16] [--threads 2] [--out research/results/join.json]

The server's batcher (`softprompt.server.batcher`) runs a step in which requests join as two model calls: the
joining rows' prefill (one mixed batch), then one decode step of every running row. Fusing them, as GPU servers do
("chunked prefill"), means one call in which running rows feed their one new token and joining rows their prompt.
A batch of transformers' attention takes one query length for every row, so on this stack the fused call is the
running rows padded to the prompt's length: ``rows x prompt tokens`` of work instead of ``rows + prompt tokens``.
The cheapest fused call is timed here as `SoftPromptModel.advance` of ``running + joining`` rows fed ``prompt``
tokens each (the padded call without any bookkeeping), beside what the batcher does today (prefill, then step).

Per shape: a plain decode step of the running rows (what they see without a join), today's join step (prefill +
step) and the fused lower bound; medians of ``--repeats`` interleaved calls. Random prompt tokens (time does not
depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "research"

SHAPES = [(4, 8), (4, 32), (4, 128), (16, 8), (16, 32), (16, 128)]  # (running rows, joining prompt tokens)


def median_s(fn, repeats: int, setup=lambda: None) -> float:
    """Median seconds of ``fn(setup())``, ``setup`` untimed (a fresh decode state per call: a step changes it)."""
    fn(setup())  # warm-up
    times = []
    for _ in range(repeats):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, running: int, prompt: int, repeats: int, context: int = 32) -> dict:
    """Seconds of a decode step of ``running`` rows (``context`` tokens each), of one ``prompt``-token row's
    prefill, and of the padded fused call."""
    import torch

    generator = torch.Generator().manual_seed(running * 1000 + prompt)
    vocab = model.base.config.vocab_size

    def ids(rows: int, length: int) -> torch.Tensor:
        return torch.randint(100, vocab, (rows, length), generator=generator)

    def state(rows: int):
        tokens = ids(rows, context)
        return model.prefill(tokens, torch.ones_like(tokens), None)

    joining = ids(1, prompt)
    one = ids(running, 1)
    fused = ids(running + 1, prompt)
    with torch.no_grad():
        step = median_s(lambda s: model.advance(s, one), repeats, lambda: state(running))
        prefill = median_s(lambda _: model.prefill(joining, torch.ones_like(joining), None), repeats)
        padded = median_s(lambda s: model.advance(s, fused), repeats, lambda: state(running + 1))
    return {
        "running": running,
        "prompt_tokens": prompt,
        "step_ms": step * 1000,
        "join_step_ms": (prefill + step) * 1000,
        "fused_lower_bound_ms": padded * 1000,
        "fused_over_today": padded / (prefill + step),
    }


def markdown(result: dict) -> str:
    lines = [
        "| running rows | joining prompt tokens | decode step ms | today: prefill + step ms | fused (padded) ms | "
        "fused / today |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['running']} | {r['prompt_tokens']} | {r['step_ms']:.1f} | {r['join_step_ms']:.1f} | "
            f"{r['fused_lower_bound_ms']:.1f} | {r['fused_over_today']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.join", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON here (research/results/ or runs/)")
    args = p.parse_args(argv)

    import torch

    import softprompt

    from .harness import machine
    from .paths import own_output

    torch.set_num_threads(args.threads)
    model = softprompt.load(args.model, dtype=args.dtype)
    rows = []
    for running, prompt in SHAPES:
        rows.append(measure(model, running, prompt, args.repeats))
        print(f"  {rows[-1]}", flush=True)
    result = {"model": args.model, "dtype": args.dtype, "machine": machine(args.threads), "rows": rows}
    print(markdown(result))
    if args.out:
        out = own_output(args.out, "--out", "research.join")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
