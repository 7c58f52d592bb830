"""Reproduce every measured number of docs/results.md from scratch, in one command, with a time estimate.

    .venv/bin/python -m bench.reproduce --list                 # the plan: steps, what each reproduces, minutes
    .venv/bin/python -m bench.reproduce                        # all of it (about 11 hours on 2 CPU cores)
    .venv/bin/python -m bench.reproduce --only fpb-prefix-e4   # one step (and nothing it needs is redone)
    .venv/bin/python -m bench.reproduce --quick                # every step on a tiny random model: checks the plan

Each step runs the command lines docs/results.md quotes (`bench.quality`, `bench.sweep`, `softprompt train
--init-from` and `--kfold`, `softprompt eval` and `predict`, `bench.cross_model`) as child processes, in order, into
``<out>/<step>/``, then reads what they wrote and sets it beside the number the docs report. A step that
finished is not run again (its ``done.json``), so an interrupted run picks up where it stopped; ``--force``
redoes the named steps. The estimate is what each step took when the docs' numbers were measured (2 idle
cores, AMD EPYC); an overall bar shows the minutes done against the estimate and the time left.

Writes ``<out>/summary.md`` and ``summary.json``: step, figure, documented, reproduced, difference.
Training is seeded and runs on CPU, so a rerun on the same thread count lands on the same adapters up to
float summation order; the one-off experiments in docs/results.md's "what helped" list (calibration,
templates, self-training, thresholds) are scripts of a session, not steps here, and say so there.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # `python bench/reproduce.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import DATA, REPO  # noqa: E402

SST2_TEMPLATE = "Review: {sentence}\nSentiment:"
SST2_VERBALIZER = '{"0": " negative", "1": " positive"}'


@dataclass(frozen=True)
class Step:
    name: str
    what: str  # the part of docs/results.md it reproduces
    minutes: float  # measured when the documented numbers were made (2 idle cores)
    commands: tuple[tuple[str, ...], ...]  # argv after the Python interpreter; <out>, <data>, <smollm2>... filled in
    measure: Callable[[Path], dict[str, float]]  # the step's output dir -> figure -> value
    documented: dict[str, float] = field(default_factory=dict)  # figure -> the value docs/results.md reports
    needs: tuple[str, ...] = ()  # steps whose outputs it reads
    stdout: str | None = None  # file (in the step dir) that takes the last command's standard output


# ------------------------------------------------------------------------------------------- measuring
def sweep_figures(task: str) -> Callable[[Path], dict[str, float]]:
    def measure(out: Path) -> dict[str, float]:
        result = json.loads((out / task / "sweep.json").read_text())
        figures = {f"{r['name']} test accuracy": r["test_accuracy"] for r in result["adapters"]}
        figures["chosen on validation: test accuracy"] = next(
            r["test_accuracy"] for r in result["adapters"] if r["name"] == result["selected"])
        for key, e in result["ensembles"].items():
            figures[f"ensemble {key}: test accuracy"] = e["test_accuracy"]
        return figures
    return measure


def gemma_fpb_figures(out: Path) -> dict[str, float]:
    first = {f"lr 3e-2: {k}": v for k, v in sweep_figures("financial_phrasebank")(out / "lr3e-2").items()}
    return {**first, **sweep_figures("financial_phrasebank")(out)}


def eval_figures(out: Path) -> dict[str, float]:
    metrics = json.loads((out / "dev_eval.json").read_text())["default"]["metrics"]  # `softprompt eval --json`
    return {"dev accuracy": metrics["accuracy"], "dev macro-F1": metrics["macro_f1"]}


def quality_figures(tasks: tuple[str, ...]) -> Callable[[Path], dict[str, float]]:
    def measure(out: Path) -> dict[str, float]:
        return flatten_quality(json.loads((out / "quality.json").read_text()), tasks)
    return measure


def flatten_quality(result: dict, tasks: tuple[str, ...]) -> dict[str, float]:
    """``{task}: {system} {metric}`` -> value, for the metrics the results tables show."""
    figures = {}
    for task in tasks:
        for system, scores in result["tasks"].get(task, {}).get("systems", {}).items():
            if task == "generation":
                for name, value in scores.items():
                    figures[f"{system}, {name}: perplexity"] = value["perplexity"]
                continue
            for metric in ("accuracy", "macro_f1", "macro_f1_pooled"):
                if metric in scores:
                    figures[f"{task}, {system}: {metric}"] = scores[metric]
    return figures


def documented_quality(tasks: tuple[str, ...]) -> dict[str, float]:
    """The numbers behind docs/results.md's tables (kept beside it in docs/results.json)."""
    path = REPO / "docs" / "results.json"
    return flatten_quality(json.loads(path.read_text()), tasks) if path.exists() else {}


