"""Quality on the reference tasks: zero-shot vs softprompt's three methods vs PEFT, measured in one run.

    .venv/bin/python -m research.quality                        # every task, standard budget, smollm2-135m
    .venv/bin/python -m research.quality --tasks raft --budget full
    .venv/bin/python -m research.quality --quick                # harness check: tiny model, a few rows
    .venv/bin/python -m research.quality --merge --doc research/results/quality.md   # the tables the docs quote

Writes ``<out>/quality.json`` (every number), the tables with ``--doc`` (``research.quality_report``: the
markdown and its numbers beside it, e.g. ``research/results/quality.md`` and ``quality.json``, which
``--merge`` falls back to on a fresh checkout) and the RAFT test-tweet predictions of the RAFT table's
better system (``<out>/raft_twitter_complaints_predictions.csv``). It never writes into ``docs/`` or
``examples/``: the submission file in ``results/`` comes from the best RAFT system measured (step
``raft-gemma-transfer`` of ``research.reproduce``), and ``python -m research.export <out>/quality.json
--into examples/adapters`` ships a task's best adapter of the run if it beats the shipped examples.
Data are read in place from ``../shared/data``.

Every system of a task trains on the same rows in the same order (softprompt's seeded epoch order, which
the PEFT loop reuses), with the same learning rate, schedule and number of steps, and is scored the same
way: the log-likelihood of each label text after the prompt (label scoring). PEFT prompt tuning starts
from the very weights softprompt's prompt-tuning adapter starts from.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python research/quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import harness
from research.models import TINY, Systems, model_path
from research.paths import DATA, own_output
from research.peft_baseline import peft_loss, score_peft, train_peft
from research.quality_report import doc_numbers, previous_result, write_doc
from research.tasks import (
    BUDGETS,
    GENERATION_TOKENS,
    LR,
    SEED,
    TASKS,
    TOKENS,
    Task,
    config_for,
    examples,
    is_quick,
    reported_metrics,
    synthetic_rows,
    task_rows,
)
from softprompt.data import load_rows
from softprompt.training import (
    cross_validate,
    encode_examples,
    evaluate,
    example_loss,
    predict_file,
    prepare_job,
    train_jobs,
)


# ------------------------------------------------------------------------------------------ softprompt
def train_ours(systems: Systems, task: Task, budget: dict, method: str, train_rows, out: Path, log, **extra) -> dict:
    """One softprompt adapter of ``method`` trained on ``train_rows``: its name, path, size and time."""
    config = config_for(task, budget, method, out, **extra)
    spec = config.resolved_adapters()[0]
    job = prepare_job(spec, rows=train_rows, val_rows=[], source=f"{task.name} training rows")
    started = time.perf_counter()
    result = train_jobs(config, systems.ours, [job], progress=True)
    seconds = time.perf_counter() - started
    path = result.adapters[spec.name].path
    log(f"  softprompt {method}: {seconds:.0f} s")
    return {
        "name": spec.name,
        "seconds": seconds,
        "path": str(path),
        "adapter_bytes": (Path(path) / "adapter_model.safetensors").stat().st_size,
        "config": config,
    }


def score_ours(systems: Systems, name: str | None, test, labels, budget) -> dict:
    """Label-scoring metrics of adapter ``name`` (``None``: the base model, zero-shot) on ``test``."""
    started = time.perf_counter()
    report = evaluate(
        systems.ours, test, name, labels, "score", compare_base=False, batch_size=16, max_length=budget["max_length"]
    )
    return {**reported_metrics(report.metrics), "eval_seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------- the tasks
def run_classification(systems: Systems, task: Task, budget: dict, out: Path, log) -> dict:
    """Zero-shot, each softprompt method and PEFT prompt tuning on one task's held-out test rows."""
    train_rows, test_rows, split = task_rows(task, budget, is_quick(budget))
    test = examples(task, test_rows, f"{task.name} test rows")
    labels = list(task.verbalizer.values())
    result = {"task": task.name, "split": split, "systems": {}, "anchors": [list(a) for a in task.anchors]}
    log(f"[{task.name}] {split}")
    result["systems"]["zero-shot"] = {
        **score_ours(systems, None, test, labels, budget),
        "seconds": 0.0,
        "adapter_bytes": 0,
    }
    for method in budget["methods"]:
        trained = train_ours(systems, task, budget, method, train_rows, out / task.name, log)
        scores = score_ours(systems, trained["name"], test, labels, budget)
        result["systems"][f"softprompt {method.replace('_', ' ')}"] = {
            **scores,
            "seconds": trained["seconds"],
            "adapter_bytes": trained["adapter_bytes"],
            "path": trained["path"],
        }
        if method == "prompt_tuning":  # PEFT from the same initial weights, same rows, order and steps
            config = trained["config"]
            peft_name = f"peft-{task.name}"
            systems.add(
                peft_name,
                "prompt_tuning",
                TOKENS[method],
                peft=True,
                trainable=True,
                seed=SEED,
                **({"init_text": task.init_text} if task.init_text else {}),
            )
            # same seed and init text: PEFT's prompt starts from softprompt's initial weights
            items = encode_examples(systems.ours, examples(task, train_rows, "train"), None, config.max_length)
            seconds = train_peft(systems, peft_name, items, config, log)
            result["systems"]["PEFT prompt tuning"] = {
                **score_peft(systems, peft_name, test, labels, budget),
                "seconds": seconds,
                "adapter_bytes": trained["adapter_bytes"],
            }
        log("  " + ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in result["systems"].items()))
    return result


