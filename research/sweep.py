"""A learning-rate x prompt-length sweep through `softprompt.sweep` (ONE multi-adapter job), then a prompt ensemble.

    .venv/bin/python -m research.sweep --task financial_phrasebank               # 3 lr x 2 lengths, 2 epochs
    .venv/bin/python -m research.sweep --task sst2 --lrs 3e-2,1e-1 --tokens 8,20 --train-limit 2000
    .venv/bin/python -m research.sweep --methods prompt_tuning,prefix_tuning --lrs 1e-2,3e-2 --tokens 8
    .venv/bin/python -m research.sweep --quick                                   # harness check, tiny model

`softprompt.sweep` trains every adapter of the grid in one job on one frozen base (each optimizer step runs
one batch per adapter, same rows, same order) and chooses on validation only: a seeded, label-stratified
slice of the *training* rows (written to ``<out>/<task>/rows/``, the same seeded split as
``research.quality``). What this harness adds is what the command must not do: it scores EVERY adapter on
the held-out test rows, to show how far the validation choice is from the best test figure, and the
ensembles of the top ``--ensemble`` by validation and of all adapters (label probabilities averaged, what
``softprompt predict --adapter A --adapter B`` does).

Writes ``<out>/<task>/sweep.json``, ``sweep.md`` (the table) and ``sweep.png`` (test accuracy per
adapter, validation accuracy beside it), never into ``docs/`` or ``examples/``: ``python -m research.export
<out>/<task>/sweep.json --into examples/adapters`` ships the chosen adapter if it beats the shipped examples.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python research/sweep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import softprompt
from research import harness
from research.models import TINY, Systems, model_path
from research.paths import own_output
from research.quality import score_ours
from research.tasks import BUDGETS, SEED, TASKS, config_values, examples, is_quick, task_rows
from softprompt.data import train_val_split
from softprompt.fileio import atomic_write_text
from softprompt.training import classification_report, label_probabilities, prompt_budget
from softprompt.training.sweep_report import argmax
from softprompt.training.sweep_space import parse_sweep

SHORT = {"prompt_tuning": "pt", "prefix_tuning": "prefix", "p_tuning": "ptune"}


def adapter_name(lr: float, tokens: int, method: str = "prompt_tuning") -> str:
    return f"{SHORT[method]}{tokens}-lr{lr:g}".replace(".", "p")  # adapter names allow no dots


def run_sweep(
    systems: Systems,
    task_name: str,
    *,
    lrs: list[float],
    tokens: list[int],
    budget: dict,
    val_fraction: float,
    ensemble: int,
    out: Path,
    log=print,
    methods: tuple[str, ...] = ("prompt_tuning",),
) -> dict:
    """Train and choose among every (method, lr, tokens) adapter with `softprompt.sweep` (one multi-adapter
    job, selection on validation); then score each adapter and the ensembles on the test rows."""
    task = TASKS[task_name]
    quick = is_quick(budget)
    train_rows, test_rows, split = task_rows(task, budget, quick)
    fit_rows, val_rows = train_val_split(
        train_rows, val_fraction, SEED, task.label_column, source=f"{task.name} training rows"
    )
    labels = list(task.verbalizer.values())
    test = examples(task, test_rows, f"{task.name} test rows")
    where = out / task.name
    # softprompt.sweep reads files: this run's split is written beside its outputs (never into the repository)
    files = {
        part: _write_rows(where / "rows" / f"{part}.jsonl", r) for part, r in (("fit", fit_rows), ("val", val_rows))
    }
    grid = [(m, lr, n) for m in methods for n in tokens for lr in lrs]
    values = config_values(
        task, budget, methods[0], where / "sweep", name=None, data=files["fit"], validation_data=files["val"]
    )
    values["space"] = {"adapter": [{"method": m, "lr": lr, "num_virtual_tokens": n} for m, lr, n in grid]}
    values["sweep"] = {"selection": "validation", "metric": "accuracy", "seed": SEED}
    log(f"[{task.name}] {split}; {len(fit_rows)} rows fit, {len(val_rows)} validate; {len(grid)} adapters in one job")
    started = time.perf_counter()
    chosen = softprompt.sweep(parse_sweep(values, source=f"research.sweep ({task.name})"), model=systems.ours)
    seconds = time.perf_counter() - started
    rows = []
    for i, (method, lr, n) in enumerate(grid):
        record = json.loads((chosen.output / "results" / f"val-s{i}.json").read_text())
        val_scores = classification_report(record["truth"], argmax(record["probs"], record["labels"]), record["labels"])
        name = adapter_name(lr, n, method)
        # Each adapter also at <out>/<task>/<name>, the layout research.reproduce's later steps read.
        path = shutil.copytree(record["path"], where / name, dirs_exist_ok=True)
        systems.ours.load_adapter(str(path), name=name)
        test_scores = score_ours(systems, name, test, labels, budget)
        rows.append(
            {
                "name": name,
                "method": method,
                "lr": lr,
                "num_virtual_tokens": n,
                "val_accuracy": val_scores["accuracy"],
                "val_macro_f1": val_scores["macro_f1"],
                "test_accuracy": test_scores["accuracy"],
                "test_macro_f1": test_scores["macro_f1"],
                "path": str(path),
            }
        )
        log(f"  {name}: validation {val_scores['accuracy']:.3f}, test {test_scores['accuracy']:.3f}")
    # The sweep's leaderboard order: validation accuracy, ties to the order of the grid.
    ranked = [rows[int(r["candidate"][1:])] for r in chosen.report["leaderboard"] if r["candidate"].startswith("s")]
    texts, targets = [e.text for e in test], [e.target for e in test]

    member_probs: dict[str, list[list[float]]] = {}  # each adapter's test probabilities, scored once

    def ensemble_of(members: list[dict]) -> dict:
        for m in members:
            if m["name"] not in member_probs:
                member_probs[m["name"]] = label_probabilities(
                    systems.ours, texts, labels, [m["name"]], max_input_tokens=_room(systems, labels, budget)
                )
        # The average of the members' probabilities, as `label_probabilities` over all of them gives it.
        probs = [
            [sum(member_probs[m["name"]][i][j] for m in members) / len(members) for j in range(len(labels))]
            for i in range(len(texts))
        ]
        preds = [labels[max(range(len(labels)), key=p.__getitem__)] for p in probs]
        report = classification_report(targets, preds, labels)
        return {
            "members": [m["name"] for m in members],
            "test_accuracy": report["accuracy"],
            "test_macro_f1": report["macro_f1"],
        }

    ensembles = {
        f"top {min(ensemble, len(ranked))} by validation": ensemble_of(ranked[:ensemble]),
        "all": ensemble_of(rows),
    }
    for key, e in ensembles.items():
        log(f"  ensemble {key}: test {e['test_accuracy']:.3f}")
    zero = score_ours(systems, None, test, labels, budget)
    return {
        "task": task.name,
        "split": split,
        "fit_rows": len(fit_rows),
        "val_rows": len(val_rows),
        "test_rows": len(test),
        "epochs": budget["epochs"],
        "batch_size": budget["batch_size"],
        "steps": budget["epochs"] * math.ceil(len(fit_rows) / budget["batch_size"]),  # every adapter's
        "train_seconds": seconds,
        "zero_shot": {"test_accuracy": zero["accuracy"], "test_macro_f1": zero["macro_f1"]},
        "adapters": rows,
        "selected": ranked[0]["name"],
        "ensembles": ensembles,
    }


def _write_rows(path: Path, rows: list[dict]) -> str:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _room(systems: Systems, labels, budget) -> int | None:
    return prompt_budget(systems.ours, labels, budget["max_length"])


def markdown(result: dict) -> str:
    methods = sorted({r.get("method", "prompt_tuning") for r in result["adapters"]})
    lines = [
        f"### Sweep on {result['task']}: {len(result['adapters'])} adapters in one job "
        f"({', '.join(m.replace('_', ' ') for m in methods)})",
        "",
        f"{result['split']}; {result['fit_rows']} rows to fit, {result['val_rows']} held out of them to "
        f"choose; {result['epochs']} epochs of batches of {result['batch_size']}, {result['steps']} steps, "
        f"{result['train_seconds'] / 60:.1f} min for the whole job. Zero-shot test accuracy "
        f"{result['zero_shot']['test_accuracy']:.1%}.",
        "",
        "| adapter | lr | virtual tokens | validation accuracy | test accuracy | test macro-F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["adapters"]:
        mark = " (chosen)" if r["name"] == result["selected"] else ""
        lines.append(
            f"| {r['name']}{mark} | {r['lr']:g} | {r['num_virtual_tokens']} | {r['val_accuracy']:.1%} | "
            f"{r['test_accuracy']:.1%} | {r['test_macro_f1']:.3f} |"
        )
    for key, e in result["ensembles"].items():
        lines.append(
            f"| ensemble, {key} ({', '.join(e['members'])}) | | | | {e['test_accuracy']:.1%} | "
            f"{e['test_macro_f1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib  # only here: the backend must be chosen before pyplot loads, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in result["adapters"]] + [f"ens. {k}" for k in result["ensembles"]]
    test = [r["test_accuracy"] for r in result["adapters"]] + [e["test_accuracy"] for e in result["ensembles"].values()]
    val = [r["val_accuracy"] for r in result["adapters"]] + [float("nan")] * len(result["ensembles"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], val, 0.4, label="validation (chooses)")
    ax.bar([i + 0.2 for i in x], test, 0.4, label="test")
    ax.axhline(result["zero_shot"]["test_accuracy"], color="grey", linestyle="--", label="zero-shot test")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.18)  # room above the bars for the legend
    ax.set_title(f"{result['task']}: one multi-adapter sweep job")
    ax.legend(loc="upper center", ncol=3, fontsize="small")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m research.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", default="financial_phrasebank", choices=["financial_phrasebank", "sst2"])
    p.add_argument("--lrs", default="3e-2,1e-1,3e-1", help="comma-separated learning rates")
    p.add_argument("--tokens", default="8,20", help="comma-separated prompt lengths (virtual tokens)")
    p.add_argument(
        "--methods",
        default="prompt_tuning",
        help="comma-separated methods (prompt_tuning, prefix_tuning, p_tuning), each with every lr and length",
    )
    p.add_argument("--train-limit", type=int, default=1000, help="training rows sampled (seeded) from the split")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training rows that choose")
    p.add_argument("--ensemble", type=int, default=3, help="members of the top-by-validation ensemble")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny random model and stand-in rows: checks the harness")
    p.add_argument("--out", default="runs/sweep")
    return p.parse_args(argv)


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"research.sweep: {flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"research.sweep: {flag}: expected positive numbers, got {text!r}")
    return values


def main(argv=None) -> int:
    args = parse_args(argv)
    own_output(args.out, "--out", "research.sweep")
    harness.quiet()
    torch.set_num_threads(args.threads)
    lrs, tokens = _numbers(args.lrs, float, "--lrs"), _numbers(args.tokens, int, "--tokens")
    methods = tuple(m.strip().replace("-", "_") for m in args.methods.split(",") if m.strip())
    if not methods or any(m not in SHORT for m in methods):
        raise SystemExit(f"research.sweep: --methods: expected some of {', '.join(SHORT)}, got {args.methods!r}")
    if args.quick:
        budget = BUDGETS["quick"]
    else:
        budget = {**BUDGETS["standard"], "epochs": args.epochs, "train_limit": args.train_limit}
    out = Path(args.out)
    systems = Systems.build(TINY if args.quick else model_path(args.model))
    result = run_sweep(
        systems,
        args.task,
        lrs=lrs,
        tokens=tokens,
        budget=budget,
        val_fraction=args.val_fraction,
        ensemble=args.ensemble,
        out=out,
        methods=methods,
    )
    result["meta"] = {
        "model": TINY if args.quick else args.model,
        "machine": harness.machine(args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m research.sweep " + " ".join(argv or sys.argv[1:]),
    }
    where = out / args.task
    where.mkdir(parents=True, exist_ok=True)
    (where / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (where / "sweep.md").write_text(markdown(result))
    plot(result, where / "sweep.png")
    print(markdown(result))
    print(f"research.sweep: wrote {where / 'sweep.json'}, sweep.md and sweep.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