def cross_model_figures(out: Path) -> dict[str, float]:
    result = json.loads((out / "ensemble.json").read_text())
    figures = {}
    for split, s in result["splits"].items():
        figures[f"{split}: ensemble accuracy"] = s["ensemble"]["accuracy"]
        figures[f"{split}: ensemble macro-F1"] = s["ensemble"]["macro_f1"]
        for i, m in enumerate(s["members"]):
            figures[f"{split}: member {i} ({result['members'][i]['model']}) accuracy"] = m["accuracy"]
        figures[f"{split}: rows all members get wrong"] = s["all_wrong"]
    return figures


def raft_transfer_figures(out: Path) -> dict[str, float]:
    from softprompt.data import load_rows

    def labels_by_id(path: Path) -> dict[str, str]:  # a `softprompt predict` file: ID,Label
        return {r["ID"]: r["Label"] for r in load_rows(path)}

    pooled = json.loads((out / "cv" / "cv_report.json").read_text())["pooled"]  # `softprompt train --kfold`
    predicted = labels_by_id(out / "predictions.csv")
    figures = {"10-fold CV pooled macro-F1": pooled["adapter"]["macro_f1"],
               "10-fold CV pooled accuracy": pooled["adapter"]["accuracy"],
               "zero-shot pooled macro-F1": pooled["base"]["macro_f1"], "test tweets predicted": len(predicted),
               "test tweets called complaints": sum(label == "1" for label in predicted.values()) / max(len(predicted), 1)}
    shipped = REPO / "results" / "raft_twitter_complaints_predictions.csv"
    if shipped.exists():  # the submission file in the repository: did this run predict the same labels?
        kept = labels_by_id(shipped)
        figures["predictions differing from results/"] = sum(kept.get(i) != label for i, label in predicted.items())
    return figures


# ------------------------------------------------------------------------------------------- the plan
RAFT_RECIPE = "recipes/results/raft_twitter_complaints_gemma.yaml"


def raft_transfer(*flags: str) -> tuple[str, ...]:
    """The RAFT recipe on gemma3-270m, started from the SST-2 adapter this plan trained (not the shipped copy).
    --max-length and --batch-size repeat the recipe's values so that --quick can shrink them (QUICK_FLAGS)."""
    return ("-m", "softprompt.cli", "train", RAFT_RECIPE, "--model", "<gemma>",
            "--init-from", "<runs>/gemma-sst2-19000/sst2/pt20-lr0p1", "--data", "<data>/raft_twitter_complaints/train.csv",
            "--max-length", "128", "--batch-size", "8", *flags)


def sweep(out_task: str, *flags: str) -> tuple[str, ...]:
    return ("-m", "bench.sweep", "--task", out_task, *flags, "--out", "<out>")


def sst2_chain_step(n: int, start: str, seen_adapters: tuple[str, ...], seen_files: tuple[str, ...], seed: int,
                    train: int | None, dedupe: bool, minutes: float, dev: float, what: str) -> Step:
    """One link of the SST-2 chain: cut rows no earlier run saw, continue the adapter on them, score dev."""
    cut = ["-m", "bench.reproduce", "cut", "--data", "<data>/sst2/train.tsv", "--seed", str(seed), "--val", "1000",
           "--out", "<out>"] + (["--train", str(train)] if train else []) + (["--dedupe"] if dedupe else [])
    for a in seen_adapters:
        cut += ["--seen-adapter", a]
    for f in seen_files:
        cut += ["--seen-file", f]
    train_cmd = ("-m", "softprompt.cli", "train", "--model", "<smollm2>", "--method", "prefix-tuning",
                 "--num-virtual-tokens", "20", "--init-from", start, "--data", "<out>/train_new.tsv",
                 "--validation-data", "<out>/val_new.tsv", "--label-column", "label", "--template", SST2_TEMPLATE,
                 "--verbalizer", SST2_VERBALIZER, "--max-length", "96", "--epochs", "1", "--batch-size", "8",
                 "--lr", "3e-3", "--warmup-ratio", "0.06", "--seed", "42", "--eval-zero-shot", "false",
                 "--log-every", "25", "--output", "<out>/out")
    evaluate = ("-m", "softprompt.cli", "eval", "--model", "<smollm2>", "--adapter", "<out>/out/default",
                "--data", "<data>/sst2/dev.tsv", "--json")
    return Step(f"sst2-chain-{n}", what, minutes, (tuple(cut), train_cmd, evaluate), eval_figures,
                {"dev accuracy": dev}, needs=tuple(sorted({a.split("/")[1] for a in seen_adapters + (start,)})),
                stdout="dev_eval.json")