def run_raft(systems: Systems, task: Task, budget: dict, out: Path, log, predictions: Path | None) -> dict:
    """k-fold cross-validation on the 50 labelled tweets, then one adapter on all 50 predicts the test set."""
    data = DATA / task.files["data"]
    if data.exists():
        rows = load_rows(data)
    else:  # quick mode without the data: write stand-in rows where the recipe expects a file
        if not is_quick(budget):
            raise SystemExit(f"research.quality: {task.name} needs {data}")
        rows = synthetic_rows(task, 24, SEED)
        data = out / "raft_stand_in.csv"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(data, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    result = {
        "task": task.name,
        "split": f"{budget['kfold']}-fold cross-validation over the {len(rows)} labelled rows (seed {SEED})",
        "systems": {},
        "anchors": [list(a) for a in task.anchors],
    }
    config = config_for(
        task,
        budget,
        "prompt_tuning",
        out / task.name / "cv",
        data=str(data),
        epochs=budget["cv_epochs"],
        val_fraction=0.0,
        name="pt",
    )
    started = time.perf_counter()
    cv = cross_validate(config, budget["kfold"], model=systems.ours, progress=True)
    seconds = time.perf_counter() - started
    for fold in [n for n in list(systems.ours.adapters) if n.startswith("pt-fold")]:
        systems.ours.remove_adapter(fold)  # free the fold adapters before the final one
    s, pooled = cv.summary, cv.pooled
    result["systems"]["zero-shot"] = {
        "accuracy": s["base_accuracy"]["mean"],
        "accuracy_std": s["base_accuracy"]["std"],
        "macro_f1": s["base_macro_f1"]["mean"],
        "macro_f1_std": s["base_macro_f1"]["std"],
        "accuracy_pooled": pooled["base"]["accuracy"],
        "macro_f1_pooled": pooled["base"]["macro_f1"],
        "seconds": 0.0,
        "adapter_bytes": 0,
        "n": len(rows),
    }
    result["systems"]["softprompt prompt tuning"] = {
        "accuracy": s["accuracy"]["mean"],
        "accuracy_std": s["accuracy"]["std"],
        "macro_f1": s["macro_f1"]["mean"],
        "macro_f1_std": s["macro_f1"]["std"],
        "accuracy_pooled": pooled["adapter"]["accuracy"],
        "macro_f1_pooled": pooled["adapter"]["macro_f1"],
        "seconds": seconds / budget["kfold"],
        "n": len(rows),
        "adapter_bytes": None,
    }
    log(
        f"  CV macro-F1 {s['macro_f1']['mean']:.3f} ± {s['macro_f1']['std']:.3f}, pooled "
        f"{pooled['adapter']['macro_f1']:.3f} (zero-shot {s['base_macro_f1']['mean']:.3f}, pooled "
        f"{pooled['base']['macro_f1']:.3f})"
    )
    # the submission: one adapter trained on all labelled rows, label scoring on the unlabelled test tweets
    final = config_for(
        task,
        budget,
        "prompt_tuning",
        out / task.name / "final",
        data=str(data),
        epochs=budget["cv_epochs"],
        val_fraction=0.0,
        name="final",
    )
    job = prepare_job(final.resolved_adapters()[0], rows=rows, val_rows=[], source=str(data))
    trained = train_jobs(final, systems.ours, [job], progress=True)
    path = trained.adapters["final"].path
    result["systems"]["softprompt prompt tuning"]["adapter_bytes"] = (
        (Path(path) / "adapter_model.safetensors").stat().st_size
    )
    result["final_adapter"] = str(path)
    test = DATA / "raft_twitter_complaints" / "test_unlabeled.csv"
    if predictions is not None and test.exists():
        limit = budget["raft_predict_limit"]
        source = test
        if limit:
            source = out / "raft_test_sample.csv"
            source.write_text("".join(test.read_text(encoding="utf-8").splitlines(keepends=True)[: limit + 1]))
        # The submission comes from whichever system cross-validated better (pooled macro-F1 on the
        # labelled rows): with a good template the zero-shot base model can beat 45 training tweets.
        zero_shot = pooled["base"]["macro_f1"] > pooled["adapter"]["macro_f1"]
        started = time.perf_counter()  # the final adapter was trained with the same template and verbalizer
        predict_file(
            systems.ours,
            {} if zero_shot else {"final": path},
            source,
            predictions,
            id_column="ID",
            label_name="Label",
            template=task.template,
            verbalizer=task.verbalizer,
        )
        result["predictions"] = {
            "path": str(predictions),
            "seconds": time.perf_counter() - started,
            "system": "zero-shot" if zero_shot else "softprompt prompt tuning",
        }
        log(f"  wrote {predictions} ({result['predictions']['system']})")
    return result


def run_generation(systems: Systems, tasks: list[Task], budget: dict, out: Path, log) -> dict:
    """Both adapters trained in ONE softprompt job (mixed batches), PEFT one at a time; held-out perplexity."""
    quick = is_quick(budget)
    limit = {**budget, "train_limit": budget["generation_limit"], "test_limit": budget["test_limit"] or 100}
    split, jobs, tests, trains = {}, [], {}, {}
    config = config_for(
        tasks[0],
        limit,
        "prompt_tuning",
        out / "generation",
        lr=1e-2,
        adapters=[{"name": t.name, "data": str(DATA / t.files["data"]), "template": t.template} for t in tasks],
        label_column=None,
        verbalizer=None,
        init="sample_vocab",
        num_virtual_tokens=GENERATION_TOKENS,
        init_text=None,
    )
    for task, spec in zip(tasks, config.resolved_adapters()):
        train_rows, test_rows, split[task.name] = task_rows(task, limit, quick)
        jobs.append(prepare_job(spec, rows=train_rows, val_rows=[], source=task.name))
        tests[task.name] = examples(task, test_rows, task.name)
        trains[task.name] = examples(task, train_rows, task.name)
    started = time.perf_counter()
    train_jobs(config, systems.ours, jobs, progress=True)
    ours_seconds = time.perf_counter() - started
    result = {"split": split, "systems": {}, "samples": []}
    for task in tasks:
        row = {}
        for who, adapter in (("base model", None), ("softprompt prompt tuning", task.name)):
            nll, n = example_loss(systems.ours, tests[task.name], adapter, max_length=limit["max_length"])
            row[who] = {"loss": nll / n, "perplexity": math.exp(nll / n), "tokens": n}
        peft_name = f"peft-{task.name}"
        systems.add(
            peft_name, "prompt_tuning", GENERATION_TOKENS, peft=True, trainable=True, seed=SEED, init="sample_vocab"
        )
        items = encode_examples(systems.ours, trains[task.name], None, limit["max_length"])
        peft_config = dataclasses.replace(config, lr=1e-2)
        seconds = train_peft(systems, peft_name, items, peft_config, log)
        test_items = encode_examples(systems.ours, tests[task.name], None, limit["max_length"])
        nll, n = peft_loss(systems, peft_name, test_items)
        row["PEFT prompt tuning"] = {"loss": nll / n, "perplexity": math.exp(nll / n), "tokens": n, "seconds": seconds}
        row["softprompt prompt tuning"]["seconds"] = ours_seconds
        result["systems"][task.name] = row
        log(f"  {task.name}: " + ", ".join(f"{k} ppl {v['perplexity']:.2f}" for k, v in row.items()))
    prompts = ["I want you to act as a motivational coach. ", "There are two nice things that should matter to you:"]
    names = [t.name for t in tasks]
    batch = [(p, a) for p in prompts for a in [None] + names]  # every adapter and the base model in ONE batch
    texts = systems.ours.generate(
        [p for p, _ in batch], adapters=[a for _, a in batch], max_new_tokens=30, stop=["\n\n"]
    )
    result["samples"] = [{"prompt": p, "adapter": a or "base model", "text": t} for (p, a), t in zip(batch, texts)]
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.quality", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks",
        default="financial_phrasebank,sst2,raft_twitter_complaints,generation",
        help="Comma-separated: financial_phrasebank, sst2, raft_twitter_complaints, generation.",
    )
    p.add_argument("--budget", choices=["standard", "full"], default="standard")
    p.add_argument("--quick", action="store_true", help="Harness check on a tiny random model, a few rows.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/quality", help="Directory for quality.json and the adapters.")
    p.add_argument(
        "--doc",
        default=None,
        help="Write the markdown tables here, their numbers beside them (the runs the docs quote: "
        "research/results/quality.md).",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cv-epochs", type=int, default=None, help="Override the budget's epochs per cross-validation fold (RAFT)."
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="Keep the other tasks of an existing <out>/quality.json, or of the numbers kept beside "
        "--doc (each task records its own budget).",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="Comma-separated softprompt methods to train (default: the budget's three). With --merge, "
        "a task's other systems are kept from the existing quality.json.",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="Only rewrite --doc from <out>/quality.json (or the numbers kept beside --doc).",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    own_output(args.out, "--out", "research.quality")
    if args.doc:
        own_output(args.doc, "--doc", "research.quality")
    if args.report_only:
        source = previous_result(Path(args.out), args.doc)
        if source is None:
            raise SystemExit(
                f"research.quality: --report-only: no {Path(args.out) / 'quality.json'}"
                + (f" or {doc_numbers(args.doc)}" if args.doc else "")
                + " to report from"
            )
        result = json.loads(source.read_text())
        if args.doc:
            write_doc(args.doc, result)
        return 0
    harness.quiet()
    torch.set_num_threads(args.threads)
    budget = BUDGETS["quick" if args.quick else args.budget]
    overrides = {}
    if args.cv_epochs is not None:
        if args.cv_epochs < 1:
            raise SystemExit(f"research.quality: --cv-epochs: expected a whole number >= 1, got {args.cv_epochs}")
        overrides["cv_epochs"] = args.cv_epochs
    if args.methods is not None:
        methods = tuple(m.strip().replace("-", "_") for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in LR]
        if unknown or not methods:
            raise SystemExit(f"research.quality: --methods: expected some of {', '.join(LR)}, got {args.methods!r}")
        overrides["methods"] = ",".join(methods)
        budget = {**budget, "methods": methods}
    budget = {**budget, **{k: v for k, v in overrides.items() if k != "methods"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = TINY if args.quick else model_path(args.model)
    systems = Systems.build(source)
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.time()
    result = {
        "meta": {
            "budget": "quick" if args.quick else args.budget,
            "model": TINY if args.quick else args.model,
            "machine": harness.machine(args.threads),
            "date": time.strftime("%Y-%m-%d"),
            "lr": LR,
            "virtual_tokens": TOKENS,
            "seed": SEED,
        },
        "tasks": {},
    }
    merge_from = previous_result(out, args.doc) if args.merge else None
    if merge_from is not None:
        previous = json.loads(merge_from.read_text())
        if previous["meta"]["model"] != result["meta"]["model"]:
            raise SystemExit(
                f"research.quality: --merge: {merge_from} is for {previous['meta']['model']}, "
                f"not {result['meta']['model']}"
            )
        result["tasks"] = {k: v for k, v in previous["tasks"].items() if k not in wanted}
        kept_systems = {k: v for k, v in previous["tasks"].items() if k in wanted} if args.methods else {}
        result["meta"]["merged_seconds"] = previous["meta"].get("seconds", 0.0) + previous["meta"].get(
            "merged_seconds", 0.0
        )
    else:
        kept_systems = {}
    predictions = out / "raft_twitter_complaints_predictions.csv"
    for name in wanted:
        task_started = time.time()
        if name == "generation":
            result["tasks"]["generation"] = run_generation(
                systems, [TASKS["chatgpt_prompts"], TASKS["english_quotes"]], budget, out, print
            )
        elif name == "raft_twitter_complaints":
            result["tasks"][name] = run_raft(systems, TASKS[name], budget, out, print, predictions)
        elif name in TASKS:
            result["tasks"][name] = run_classification(systems, TASKS[name], budget, out, print)
        else:
            raise SystemExit(f"research.quality: --tasks: unknown task {name!r}")
        result["tasks"][name]["run"] = {
            "budget": result["meta"]["budget"],
            "overrides": overrides,
            "date": result["meta"]["date"],
            "minutes": (time.time() - task_started) / 60,
        }
        if name in kept_systems and "systems" in kept_systems[name]:
            # Only some methods were rerun: the task's other systems stay, with the run they came from.
            old = kept_systems[name]
            result["tasks"][name]["systems"] = {**old["systems"], **result["tasks"][name]["systems"]}
            result["tasks"][name]["run"]["kept_from"] = old.get("run", {}).get("date")
        result["meta"]["seconds"] = time.time() - started
        (out / "quality.json").write_text(json.dumps(result, indent=2, default=str))  # after every task
    if args.doc:
        write_doc(args.doc, result)
    print(f"done in {(time.time() - started) / 60:.1f} min; {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
