"""Where the time goes: torch.profiler over one path of the benchmark.

    .venv/bin/python -m research.profile train --system softprompt --method prompt_tuning --tokens 8 --dtype fp32
    .venv/bin/python -m research.profile train --system peft
    .venv/bin/python -m research.profile generate --system softprompt
    .venv/bin/python -m research.profile mixed --adapters 16

Prints the operators with the most self CPU time (and their share of the profiled wall time), and
writes the full table to ``--out`` (default runs/bench/profile-<path>-<system>.txt).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "research"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("path", choices=["train", "forward", "generate", "mixed"])
    p.add_argument("--system", choices=["softprompt", "peft", "bare"], default="softprompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="prompt_tuning")
    p.add_argument("--tokens", type=int, default=8, help="virtual tokens")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--adapters", type=int, default=16, help="mixed: distinct adapters in the batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled calls (after one warm-up)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from . import harness

    harness.quiet()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import data, inference, training
    from .models import TINY, Systems, model_path

    torch.set_num_threads(args.threads)
    source = TINY if args.model in (TINY, "tiny") else model_path(args.model)
    systems = Systems.build(source)
    train, dev, _ = data.load_sst2(require=False)
    ids, mask, labels = data.fixed_length_batch(systems.tokenizer, train, 8, 64, 3)
    name = "prof"
    if args.path == "train":
        systems.add(name, args.method, args.tokens, trainable=True)
        step = training.make_step(args.system, systems, name, (ids, mask, labels), args.dtype)
        if args.system == "bare":
            raise SystemExit("train: --system softprompt or peft")
    elif args.path in ("forward", "generate"):
        systems.add(name, args.method, args.tokens)
        pad = inference._pad_id(systems.tokenizer)
        model = {"softprompt": systems.ours, "bare": systems.base}.get(args.system) or systems.peft_for(name)

        def step():
            if args.path == "forward":
                with torch.no_grad():
                    if args.system == "softprompt":
                        return model(ids, mask, adapters=name).logits
                    return model(input_ids=ids, attention_mask=mask).logits
            if args.system == "softprompt":
                return inference.ours_generate(model, ids, mask, name, 10)
            return inference.hf_generate(model, ids, mask, 10, pad)
    else:
        from softprompt.engine.tokens import encode_texts

        names = [f"mix{i}" for i in range(args.adapters)]
        for i, n in enumerate(names):
            systems.add(n, "prompt_tuning", args.tokens, peft=False, seed=i)
        prompts = [data.prompt(ex) for ex in dev[200:216]]
        mids, mmask = encode_texts(systems.tokenizer, prompts, side="left")
        rows = [names[i % len(names)] for i in range(len(prompts))]

        def step():
            return inference.ours_generate(systems.ours, mids, mmask, rows, 10)

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    plain = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_flops=True) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    label = f"{args.path} / {args.system} / {args.method} {args.tokens} / {args.dtype}"
    lines = [
        f"profile: {label}: {plain * 1000:.1f} ms per call unprofiled, {wall / args.steps * 1000:.1f} ms under "
        f"the profiler (which inflates small operators), {args.steps} calls, {args.threads} threads",
        "",
    ]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = e.self_cpu_time_total / 1e6 / wall
        lines.append(
            f"  {share:6.1%}  {e.self_cpu_time_total / 1e3 / args.steps:9.1f} ms/call  {e.count // args.steps:6d} calls  {e.key}"
        )
    lines.append(f"  (sum of self CPU time {total_self / wall:.0%} of wall)")
    mm = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul") and e.flops]
    flops = sum(e.flops for e in mm)
    mm_s = sum(e.self_cpu_time_total for e in mm) / 1e6
    if mm_s:
        lines.append(
            f"  matrix products: {flops / args.steps / 1e9:.1f} GFLOP per call, {mm_s / wall:.0%} of wall, "
            f"{flops / mm_s / 1e9:.0f} GFLOP/s while in them (profiled); "
            f"{flops / args.steps / plain / 1e9:.0f} GFLOP/s over the unprofiled call"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or f"runs/bench/profile-{args.path}-{args.system}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