def plan() -> list[Step]:
    fpb, sst = "financial_phrasebank", "sst2"
    quality_tasks = ("financial_phrasebank", "sst2", "generation")
    prefix = ("--methods", "prefix_tuning", "--train-limit", "2038", "--ensemble", "2", "--threads", "2")
    chain1 = "<runs>/sst2-prefix-20k/sst2/prefix20-lr0p01"
    chain = [f"<runs>/sst2-chain-{n}/out/default" for n in (2, 3, 4)]
    return [
        Step("quality", "the financial_phrasebank, SST-2 and generation tables (standard budget: 600 rows, 1 epoch; "
             "PEFT beside softprompt)", 150.0,
             (("-m", "bench.quality", "--tasks", ",".join(quality_tasks), "--threads", "1", "--out", "<out>",
               "--doc", "<out>/results.md"),), quality_figures(quality_tasks), documented_quality(quality_tasks)),
        Step("quality-raft", "the RAFT table (10-fold CV, 10 epochs per fold) and its test-tweet predictions", 20.0,
             (("-m", "bench.quality", "--tasks", "raft_twitter_complaints", "--cv-epochs", "10", "--out", "<out>",
               "--doc", "<out>/results.md"),),
             quality_figures(("raft_twitter_complaints",)), documented_quality(("raft_twitter_complaints",))),
        Step("fpb-prompt-500", "financial_phrasebank prompt-tuning grid, 450 rows, 2 epochs", 39.5,
             (sweep(fpb, "--lrs", "3e-2,1e-1", "--tokens", "8,20", "--train-limit", "500", "--threads", "1"),),
             sweep_figures(fpb), {"chosen on validation: test accuracy": 0.894, "ensemble all: test accuracy": 0.916}),
        Step("fpb-prompt-full", "financial_phrasebank prompt-tuning grid, all 1,834 rows, 1 epoch", 64.7,
             (sweep(fpb, "--lrs", "3e-2,1e-1", "--tokens", "8,20", "--train-limit", "2038", "--epochs", "1",
                    "--threads", "2"),),
             sweep_figures(fpb), {"chosen on validation: test accuracy": 0.942}),
        *[Step(f"fpb-prefix-e{e}", f"financial_phrasebank prefix tuning, all rows, {e} epoch(s)", minutes,
               (sweep(fpb, *prefix, "--lrs", lrs, "--tokens", tokens, "--epochs", str(e)),), sweep_figures(fpb),
               {"chosen on validation: test accuracy": acc})
          for e, lrs, tokens, minutes, acc in ((1, "1e-2,3e-2", "20", 10.0, 0.960), (2, "1e-2,3e-2", "20", 26.4, 0.965),
                                               (3, "5e-3,1e-2", "20", 32.6, 0.973), (4, "1e-2", "20,40", 59.8, 0.978))],
        Step("sst2-4000", "SST-2 prompt and prefix tuning in one job, 3,600 rows", 28.5,
             (sweep(sst, "--methods", "prompt_tuning,prefix_tuning", "--lrs", "3e-2", "--tokens", "20",
                    "--train-limit", "4000", "--epochs", "1", "--ensemble", "2", "--threads", "2"),),
             sweep_figures(sst), {"pt20-lr0p03 test accuracy": 0.885, "prefix20-lr0p03 test accuracy": 0.882}),
        Step("sst2-prefix-20k", "SST-2 prefix tuning, 19,000 rows (the chain's first link)", 39.0,
             (sweep(sst, "--methods", "prefix_tuning", "--lrs", "1e-2", "--tokens", "20", "--train-limit", "20000",
                    "--val-fraction", "0.05", "--epochs", "1", "--ensemble", "1", "--threads", "2"),),
             sweep_figures(sst), {"chosen on validation: test accuracy": 0.898}),
        # The chain's data cuts are the ones its runs used (recovered from their files): which rows were
        # already seen, the shuffle seed, and whether duplicate texts were dropped.
        sst2_chain_step(2, chain1, (chain1,), (), 7, 19000, False, 40.0, 0.903,
                        "SST-2 chain, 2nd link: 19,000 unseen rows, --init-from, lr 3e-3"),
        sst2_chain_step(3, chain[0], (chain1, chain[0]), ("<runs>/sst2-chain-2/val_new.tsv",), 11, 14000, False,
                        29.0, 0.907, "SST-2 chain, 3rd link: 14,000 more rows"),
        sst2_chain_step(4, chain[1], (chain1, chain[0], chain[1]), ("<runs>/sst2-chain-2/val_new.tsv", "<runs>/sst2-chain-3/val_new.tsv"),
                        11, None, True, 26.0, 0.908, "SST-2 chain, 4th link: the last 12,058 distinct texts"),
        Step("gemma-fpb", "gemma3-270m on financial_phrasebank at smollm2's lr, then its own lr sweep", 8.5,
             (sweep(fpb, "--model", "<gemma>", "--lrs", "3e-2", "--tokens", "8", "--train-limit", "600", "--epochs", "1",
                    "--ensemble", "1") + ("--out", "<out>/lr3e-2"),
              sweep(fpb, "--model", "<gemma>", "--lrs", "1e-1,3e-1", "--tokens", "8", "--train-limit", "600",
                    "--epochs", "1", "--ensemble", "1")),
             gemma_fpb_figures, {"lr 3e-2: pt8-lr0p03 test accuracy": 0.686, "chosen on validation: test accuracy": 0.867,
                                 "pt8-lr0p3 test accuracy": 0.814, "ensemble all: test accuracy": 0.845}),
        Step("gemma-sst2-3600", "gemma3-270m SST-2 prompt tuning, 3,600 rows", 9.3,
             (sweep(sst, "--model", "<gemma>", "--methods", "prompt_tuning", "--lrs", "1e-1", "--tokens", "20",
                    "--train-limit", "4000", "--epochs", "1", "--ensemble", "1", "--threads", "2"),),
             sweep_figures(sst), {"chosen on validation: test accuracy": 0.890}),
        Step("gemma-sst2-19000", "gemma3-270m SST-2 prompt tuning, 19,000 rows (the best single adapter)", 44.9,
             (sweep(sst, "--model", "<gemma>", "--methods", "prompt_tuning", "--lrs", "1e-1", "--tokens", "20",
                    "--train-limit", "20000", "--val-fraction", "0.05", "--epochs", "1", "--ensemble", "1",
                    "--threads", "2"),),
             sweep_figures(sst), {"chosen on validation: test accuracy": 0.912}),
        Step("sst2-two-models", "the SST-2 ensemble of smollm2's chain and gemma's adapter (equal weights)", 8.0,
             (("-m", "bench.cross_model", "--member", f"<smollm2>={chain[2]}",
               "--member", "<gemma>=<runs>/gemma-sst2-19000/sst2/pt20-lr0p1",
               "--validation", "<runs>/sst2-chain-4/val_new.tsv", "--test", "<data>/sst2/dev.tsv",
               "--out", "<out>/ensemble.json"),),
             cross_model_figures, {"test: ensemble accuracy": 0.917, "validation: ensemble accuracy": 0.926,
                                   "test: rows all members get wrong": 47},
             needs=("sst2-chain-4", "gemma-sst2-19000")),
        Step("raft-two-models", "RAFT: smollm2 zero-shot averaged with gemma's SST-2 adapter (no RAFT training)", 3.0,
             (("-m", "bench.cross_model", "--member", "<smollm2>", "--member",
               "<gemma>=<runs>/gemma-sst2-19000/sst2/pt20-lr0p1", "--template", "Tweet: {Tweet text}\nSentiment:",
               "--label-column", "Label", "--verbalizer", '{"1": " negative", "2": " positive"}',
               "--test", "<data>/raft_twitter_complaints/train.csv", "--out", "<out>/ensemble.json"),),
             cross_model_figures, {"test: ensemble macro-F1": 0.836, "test: ensemble accuracy": 0.84},
             needs=("gemma-sst2-19000",)),
        Step("raft-gemma-transfer", "RAFT: gemma3-270m prompt tuning from its SST-2 adapter (10-fold CV), then the "
             "adapter on all 50 tweets and the submission file", 21.0,
             (raft_transfer("--kfold", "10", "--output", "<out>/cv"), raft_transfer("--output", "<out>/final"),
              ("-m", "softprompt.cli", "predict", "--model", "<gemma>", "--adapter", "<out>/final/default", "--data",
               "<data>/raft_twitter_complaints/test_unlabeled.csv", "--id-column", "ID", "--batch-size", "16",
               "--output", "<out>/predictions.csv")),
             raft_transfer_figures, {"10-fold CV pooled macro-F1": 0.866, "10-fold CV pooled accuracy": 0.88,
                                     "zero-shot pooled macro-F1": 0.608, "test tweets predicted": 3399,
                                     "predictions differing from results/": 0},
             needs=("gemma-sst2-19000",)),
    ]


