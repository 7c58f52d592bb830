"""Benchmarks against PEFT, side by side in one run.

    .venv/bin/python -m research.run                 # full run on smollm2-135m (about 10 minutes on 2 cores)
    .venv/bin/python -m research.run --quick         # harness check on a tiny random Llama (seconds)
    .venv/bin/python -m research.run --out DIR       # where results.json and results.md go (default runs/bench)

Sections: training (step time and peak memory, softprompt vs PEFT), inference (soft-prompt overhead
over the bare model, and vs PEFT), mixed (mixed-adapter batches and a mixed request stream vs PEFT),
classification (label scoring vs generate-and-match), decode (greedy tokens/s by streams, latency, softprompt's
decode modes and precisions beside transformers and llama.cpp; research/decode.py). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: research/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "research"

from research.paths import own_output

SECTIONS = ("training", "memory", "inference", "mixed", "classification", "decode")

PROFILES = {
    # repeats: timed runs of the training and inference figures; slow_repeats: of the mixed-stream and
    # classification figures, whose single runs take several seconds each; inference_repeats: of the
    # inference overheads, a few percent that only many paired rounds resolve on a noisy VM (forward_repeats:
    # of the forward's, whose rounds are a third as long as generation's; 11 rounds left +-2 points).
    "full": dict(
        model="smollm2-135m",
        repeats=5,
        slow_repeats=3,
        inference_repeats=11,
        forward_repeats=31,
        warmup=1,
        rows=8,
        length=64,
        label_tokens=3,
        new_tokens=10,
        memory_steps=2,
        threads=2,
        mixed_requests=16,
        mixed_batch=16,
        cls_examples=100,
        cls_batch=25,
        cls_train_steps=30,
        decode_streams=(1, 4, 16, 64),
        decode_new_tokens=64,
        decode_repeats=2,
    ),
    "quick": dict(
        model="tiny-llama",
        repeats=3,
        slow_repeats=3,
        inference_repeats=3,
        forward_repeats=3,
        warmup=1,
        rows=8,
        length=64,
        label_tokens=3,
        new_tokens=10,
        memory_steps=1,
        threads=1,
        mixed_requests=16,
        mixed_batch=16,
        cls_examples=20,
        cls_batch=10,
        cls_train_steps=3,
        decode_streams=(1, 4),
        decode_new_tokens=8,
        decode_repeats=1,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m research.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny random model, few repeats: checks the harness")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.add_argument("--model", help="built-in name or checkpoint directory (default: smollm2-135m; quick: tiny)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads for every measurement (default 2; quick: 1, robust on a busy CI box)",
    )
    p.add_argument("--repeats", type=int, help="timed runs per figure (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs before the timed ones")
    p.add_argument(
        "--no-retry",
        action="store_true",
        help="keep rounds during which other processes used the CPU (default: rerun them, full mode)",
    )
    p.add_argument("--decode-streams", help="decode section: comma-separated stream counts (default 1,4,16,64)")
    p.add_argument("--decode-new-tokens", type=int, help="decode section: new tokens per stream (default 64)")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="decode section: leave out the compiled decoders (softprompt's and transformers'), whose compiles take "
        "minutes on 2 cores (quick mode always does)",
    )
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    own_output(args.out, "--out", "research.run")
    from . import harness

    harness.quiet()
    import torch

    from . import data, decode, inference, report, training
    from .models import TINY, Systems, describe_model, model_path

    cfg = dict(PROFILES["quick" if args.quick else "full"])
    for key in ("model", "repeats", "warmup", "threads"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.decode_streams:
        cfg["decode_streams"] = tuple(int(n) for n in args.decode_streams.split(","))
    if args.decode_new_tokens is not None:
        cfg["decode_new_tokens"] = args.decode_new_tokens
    if args.repeats is not None:
        cfg["decode_repeats"] = args.repeats
        cfg["slow_repeats"] = cfg["inference_repeats"] = cfg["forward_repeats"] = args.repeats
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(SECTIONS)}")
    torch.set_num_threads(cfg["threads"])
    harness.CONTENTION_LIMIT = None if args.quick or args.no_retry else 0.10
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.time()
    result = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "command": " ".join(["python -m research.run", *(argv if argv is not None else sys.argv[1:])]),
            "settings": cfg,
            "machine": harness.machine(cfg["threads"]),
            "loadavg_start": harness.loadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
    }
    source = TINY if cfg["model"] in (TINY, "tiny") else model_path(cfg["model"])
    log(
        f"research.run: {result['meta']['mode']} run, model {cfg['model']} ({source}), {cfg['threads']} threads, "
        f"median of {cfg['repeats']} after {cfg['warmup']} warm-up"
    )
    t = time.time()
    systems = Systems.build(source)
    result["meta"]["model"] = {
        "name": cfg["model"],
        "path": source,
        "load_s": time.time() - t,
        **describe_model(systems.base),
    }
    train, dev, where = data.load_sst2(require=not args.quick)
    result["meta"]["data"] = where
    batch = data.fixed_length_batch(systems.tokenizer, train, cfg["rows"], cfg["length"], cfg["label_tokens"])
    timing = dict(repeats=cfg["repeats"], warmup=cfg["warmup"], log=log)
    slow_timing = dict(timing, repeats=cfg["slow_repeats"])
    section_s, contention = {}, {}

    def done(section: str, t0: float) -> None:
        section_s[section] = time.time() - t0
        contention[section] = harness.reset_stats()

    if "training" in sections or "memory" in sections:
        result["training"] = {
            "rows_per_batch": cfg["rows"],
            "tokens_per_row": cfg["length"],
            "label_tokens": cfg["label_tokens"],
            "optimizer": f"AdamW(lr={training.LR})",
            "rows": [],
        }
    if "training" in sections:
        log("training step (forward + backward + AdamW on the adapter):")
        t = time.time()
        result["training"]["rows"] = training.run(systems, batch, **timing)
        done("training", t)
    if "memory" in sections:
        log("training peak memory (fresh process per config and system):")
        t = time.time()
        harness.reset_stats()
        memory = training.run_memory(source, batch, threads=cfg["threads"], steps=cfg["memory_steps"], log=log)
        done("memory", t)
        result["training"]["memory_method"] = training.MEMORY_METHOD.format(steps=cfg["memory_steps"])
        _merge_memory(result["training"]["rows"], memory)
    if "inference" in sections:
        log(f"inference ({cfg['rows']} rows x {cfg['length']} tokens):")
        t = time.time()
        ids, mask, _ = batch
        result["inference"] = {
            "rows_per_batch": cfg["rows"],
            "tokens_per_row": cfg["length"],
            "new_tokens": cfg["new_tokens"],
            "rows": inference.run_overhead(
                systems,
                ids,
                mask,
                new_tokens=cfg["new_tokens"],
                forward_repeats=cfg["forward_repeats"],
                **dict(timing, repeats=cfg["inference_repeats"]),
            ),
        }
        done("inference", t)
    if "mixed" in sections:
        log("mixed adapters (request stream):")
        t = time.time()
        prompts = [data.prompt(ex) for ex in dev[200 : 200 + cfg["mixed_requests"]]]
        result["mixed"] = inference.run_mixed(
            systems, prompts, batch_size=cfg["mixed_batch"], new_tokens=cfg["new_tokens"], **slow_timing
        )
        done("mixed", t)
    if "classification" in sections:
        log("classification (label scoring vs generate-and-match):")
        t = time.time()
        result["classification"] = inference.run_classification(
            systems,
            train,
            dev,
            examples=cfg["cls_examples"],
            batch_size=cfg["cls_batch"],
            train_steps=cfg["cls_train_steps"],
            **slow_timing,
        )
        done("classification", t)

    if "decode" in sections:
        log(f"decode ({cfg['decode_new_tokens']} new tokens greedy, streams {cfg['decode_streams']}):")
        t = time.time()
        result["decode"] = _decode(systems, source, cfg, args.quick, args.no_compile, log)
        decode.plot(result["decode"], out_dir / "decode.png")
        done("decode", t)

    result["targets"] = report.targets(result)
    result["meta"].update(
        duration_s=time.time() - started,
        section_s=section_s,
        contention=contention,
        contention_limit=harness.CONTENTION_LIMIT,
        loadavg_end=harness.loadavg(),
    )
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = report.markdown(result)
    if "decode" in result:
        markdown += "\n### Decode\n\n" + decode.markdown(result["decode"])
    (out_dir / "results.md").write_text(markdown)
    log("")
    log(markdown)
    log(
        f"research.run: wrote {out_dir / 'results.json'} and {out_dir / 'results.md'} in {result['meta']['duration_s']:.0f} s"
    )
    return 0


def _decode(systems, source: str, cfg: dict, quick: bool, no_compile: bool, log) -> dict:
    """The decode section on ``source``; the tiny quick-mode model is saved first, as `softprompt.load` reads a
    directory (and llama.cpp and the compiled decoders, minutes of work, are left out)."""
    import tempfile

    from . import decode

    with tempfile.TemporaryDirectory(prefix="spbench-decode-") as tmp:
        if quick:
            systems.base.save_pretrained(tmp)
            systems.tokenizer.save_pretrained(tmp)
            source = tmp
        return decode.run(
            source,
            model=cfg["model"],
            streams=cfg["decode_streams"],
            new_tokens=cfg["decode_new_tokens"],
            repeats=cfg["decode_repeats"],
            warmup=cfg["warmup"],
            threads=cfg["threads"],
            llama_cpp=not quick,
            compiled=not (quick or no_compile),
            # quick: a harness check that must stay short on a busy CI box (no bitsandbytes row, 4 mixed streams)
            precisions=decode.PRECISIONS[:3] if quick else decode.PRECISIONS,
            mixed_streams=4 if quick else 16,
            log=log,
        )


def _merge_memory(rows: list[dict], memory: list[dict]) -> None:
    by_key = {(r["method"], r["num_virtual_tokens"], r["dtype"]): r for r in rows}
    for m in memory:
        key = (m["method"], m["num_virtual_tokens"], m["dtype"])
        row = by_key.get(key)
        if row is None:
            row = {"method": key[0], "num_virtual_tokens": key[1], "dtype": key[2]}
            rows.append(row)
        row.update(
            softprompt_peak_mib=m["softprompt"]["step_peak_mib"],
            peft_peak_mib=m["peft"]["step_peak_mib"],
            memory_ratio=m["ratio"],
            softprompt_memory=m["softprompt"],
            peft_memory=m["peft"],
        )


if __name__ == "__main__":
    sys.exit(main())
