"""Targets and the markdown report of a run's results (results.json -> results.md)."""

from __future__ import annotations

TRAINING_TARGET = 0.8  # softprompt step time <= 0.8x PEFT's
OVERHEAD_TARGET = 0.03  # prompt-tuned inference <= 3% over the bare model
MIXED_TARGET = 0.9  # 16-adapter batch >= 90% of single-adapter throughput
STREAM_TARGET = 3.0  # mixed request stream >= 3x PEFT's throughput

TAGS = {"prompt_tuning": "prompt tuning", "prefix_tuning": "prefix tuning", "p_tuning": "P-tuning"}


def _ci(bounds) -> str:
    return f"{bounds[0]:+.1%} to {bounds[1]:+.1%}"


def targets(result: dict) -> list[dict]:
    """Where each target stands (reported, never asserted). ``value`` is the worst case over its rows."""
    out = []
    rows = [r for r in result.get("training", {}).get("rows", []) if "ratio" in r]
    if rows:
        worst = max(rows, key=lambda r: r["ratio"])
        out.append(
            {
                "name": "training step time vs PEFT",
                "target": f"<= {TRAINING_TARGET}x",
                "value": worst["ratio"],
                "met": all(r["ratio"] <= TRAINING_TARGET for r in rows),
                "detail": f"worst {TAGS[worst['method']]} {worst['num_virtual_tokens']} {worst['dtype']}; "
                f"met in {sum(r['ratio'] <= TRAINING_TARGET for r in rows)} of {len(rows)} configs",
            }
        )
    rows = result.get("inference", {}).get("rows", [])
    if rows:
        worst = max(rows, key=lambda r: r["overhead_vs_bare"])
        out.append(
            {
                "name": "soft-prompt inference overhead vs bare model",
                "target": f"<= {OVERHEAD_TARGET:.0%}",
                "value": worst["overhead_vs_bare"],
                "met": all(r["overhead_vs_bare"] <= OVERHEAD_TARGET for r in rows),
                "detail": f"worst {worst['task']}, {worst['num_virtual_tokens']} virtual tokens"
                + (f" (95% CI {_ci(worst['overhead_vs_bare_ci95'])})" if "overhead_vs_bare_ci95" in worst else ""),
            }
        )
    mixed = {r["adapters"]: r for r in result.get("mixed", {}).get("rows", [])}
    if mixed:
        top = mixed[max(mixed)]
        out.append(
            {
                "name": f"{top['adapters']}-adapter batch vs single-adapter throughput",
                "target": f">= {MIXED_TARGET:.0%}",
                "value": top["softprompt_vs_single"],
                "met": top["softprompt_vs_single"] >= MIXED_TARGET,
                "detail": "",
            }
        )
        out.append(
            {
                "name": f"mixed request stream ({top['adapters']} adapters) vs PEFT throughput",
                "target": f">= {STREAM_TARGET:g}x",
                "value": top["speedup_vs_peft"],
                "met": top["speedup_vs_peft"] >= STREAM_TARGET,
                "detail": ", ".join(f"{k} adapters: {r['speedup_vs_peft']:.2f}x" for k, r in sorted(mixed.items())),
            }
        )
    return out


def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None else fmt.format(x)