# -------------------------------------------------------------------------------------- the data cuts
def cut_unseen(data: Path, out: Path, *, seen_adapters: list[str], seen_files: list[str], seed: int, val: int,
               train: int | None, dedupe: bool) -> tuple[int, int]:
    """Rows of ``data`` whose rendered text no listed adapter trained on and no listed file holds, shuffled
    (seeded); the first ``val`` to ``val_new.tsv``, the next ``train`` (else the rest) to ``train_new.tsv``."""
    from softprompt.data import Template, load_rows
    from softprompt.data.heldout import fingerprint, read_train_fingerprints
    from softprompt.fileio import atomic_write_text

    render = Template(SST2_TEMPLATE).render
    seen: set[int] = set()
    for adapter in seen_adapters:
        seen |= read_train_fingerprints(adapter)
    for path in seen_files:
        seen |= {fingerprint(render(r)) for r in load_rows(path)}
    fresh, kept = [], set()
    for row in load_rows(data):
        key = fingerprint(render(row))
        if key in seen or (dedupe and key in kept):
            continue
        kept.add(key)
        fresh.append(row)
    random.Random(seed).shuffle(fresh)
    parts = {"val_new.tsv": fresh[:val], "train_new.tsv": fresh[val:val + train if train else None]}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in parts.items():  # written as the documented runs wrote theirs (byte for byte)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["sentence", "label"], delimiter="\t", quoting=csv.QUOTE_NONE,
                                escapechar="\\", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows({"sentence": r["sentence"], "label": r["label"]} for r in rows)
        atomic_write_text(out / name, buffer.getvalue())
    return len(parts["val_new.tsv"]), len(parts["train_new.tsv"])


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
    subs = {"<out>": str(ctx.out / step.name), "<runs>": str(ctx.out), "<data>": str(ctx.data),
            **{f"<{k}>": v for k, v in ctx.models.items()}}
    filled = []
    for arg in argv:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        filled.append(arg)
    if ctx.quick:
        filled = [QUICK_FLAGS.get(prev, arg) for prev, arg in zip([""] + filled, filled)]
        if filled[:2] in (["-m", "bench.sweep"], ["-m", "bench.quality"]):
            filled.append("--quick")
    return [sys.executable, *filled]


