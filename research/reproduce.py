"""Reproduce every measured number of docs/results.md and research/NOTES.md from scratch, in one command.

    .venv/bin/python -m research.reproduce --list                 # the plan: steps, what each reproduces, minutes
    .venv/bin/python -m research.reproduce                        # all of it (about 11 hours on 2 CPU cores)
    .venv/bin/python -m research.reproduce --only fpb-prefix-e4   # one step (and nothing it needs is redone)
    .venv/bin/python -m research.reproduce --quick                # every step on a tiny random model: checks the plan

Each step (``research.reproduce_plan``) runs the command lines the docs quote (`research.quality`, `research.sweep`, `softprompt train
--init-from` and `--kfold`, `softprompt eval` and `predict`, `research.cross_model`) as child processes, in order, into
``<out>/<step>/``, then reads what they wrote and sets it beside the number the docs report. A step that
finished is not run again (its ``done.json``), so an interrupted run picks up where it stopped; ``--force``
redoes the named steps. The estimate is what each step took when the docs' numbers were measured (2 idle
cores, AMD EPYC); an overall bar shows the minutes done against the estimate and the time left.

Writes ``<out>/summary.md`` and ``summary.json``: step, figure, documented, reproduced, difference.
Training is seeded and runs on CPU, so a rerun on the same thread count lands on the same adapters up to
float summation order; the one-off experiments in research/NOTES.md (calibration, templates,
self-training, thresholds) were scripts of a session, not steps here, and say so there. Everything is
written under ``--out`` (default ``runs/reproduce``), never into ``docs/`` or ``examples/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):  # `python research/reproduce.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.models import tiny_llama
from research.paths import DATA, REPO, own_output
from research.reproduce_plan import Step, cut_unseen, plan
from research.tasks import TASKS, synthetic_rows
from softprompt.fileio import atomic_write_json, atomic_write_text


# ----------------------------------------------------------------------------------------- the runner
@dataclass
class Context:
    out: Path  # the run's root: <out>/<step>/ per step
    data: Path  # ../shared/data, or stand-in files in quick mode
    models: dict[str, str]  # <smollm2>, <gemma> -> a built-in name, or a tiny model directory in quick mode
    quick: bool = False


# Quick mode keeps every command line but shrinks the flags that set how much is done.
QUICK_FLAGS = {"--val": "6", "--train": "24", "--max-length": "48", "--batch-size": "4", "--log-every": "1"}


def fill(argv: tuple[str, ...], ctx: Context, step: Step) -> list[str]:
    subs = {
        "<out>": str(ctx.out / step.name),
        "<runs>": str(ctx.out),
        "<data>": str(ctx.data),
        **{f"<{k}>": v for k, v in ctx.models.items()},
    }
    filled = []
    for arg in argv:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        filled.append(arg)
    if ctx.quick:
        filled = [QUICK_FLAGS.get(prev, arg) for prev, arg in zip([""] + filled, filled)]
        if filled[:2] in (["-m", "research.sweep"], ["-m", "research.quality"]):
            filled.append("--quick")
    return [sys.executable, *filled]


def run_step(step: Step, ctx: Context) -> dict:
    """Run a step's command lines in order (stopping at the first that fails), then measure its outputs."""
    where = ctx.out / step.name
    where.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for i, argv in enumerate(step.commands):
        command = fill(argv, ctx, step)
        print(f"\n[{step.name}] $ python {shlex.join(command[1:])}", flush=True)
        capture = step.stdout is not None and i == len(step.commands) - 1
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE if capture else None, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"research.reproduce: step {step.name}: `{' '.join(command[1:3])} ...` exited with "
                f"{proc.returncode}; its output is above, its files in {where}"
            )
        if capture:
            atomic_write_text(where / step.stdout, proc.stdout)
    reproduced = step.measure(where)
    done = {
        "step": step.name,
        "what": step.what,
        "minutes": (time.time() - started) / 60,
        "date": time.strftime("%Y-%m-%d"),
        "quick": ctx.quick,
        "documented": step.documented,
        "reproduced": reproduced,
    }
    atomic_write_json(where / "done.json", done)
    return done


def summary_markdown(done: list[dict]) -> str:
    """The documented figures beside the reproduced ones (every figure a step measured is in summary.json)."""
    lines = [
        "# Reproduced numbers (`python -m research.reproduce`)",
        "",
        "| step | figure | documented | reproduced | difference |",
        "| --- | --- | ---: | ---: | ---: |",
    ]

    def show(figure: str, value: float) -> str:
        if isinstance(value, int) or "perplexity" in figure:
            return f"{value:g}"
        return f"{value:.3f}" if "macro" in figure else f"{value:.1%}"

    for d in done:
        for figure, was in d["documented"].items():
            value = d["reproduced"].get(figure)
            if value is None:
                lines.append(f"| {d['step']} | {figure} | {show(figure, was)} | not measured | |")
                continue
            diff = value - was
            if isinstance(was, int) or "perplexity" in figure:
                gap = "same" if abs(diff) < 5e-3 else f"{diff:+.2f}"
            else:
                gap = "same" if abs(diff) < 5e-4 else f"{diff * 100:+.1f} points"
            lines.append(f"| {d['step']} | {figure} | {show(figure, was)} | {show(figure, value)} | {gap} |")
    minutes = sum(d["minutes"] for d in done)
    quick = (
        " (quick mode: a tiny random model, so the figures are not the documented ones)"
        if any(d["quick"] for d in done)
        else ""
    )
    return "\n".join(lines) + f"\n\n{len(done)} steps, {minutes:.1f} min{quick}.\n"