def _contention_line(meta: dict) -> str:
    stats = meta.get("contention") or {}
    rounds = sum(v.get("rounds", 0) for v in stats.values())
    dropped = sum(v.get("discarded_rounds", 0) for v in stats.values())
    worst = max((v.get("worst_foreign_share", 0.0) for v in stats.values()), default=0.0)
    limit = meta.get("contention_limit")
    rule = (
        f"rounds in which other processes used more than {limit:.0%} of the CPU were rerun: {dropped} of {rounds}"
        if limit is not None
        else f"no rounds rerun for contention ({rounds} rounds)"
    )
    return f"* shared machine: {rule}; the kept rounds' worst share of CPU used by other processes: {worst:.0%}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    m, mach = meta.get("model", {}), meta["machine"]
    lines = [f"# softprompt vs PEFT ({meta['mode']} run)", ""]
    lines += [
        f"* model: `{m.get('name')}` ({m.get('model_type')}, {m.get('parameters', 0) / 1e6:.1f} M parameters, "
        f"{m.get('layers')} layers); data: {meta.get('data')}",
        f"* machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs, {mach.get('memory_gib')} GiB; "
        f"torch {mach['torch']} ({mach['torch_threads']} threads), transformers {mach['transformers']}, "
        f"peft {mach['peft']}, Python {mach['python']}; commit {mach.get('git_commit')}",
        f"* every figure: median of {meta['settings']['repeats']} timed runs (sections 3 and 4: "
        f"{meta['settings']['slow_repeats']}) after {meta['settings']['warmup']} warm-up, systems alternating within the run; load average {meta.get('loadavg_start')} at start, "
        f"{meta.get('loadavg_end')} at end; took {meta.get('duration_s', 0):.0f} s",
        _contention_line(meta),
        f"* command: `{meta['command']}`",
        "",
    ]

    tr = result.get("training")
    if tr and tr.get("rows"):
        lines += [
            f"## 1. Training step ({tr['rows_per_batch']} rows x {tr['tokens_per_row']} tokens, loss on the last "
            f"{tr['label_tokens']}; forward + backward + {tr['optimizer']})",
            "",
            "| method | virtual tokens | precision | softprompt ms | PEFT ms | time ratio | softprompt peak MiB | PEFT peak MiB | memory ratio |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in tr["rows"]:
            prec = "bf16 autocast" if r["dtype"] == "bf16" else "fp32"
            lines.append(
                f"| {TAGS[r['method']]} | {r['num_virtual_tokens']} | {prec} | {_f(r.get('softprompt_ms'))} | "
                f"{_f(r.get('peft_ms'))} | {_f(r.get('ratio'), '{:.2f}')} | {_f(r.get('softprompt_peak_mib'), '{:.0f}')} | "
                f"{_f(r.get('peft_peak_mib'), '{:.0f}')} | {_f(r.get('memory_ratio'), '{:.2f}')} |"
            )
        lines += [
            "",
            "Ratios are softprompt / PEFT (below 1: softprompt is faster or smaller). Peak memory: "
            + tr.get("memory_method", "not measured in this run")
            + ".",
            "",
        ]

    inf = result.get("inference")
    if inf:
        lines += [
            f"## 2. Inference ({inf['rows_per_batch']} rows x {inf['tokens_per_row']} tokens; prompt tuning)",
            "",
            "| task | virtual tokens | bare model ms | softprompt, no adapter ms | softprompt ms | PEFT ms | overhead vs bare | PEFT overhead vs bare | softprompt / PEFT |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in inf["rows"]:
            lines.append(
                f"| {r['task']} | {r['num_virtual_tokens']} | {r['bare_ms']:.1f} | {r['softprompt_none_ms']:.1f} | "
                f"{r['softprompt_ms']:.1f} | {r['peft_ms']:.1f} | {r['overhead_vs_bare']:+.1%}"
                + (f" ({_ci(r['overhead_vs_bare_ci95'])})" if "overhead_vs_bare_ci95" in r else "")
                + " | "
                f"{r['peft_overhead_vs_bare']:+.1%} | {r['ratio_vs_peft']:.2f} |"
            )
        rounds = {r["task"]: len(r.get("runs_ms", {}).get("bare", [])) for r in inf["rows"]}
        repeats = " and ".join(f"{n} ({task})" for task, n in rounds.items())
        lines += [
            "",
            "Bare model: the transformers model called directly (`model(...)`, `model.generate(...)`). "
            "Generation is greedy, exactly the same number of new tokens on every system. "
            f"Times are medians of {repeats} rounds; overheads and softprompt / PEFT are medians of the "
            "per-round ratios (the calls of one round run seconds apart, so a slow spell of the machine "
            "cancels out), with each round starting at the next system; in brackets, the 95% bootstrap interval "
            "of the overhead (rounds resampled with replacement, 2,000 resamples, seeded).",
        ]
        checks = [r for r in inf["rows"] if "rows_identical_to_peft" in r]
        if checks:
            lines.append(
                "Greedy tokens identical to PEFT's: "
                + ", ".join(
                    f"{r['num_virtual_tokens']} virtual tokens {r['rows_identical_to_peft']:.0%} of rows"
                    for r in checks
                )
                + "."
            )
        lines.append("")

    mx = result.get("mixed")
    if mx:
        lines += [
            f"## 3. Mixed adapters ({mx['requests']} requests, prompt tuning {mx['num_virtual_tokens']} tokens, "
            f"{mx['new_tokens']} new tokens each, batches of up to {mx['batch_size']})",
            "",
            "| adapters in the stream | softprompt tok/s | vs single adapter | PEFT tok/s | PEFT generate calls | softprompt / PEFT |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in mx["rows"]:
            lines.append(
                f"| {r['adapters']} | {r['softprompt_tokens_per_s']:.1f} | {r['softprompt_vs_single']:.0%} | "
                f"{r['peft_tokens_per_s']:.1f} | {r['peft_calls']} | {r['speedup_vs_peft']:.2f}x |"
            )
        lines += [
            "",
            "Requests take adapters round robin, so every softprompt batch mixes all of them; PEFT serves the "
            "same stream grouped by adapter (`set_adapter`, then `generate` per group). Throughputs are medians of "
            f"{len(mx['rows'][0]['runs_ms']['softprompt']) if mx['rows'] else 0} rounds; the ratios are medians "
            "of the per-round ratios (the streams of one round run back to back).",
            "",
        ]

    cl = result.get("classification")
    if cl:
        lines += [
            f"## 4. Classification cost ({cl['examples']} labelled examples, batches of {cl['batch_size']}, "
            f"one prompt-tuned adapter trained {cl['train_steps']} steps)",
            "",
            "| method | ms per 100 examples | accuracy | invalid outputs |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in cl["rows"]:
            name = (
                "label scoring (`model.score`)"
                if r["method"] == "score"
                else f"generate ({cl['generate_tokens']} tokens) and match"
            )
            lines.append(f"| {name} | {r['ms_per_100']:.1f} | {r['accuracy']:.1%} | {r['invalid']} |")
        lines += [
            "",
            f"Same adapter, same examples; the two methods predict the same label on "
            f"{cl['predictions_agree']:.0%} of them. Generate-and-match costs {cl['generate_vs_score']:.2f}x scoring.",
            "",
        ]

    if result.get("targets"):
        lines += [
            "## Targets (reported, not asserted)",
            "",
            "| target | goal | measured | met | detail |",
            "| --- | --- | ---: | --- | --- |",
        ]
        for t in result["targets"]:
            pct = "%" in t["target"]
            value = (
                f"{t['value']:+.1%}"
                if pct and "overhead" in t["name"]
                else (f"{t['value']:.0%}" if pct else f"{t['value']:.2f}x")
            )
            lines.append(f"| {t['name']} | {t['target']} | {value} | {'yes' if t['met'] else 'no'} | {t['detail']} |")
        lines.append("")
    return "\n".join(lines)