def run_step(step: Step, ctx: Context) -> dict:
    """Run a step's command lines in order (stopping at the first that fails), then measure its outputs."""
    from softprompt.fileio import atomic_write_json, atomic_write_text

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
            raise SystemExit(f"bench.reproduce: step {step.name}: `{' '.join(command[1:3])} ...` exited with "
                             f"{proc.returncode}; its output is above, its files in {where}")
        if capture:
            atomic_write_text(where / step.stdout, proc.stdout)
    reproduced = step.measure(where)
    done = {"step": step.name, "what": step.what, "minutes": (time.time() - started) / 60, "date": time.strftime("%Y-%m-%d"),
            "quick": ctx.quick, "documented": step.documented, "reproduced": reproduced}
    atomic_write_json(where / "done.json", done)
    return done


def summary_markdown(done: list[dict]) -> str:
    """The documented figures beside the reproduced ones (every figure a step measured is in summary.json)."""
    lines = ["# Reproduced numbers (`python -m bench.reproduce`)", "",
             "| step | figure | documented | reproduced | difference |", "| --- | --- | ---: | ---: | ---: |"]

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
    quick = " (quick mode: a tiny random model, so the figures are not the documented ones)" if any(
        d["quick"] for d in done) else ""
    return "\n".join(lines) + f"\n\n{len(done)} steps, {minutes:.1f} min{quick}.\n"


def select(steps: list[Step], only: str | None) -> list[Step]:
    if not only:
        return steps
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name for s in steps}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"bench.reproduce: --only: no step {', '.join(unknown)}; the steps are {', '.join(known)}")
    return [s for s in steps if s.name in names]