def select(steps: list[Step], only: str | None) -> list[Step]:
    if not only:
        return steps
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name for s in steps}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"research.reproduce: --only: no step {', '.join(unknown)}; the steps are {', '.join(known)}")
    return [s for s in steps if s.name in names]


def check_needs(chosen: list[Step], out: Path) -> None:
    names = {s.name for s in chosen}
    for step in chosen:
        missing = [n for n in step.needs if n not in names and not (out / n / "done.json").exists()]
        if missing:
            raise SystemExit(
                f"research.reproduce: step {step.name} needs {', '.join(missing)} done first "
                f"(in {out}); add them to --only or run them first"
            )


def quick_context(out: Path) -> Context:
    """Stand-in SST-2 and RAFT files and a tiny random model saved to disk, for the steps that read files."""
    data = out / "quick_data"
    (data / "sst2").mkdir(parents=True, exist_ok=True)
    rows = synthetic_rows(TASKS["sst2"], 120, 0)
    for name, part in (("train.tsv", rows[:96]), ("dev.tsv", rows[96:])):
        (data / "sst2" / name).write_text(
            "sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in part)
        )
    (data / "raft_twitter_complaints").mkdir(exist_ok=True)
    with open(data / "raft_twitter_complaints" / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["Tweet text", "Label"])
        writer.writeheader()
        writer.writerows(synthetic_rows(TASKS["raft_twitter_complaints"], 20, 0))
    with open(data / "raft_twitter_complaints" / "test_unlabeled.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["Tweet text", "ID"])
        writer.writeheader()
        writer.writerows(
            {"Tweet text": r["Tweet text"], "ID": 50 + i}
            for i, r in enumerate(synthetic_rows(TASKS["raft_twitter_complaints"], 12, 1))
        )
    model_dir = out / "quick_model"
    if not (model_dir / "config.json").exists():
        base, tokenizer = tiny_llama(0)  # the weights research's --quick runs build in-process
        base.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return Context(out, data, {"smollm2": str(model_dir), "gemma": str(model_dir)}, quick=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m research.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--list", action="store_true", help="print the plan with its time estimate and stop")
    p.add_argument("--only", help="comma-separated step names (see --list)")
    p.add_argument("--force", action="store_true", help="rerun steps that already finished")
    p.add_argument("--out", default="runs/reproduce", help="root of every step's output")
    p.add_argument("--quick", action="store_true", help="every step on a tiny random model and stand-in rows")
    return p.parse_args(argv)


def parse_cut_args(argv):
    p = argparse.ArgumentParser(prog="python -m research.reproduce cut", description=cut_unseen.__doc__)
    p.add_argument("--data", required=True, help="SST-2 training TSV")
    p.add_argument("--seen-adapter", action="append", default=[], help="adapter whose training rows are left out")
    p.add_argument("--seen-file", action="append", default=[], help="data file whose rows are left out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--val", type=int, required=True, help="validation rows")
    p.add_argument("--train", type=int, default=None, help="training rows (default: all the rest)")
    p.add_argument("--dedupe", action="store_true", help="keep one row per distinct text")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cut"]:
        a = parse_cut_args(argv[1:])
        for path in [a.data, *a.seen_adapter, *a.seen_file]:
            if not Path(path).exists():
                raise SystemExit(f"research.reproduce cut: {path}: no such file or directory")
        val, train = cut_unseen(
            Path(a.data),
            Path(a.out),
            seen_adapters=a.seen_adapter,
            seen_files=a.seen_file,
            seed=a.seed,
            val=a.val,
            train=a.train,
            dedupe=a.dedupe,
        )
        print(f"research.reproduce cut: {val} validation and {train} training rows no earlier run saw -> {a.out}")
        return 0
    args = parse_args(argv)
    every_step = plan()  # reads research/results/quality.json once for the documented figures
    steps = select(every_step, args.only)
    # resolved: the steps run with the repository as their working directory
    out = own_output(args.out, "--out", "research.reproduce").resolve()
    todo = [s for s in steps if args.force or not (out / s.name / "done.json").exists()]
    total = sum(s.minutes for s in todo)
    print(
        f"research.reproduce: {len(todo)} of {len(steps)} steps to run, about {total / 60:.1f} h on 2 idle CPU cores"
        + (" (quick mode: minutes)" if args.quick else "")
    )
    for s in steps:
        state = "to run" if s in todo else "done"
        print(f"  {s.name:<19} {s.minutes:6.1f} min  {state:<6}  {s.what}")
    if args.list:
        return 0
    check_needs(todo, out)
    if not args.quick and not DATA.exists():
        raise SystemExit(
            f"research.reproduce: {DATA}: no such directory; the steps read the shared data sets there in place"
        )
    ctx = quick_context(out) if args.quick else Context(out, DATA, {"smollm2": "smollm2-135m", "gemma": "gemma3-270m"})
    bar = tqdm(
        total=round(total, 1),
        unit="min",
        desc="research.reproduce (estimated minutes)",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} min [{elapsed}<{remaining}]",
    )
    for step in todo:
        run_step(step, ctx)
        bar.update(step.minutes)
    bar.close()
    # Every finished step of the plan, also those of earlier invocations (--only runs part of it).
    done = [
        json.loads((out / s.name / "done.json").read_text())
        for s in every_step
        if (out / s.name / "done.json").exists()
    ]
    summary = summary_markdown(done)
    atomic_write_json(out / "summary.json", done)
    atomic_write_text(out / "summary.md", summary)
    print("\n" + summary)
    print(f"research.reproduce: wrote {out / 'summary.md'} and summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