def check_needs(chosen: list[Step], out: Path) -> None:
    names = {s.name for s in chosen}
    for step in chosen:
        missing = [n for n in step.needs if n not in names and not (out / n / "done.json").exists()]
        if missing:
            raise SystemExit(f"bench.reproduce: step {step.name} needs {', '.join(missing)} done first "
                             f"(in {out}); add them to --only or run them first")


def quick_context(out: Path) -> Context:
    """Stand-in SST-2 and RAFT files and a tiny random model saved to disk, for the steps that read files."""
    from bench.models import tiny_llama
    from bench.quality import TASKS, _synthetic_rows

    data = out / "quick_data"
    (data / "sst2").mkdir(parents=True, exist_ok=True)
    rows = _synthetic_rows(TASKS["sst2"], 120, 0)
    for name, part in (("train.tsv", rows[:96]), ("dev.tsv", rows[96:])):
        (data / "sst2" / name).write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in part))
    (data / "raft_twitter_complaints").mkdir(exist_ok=True)
    with open(data / "raft_twitter_complaints" / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["Tweet text", "Label"])
        writer.writeheader()
        writer.writerows(_synthetic_rows(TASKS["raft_twitter_complaints"], 20, 0))
    with open(data / "raft_twitter_complaints" / "test_unlabeled.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["Tweet text", "ID"])
        writer.writeheader()
        writer.writerows({"Tweet text": r["Tweet text"], "ID": 50 + i}
                         for i, r in enumerate(_synthetic_rows(TASKS["raft_twitter_complaints"], 12, 1)))
    model_dir = out / "quick_model"
    if not (model_dir / "config.json").exists():
        base, tokenizer = tiny_llama(0)  # the weights bench's --quick runs build in-process
        base.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return Context(out, data, {"smollm2": str(model_dir), "gemma": str(model_dir)}, quick=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--list", action="store_true", help="print the plan with its time estimate and stop")
    p.add_argument("--only", help="comma-separated step names (see --list)")
    p.add_argument("--force", action="store_true", help="rerun steps that already finished")
    p.add_argument("--out", default="runs/reproduce", help="root of every step's output")
    p.add_argument("--quick", action="store_true", help="every step on a tiny random model and stand-in rows")
    return p.parse_args(argv)


def parse_cut_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.reproduce cut", description=cut_unseen.__doc__)
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
                raise SystemExit(f"bench.reproduce cut: {path}: no such file or directory")
        val, train = cut_unseen(Path(a.data), Path(a.out), seen_adapters=a.seen_adapter, seen_files=a.seen_file,
                                seed=a.seed, val=a.val, train=a.train, dedupe=a.dedupe)
        print(f"bench.reproduce cut: {val} validation and {train} training rows no earlier run saw -> {a.out}")
        return 0
    args = parse_args(argv)
    every_step = plan()  # reads docs/results.json once for the documented figures
    steps = select(every_step, args.only)
    out = Path(args.out).resolve()  # the steps run with the repository as their working directory
    todo = [s for s in steps if args.force or not (out / s.name / "done.json").exists()]
    total = sum(s.minutes for s in todo)
    print(f"bench.reproduce: {len(todo)} of {len(steps)} steps to run, about {total / 60:.1f} h on 2 idle CPU cores"
          + (" (quick mode: minutes)" if args.quick else ""))
    for s in steps:
        state = "to run" if s in todo else "done"
        print(f"  {s.name:<19} {s.minutes:6.1f} min  {state:<6}  {s.what}")
    if args.list:
        return 0
    check_needs(todo, out)
    if not args.quick and not DATA.exists():
        raise SystemExit(f"bench.reproduce: {DATA}: no such directory; the steps read the shared data sets there in place")
    ctx = quick_context(out) if args.quick else Context(out, DATA, {"smollm2": "smollm2-135m", "gemma": "gemma3-270m"})
    from tqdm import tqdm

    bar = tqdm(total=round(total, 1), unit="min", desc="bench.reproduce (estimated minutes)",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} min [{elapsed}<{remaining}]")
    for step in todo:
        run_step(step, ctx)
        bar.update(step.minutes)
    bar.close()
    # Every finished step of the plan, also those of earlier invocations (--only runs part of it).
    done = [json.loads((out / s.name / "done.json").read_text()) for s in every_step
            if (out / s.name / "done.json").exists()]
    from softprompt.fileio import atomic_write_json, atomic_write_text

    summary = summary_markdown(done)
    atomic_write_json(out / "summary.json", done)
    atomic_write_text(out / "summary.md", summary)
    print("\n" + summary)
    print(f"bench.reproduce: wrote {out / 'summary.md'} and summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
