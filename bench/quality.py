"""Quality on the reference tasks: zero-shot vs softprompt's three methods vs PEFT, measured in one run.

    .venv/bin/python -m bench.quality                        # every task, standard budget, smollm2-135m
    .venv/bin/python -m bench.quality --tasks raft --budget full
    .venv/bin/python -m bench.quality --quick                # harness check: tiny model, a few rows

Writes ``<out>/quality.json`` (every number), ``docs/results.md`` (the tables; ``--doc``) with its
numbers beside it (``docs/results.json``, which ``--merge`` falls back to on a fresh checkout), the RAFT
test-tweet predictions of the RAFT table's better system (``<out>/raft_twitter_complaints_predictions.csv``;
the submission file in ``results/`` comes from the best system of docs/results.md, step ``raft-gemma-transfer``
of ``bench.reproduce``) and, with ``--export``, each task's best adapter of the run in ``examples/adapters/``
if it beats the examples shipped there (``bench.export``; not in quick mode). Data are read in place from
``../shared/data``.

Every system of a task trains on the same rows in the same order (softprompt's seeded epoch order, which
the PEFT loop reuses), with the same learning rate, schedule and number of steps, and is scored the same
way: the log-likelihood of each label text after the prompt (label scoring). PEFT prompt tuning starts
from the very weights softprompt's prompt-tuning adapter starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from bench.export import EVALUATIONS, EXAMPLES, export_if_better  # noqa: E402
from bench.models import TINY, Systems, model_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@dataclasses.dataclass
class Task:
    name: str
    kind: str  # "classify" or "generate"
    files: dict  # "data" (split here) or "train"/"test", relative to DATA
    template: str
    text_columns: tuple[str, ...]
    label_column: str | None = None
    verbalizer: dict | None = None
    init_text: str | None = None
    test_fraction: float = 0.1
    kfold: int | None = None
    anchors: tuple[tuple[str, str], ...] = ()


TASKS = {
    "financial_phrasebank": Task(
        "financial_phrasebank", "classify", {"data": "financial_phrasebank/Sentences_AllAgree.txt"},
        "Sentence: {sentence}\nSentiment:", ("sentence",), "label",
        {"negative": " negative", "neutral": " neutral", "positive": " positive"},
        "Classify the sentiment of the financial news sentence as negative, neutral or positive.",
        anchors=(("PEFT prefix tuning, t5-large (random 90/10)", "96.9% accuracy"),
                 ("PEFT LoRA, mt0-large (random 90/10)", "97.4% accuracy"))),
    "sst2": Task(
        "sst2", "classify", {"train": "sst2/train.tsv", "test": "sst2/dev.tsv"},
        "Review: {sentence}\nSentiment:", ("sentence",), "label", {"0": " negative", "1": " positive"},
        "Classify the sentiment of the movie review as positive or negative.",
        anchors=(("Google's released prompt, T5 1.1 base (dev)", "95.07% accuracy"),)),
    "raft_twitter_complaints": Task(
        "raft_twitter_complaints", "classify", {"data": "raft_twitter_complaints/train.csv"},
        # A sentiment cue, not PEFT's "Label : complaint / no complaint": the base model already knows that
        # complaints read negative (zero-shot macro-F1 0.80 on the 50 rows, against 0.25; docs/results.md).
        "Tweet: {Tweet text}\nSentiment:", ("Tweet text",), "Label", {"1": " negative", "2": " positive"},
        "Classify the sentiment of the tweet as negative or positive.", kfold=10,
        anchors=(("human (RAFT test)", "0.897 macro-F1"), ("Flan-T5 (RAFT test)", "0.892 macro-F1"),
                 ("PEFT LoRA, T0-3B (RAFT test)", "0.863 macro-F1"), ("GPT-2 in-context (RAFT test)", "0.723 macro-F1"))),
    "chatgpt_prompts": Task("chatgpt_prompts", "generate", {"data": "awesome_chatgpt_prompts/prompts.csv"},
                            "{prompt}", ("prompt",)),
    "english_quotes": Task("english_quotes", "generate", {"data": "english_quotes/quotes.jsonl"}, "{quote}",
                           ("quote",)),
}

# Per budget: how much data each system sees, and model settings. "standard" fits in about an hour on
# 2 idle cores for every task together (a 135M model trains at 1-2 s per step of 8 rows there);
# "full" follows the reference recipes more closely and takes several hours.
BUDGETS = {
    "quick": {"quick": True, "epochs": 1, "train_limit": 24, "test_limit": 12, "max_length": 48, "batch_size": 4, "kfold": 2,
              "cv_epochs": 1, "raft_predict_limit": 8, "generation_limit": 24, "methods": ("prompt_tuning", "prefix_tuning", "p_tuning")},
    "standard": {"epochs": 1, "train_limit": 600, "test_limit": None, "max_length": 96, "batch_size": 8,
                 "kfold": 10, "cv_epochs": 4, "raft_predict_limit": None, "generation_limit": 200,
                 "methods": ("prompt_tuning", "prefix_tuning", "p_tuning")},
    "full": {"epochs": 3, "train_limit": 6000, "test_limit": None, "max_length": 128, "batch_size": 8, "kfold": 10,
             "cv_epochs": 20, "raft_predict_limit": None, "generation_limit": 1000, "methods": ("prompt_tuning", "prefix_tuning", "p_tuning")},
}
def is_quick(budget: dict) -> bool:
    """The quick (harness-check) budget, also after command-line overrides copied it."""
    return bool(budget.get("quick"))


LR = {"prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "p_tuning": 1e-3}
TOKENS = {"prompt_tuning": 8, "prefix_tuning": 8, "p_tuning": 8}
GENERATION_TOKENS = 8
SEED = 42


# ------------------------------------------------------------------------------------------------ data
def _synthetic_rows(task: Task, n: int, seed: int) -> list[dict]:
    """Stand-in rows with the task's columns (quick mode without ../shared/data)."""
    rng = random.Random(seed)
    labels = list(task.verbalizer or {"": ""})
    words = "market profit loss rain sun good bad late flight cat tree river".split()
    return [{**{c: " ".join(rng.choice(words) for _ in range(6)) for c in task.text_columns},
             **({task.label_column: labels[i % len(labels)]} if task.label_column else {})} for i in range(n)]


def task_rows(task: Task, budget: dict, quick: bool) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out test rows, description of the split)."""
    from softprompt.data import load_rows, train_val_split

    paths = {k: DATA / v for k, v in task.files.items()}
    if not all(p.exists() for p in paths.values()):
        if not quick:
            raise SystemExit(f"bench.quality: {task.name} needs {', '.join(map(str, paths.values()))}")
        rows = _synthetic_rows(task, budget["train_limit"] + budget["test_limit"], SEED)
        return rows[:budget["train_limit"]], rows[budget["train_limit"]:], "synthetic stand-in rows"
    if "data" in paths:
        rows = load_rows(paths["data"])
        train, test = train_val_split(rows, task.test_fraction, SEED, task.label_column, source=str(paths["data"]))
        how = (f"seeded stratified {1 - task.test_fraction:.0%}/{task.test_fraction:.0%} split of "
               f"{task.files['data']} (seed {SEED}): {len(train)} train / {len(test)} test rows")
    else:
        train, test = load_rows(paths["train"]), load_rows(paths["test"])
        how = f"{task.files['train']} ({len(train)} rows) / {task.files['test']} ({len(test)} rows)"
    if budget["train_limit"] and len(train) > budget["train_limit"]:
        train = random.Random(SEED).sample(train, budget["train_limit"])
        how += f"; training on a seeded sample of {budget['train_limit']} training rows"
    if budget["test_limit"] and len(test) > budget["test_limit"]:
        test = test[:budget["test_limit"]]
        how += f"; first {budget['test_limit']} test rows"
    return train, test, how


def examples(task: Task, rows: list[dict], source: str):
    from softprompt.data import Verbalizer, build_examples

    verb = Verbalizer(task.verbalizer) if task.verbalizer else None
    return build_examples(rows, task.template, task.label_column, verb, source=source)


def config_for(task: Task, budget: dict, method: str, out: Path, **extra):
    from softprompt.training.config import load_config

    values = {"model": "bench", "data": str(DATA / next(iter(task.files.values()))), "template": task.template,
              "label_column": task.label_column, "verbalizer": task.verbalizer, "method": method,
              "num_virtual_tokens": TOKENS[method], "lr": LR[method], "epochs": budget["epochs"],
              "batch_size": budget["batch_size"], "max_length": budget["max_length"], "warmup_ratio": 0.06,
              "seed": SEED, "output": str(out), "eval_zero_shot": False, "val_fraction": 0.0,
              "log_every": 5, "name": f"{task.name}-{method.replace('_', '-')}"}
    if method in ("prompt_tuning", "prefix_tuning") and task.init_text:
        # Prompt tuning starts from the text's embeddings, prefix tuning from its keys/values.
        values.update(init="text", init_text=task.init_text)
    values.update(extra)
    return load_config(None, {k: v for k, v in values.items() if v is not None})


# ------------------------------------------------------------------------------------------ softprompt
def train_ours(systems: Systems, task: Task, budget: dict, method: str, train_rows, out: Path, log, **extra) -> dict:
    from softprompt.training import prepare_job, train_jobs

    config = config_for(task, budget, method, out, **extra)
    spec = config.resolved_adapters()[0]
    job = prepare_job(spec, rows=train_rows, val_rows=[], source=f"{task.name} training rows")
    started = time.perf_counter()
    result = train_jobs(config, systems.ours, [job], progress=True)
    seconds = time.perf_counter() - started
    path = result.adapters[spec.name].path
    log(f"  softprompt {method}: {seconds:.0f} s")
    return {"name": spec.name, "seconds": seconds, "path": str(path),
            "adapter_bytes": (Path(path) / "adapter_model.safetensors").stat().st_size, "config": config}


def score_ours(systems: Systems, name: str | None, test, labels, budget) -> dict:
    from softprompt.training.evaluate import evaluate

    started = time.perf_counter()
    report = evaluate(systems.ours, test, name, labels, "score", compare_base=False, batch_size=16,
                      max_length=budget["max_length"])
    return {**_cls(report.metrics), "eval_seconds": time.perf_counter() - started}


def _cls(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "confusion_matrix", "labels") if k in metrics}


# ------------------------------------------------------------------------------------------------ PEFT
def train_peft(systems: Systems, name: str, items, config, log) -> float:
    """PEFT's model trained on softprompt's encoded rows, in softprompt's epoch order, same optimizer."""
    from transformers import get_scheduler

    from softprompt.engine.tokens import pad_id
    from softprompt.training import collate, epoch_groups

    model = systems.peft_for(name)
    params = systems.peft_params(name)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(items) / config.batch_size)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * steps),
                              num_training_steps=steps)
    model.train()
    started = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"train PEFT {name}", unit="step")
    for epoch in range(config.epochs):
        for group in epoch_groups(items, epoch, config.seed, config.batch_size, 1):
            ids, mask, labels, _ = collate(group[0], pad_id(systems.tokenizer))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    log(f"  PEFT {name}: {seconds:.0f} s")
    return seconds


@torch.no_grad()
def peft_label_scores(systems: Systems, name: str, texts: list[str], labels: list[str], max_length: int,
                      batch_size: int = 16) -> list[list[float]]:
    """Sum log-likelihood of each label text after each prompt, through PEFT's forward."""
    from softprompt.engine.tokens import pad_batch, pad_id

    tok, model = systems.tokenizer, systems.peft_for(name)
    from softprompt.training.evaluate import prompt_budget

    cands = [tok(label, add_special_tokens=False)["input_ids"] for label in labels]
    room = prompt_budget(systems.ours, labels, max_length)  # the same prompt budget softprompt's scoring uses
    seqs = [(tok(t)["input_ids"][-room:], c) for t in texts for c in cands]
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = pad_batch([p + c for p, c in chunk], pad_id(tok), side="right")
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits[:, logits.shape[1] - ids.shape[1]:].float().log_softmax(-1)
        for row, (p, c) in enumerate(chunk):
            out.append(sum(float(logits[row, len(p) - 1 + j, t]) for j, t in enumerate(c)))
    return [out[i * len(cands):(i + 1) * len(cands)] for i in range(len(texts))]


def score_peft(systems: Systems, name: str, test, labels, budget) -> dict:
    from softprompt.training.metrics import classification_report

    started = time.perf_counter()
    scores = peft_label_scores(systems, name, [e.text for e in test], labels, budget["max_length"])
    preds = [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
    report = classification_report([e.target for e in test], preds, labels)
    return {**_cls(report), "eval_seconds": time.perf_counter() - started}


@torch.no_grad()
def peft_loss(systems: Systems, name: str, items, batch_size: int = 16) -> tuple[float, int]:
    from softprompt.engine.tokens import pad_id
    from softprompt.training import collate

    model, total, tokens = systems.peft_for(name), 0.0, 0
    for s in range(0, len(items), batch_size):
        ids, mask, labels, _ = collate(items[s:s + batch_size], pad_id(systems.tokenizer))
        count = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * count
        tokens += count
    return total, tokens


# ------------------------------------------------------------------------------------------- the tasks
def run_classification(systems: Systems, task: Task, budget: dict, out: Path, log) -> dict:
    from softprompt.training import encode_examples

    train_rows, test_rows, split = task_rows(task, budget, is_quick(budget))
    test = examples(task, test_rows, f"{task.name} test rows")
    labels = list(task.verbalizer.values())
    result = {"task": task.name, "split": split, "systems": {}, "anchors": [list(a) for a in task.anchors]}
    log(f"[{task.name}] {split}")
    result["systems"]["zero-shot"] = {**score_ours(systems, None, test, labels, budget), "seconds": 0.0,
                                      "adapter_bytes": 0}
    for method in budget["methods"]:
        trained = train_ours(systems, task, budget, method, train_rows, out / task.name, log)
        scores = score_ours(systems, trained["name"], test, labels, budget)
        result["systems"][f"softprompt {method.replace('_', ' ')}"] = {
            **scores, "seconds": trained["seconds"], "adapter_bytes": trained["adapter_bytes"],
            "path": trained["path"]}
        if method == "prompt_tuning":  # PEFT from the same initial weights, same rows, order and steps
            config = trained["config"]
            peft_name = f"peft-{task.name}"
            systems.add(peft_name, "prompt_tuning", TOKENS[method], peft=True, trainable=True, seed=SEED,
                        **({"init_text": task.init_text} if task.init_text else {}))
            # same seed and init text: PEFT's prompt starts from softprompt's initial weights
            items = encode_examples(systems.ours, examples(task, train_rows, "train"), None, config.max_length)
            seconds = train_peft(systems, peft_name, items, config, log)
            result["systems"]["PEFT prompt tuning"] = {**score_peft(systems, peft_name, test, labels, budget),
                                                       "seconds": seconds,
                                                       "adapter_bytes": trained["adapter_bytes"]}
        log("  " + ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in result["systems"].items()))
    return result


def run_raft(systems: Systems, task: Task, budget: dict, out: Path, log, predictions: Path | None) -> dict:
    """k-fold cross-validation on the 50 labelled tweets, then one adapter on all 50 predicts the test set."""
    from softprompt.training import cross_validate
    from softprompt.training.predict import predict_file

    from softprompt.data import load_rows

    data = DATA / task.files["data"]
    if data.exists():
        rows = load_rows(data)
    else:  # quick mode without the data: write stand-in rows where the recipe expects a file
        import csv

        if not is_quick(budget):
            raise SystemExit(f"bench.quality: {task.name} needs {data}")
        rows = _synthetic_rows(task, 24, SEED)
        data = out / "raft_stand_in.csv"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(data, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    result = {"task": task.name, "split": f"{budget['kfold']}-fold cross-validation over the {len(rows)} "
                                          f"labelled rows (seed {SEED})", "systems": {},
              "anchors": [list(a) for a in task.anchors]}
    config = config_for(task, budget, "prompt_tuning", out / task.name / "cv", data=str(data),
                        epochs=budget["cv_epochs"], val_fraction=0.0, name="pt")
    started = time.perf_counter()
    cv = cross_validate(config, budget["kfold"], model=systems.ours, progress=True)
    seconds = time.perf_counter() - started
    for fold in [n for n in list(systems.ours.adapters) if n.startswith("pt-fold")]:
        systems.ours.remove_adapter(fold)  # free the fold adapters before the final one
    s, pooled = cv.summary, cv.pooled
    result["systems"]["zero-shot"] = {"accuracy": s["base_accuracy"]["mean"], "accuracy_std": s["base_accuracy"]["std"],
                                      "macro_f1": s["base_macro_f1"]["mean"], "macro_f1_std": s["base_macro_f1"]["std"],
                                      "accuracy_pooled": pooled["base"]["accuracy"],
                                      "macro_f1_pooled": pooled["base"]["macro_f1"],
                                      "seconds": 0.0, "adapter_bytes": 0, "n": len(rows)}
    result["systems"]["softprompt prompt tuning"] = {
        "accuracy": s["accuracy"]["mean"], "accuracy_std": s["accuracy"]["std"], "macro_f1": s["macro_f1"]["mean"],
        "macro_f1_std": s["macro_f1"]["std"], "accuracy_pooled": pooled["adapter"]["accuracy"],
        "macro_f1_pooled": pooled["adapter"]["macro_f1"], "seconds": seconds / budget["kfold"], "n": len(rows),
        "adapter_bytes": None}
    log(f"  CV macro-F1 {s['macro_f1']['mean']:.3f} ± {s['macro_f1']['std']:.3f}, pooled "
        f"{pooled['adapter']['macro_f1']:.3f} (zero-shot {s['base_macro_f1']['mean']:.3f}, pooled "
        f"{pooled['base']['macro_f1']:.3f})")
    # the submission: one adapter trained on all labelled rows, label scoring on the unlabelled test tweets
    final = config_for(task, budget, "prompt_tuning", out / task.name / "final", data=str(data),
                       epochs=budget["cv_epochs"], val_fraction=0.0, name="final")
    from softprompt.training import prepare_job, train_jobs

    job = prepare_job(final.resolved_adapters()[0], rows=rows, val_rows=[], source=str(data))
    trained = train_jobs(final, systems.ours, [job], progress=True)
    path = trained.adapters["final"].path
    result["systems"]["softprompt prompt tuning"]["adapter_bytes"] = \
        (Path(path) / "adapter_model.safetensors").stat().st_size
    result["final_adapter"] = str(path)
    test = DATA / "raft_twitter_complaints" / "test_unlabeled.csv"
    if predictions is not None and test.exists():
        limit = budget["raft_predict_limit"]
        source = test
        if limit:
            source = out / "raft_test_sample.csv"
            source.write_text("".join(test.read_text(encoding="utf-8").splitlines(keepends=True)[:limit + 1]))
        # The submission comes from whichever system cross-validated better (pooled macro-F1 on the
        # labelled rows): with a good template the zero-shot base model can beat 45 training tweets.
        zero_shot = pooled["base"]["macro_f1"] > pooled["adapter"]["macro_f1"]
        started = time.perf_counter()  # the final adapter was trained with the same template and verbalizer
        predict_file(systems.ours, {} if zero_shot else {"final": path}, source, predictions, id_column="ID",
                     label_name="Label", template=task.template, verbalizer=task.verbalizer)
        result["predictions"] = {"path": str(predictions), "seconds": time.perf_counter() - started,
                                 "system": "zero-shot" if zero_shot else "softprompt prompt tuning"}
        log(f"  wrote {predictions} ({result['predictions']['system']})")
    return result


def run_generation(systems: Systems, tasks: list[Task], budget: dict, out: Path, log) -> dict:
    """Both adapters trained in ONE softprompt job (mixed batches), PEFT one at a time; held-out perplexity."""
    from softprompt.training.evaluate import example_loss
    from softprompt.training import encode_examples, prepare_job, train_jobs

    quick = is_quick(budget)
    limit = {**budget, "train_limit": budget["generation_limit"], "test_limit": budget["test_limit"] or 100}
    split, jobs, tests, trains = {}, [], {}, {}
    config = config_for(tasks[0], limit, "prompt_tuning", out / "generation", lr=1e-2,
                        adapters=[{"name": t.name, "data": str(DATA / t.files["data"]), "template": t.template}
                                  for t in tasks], label_column=None, verbalizer=None, init="sample_vocab",
                        num_virtual_tokens=GENERATION_TOKENS, init_text=None)
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
        systems.add(peft_name, "prompt_tuning", GENERATION_TOKENS, peft=True, trainable=True, seed=SEED,
                    init="sample_vocab")
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
    texts = systems.ours.generate([p for p, _ in batch], adapters=[a for _, a in batch], max_new_tokens=30,
                                  stop=["\n\n"])
    result["samples"] = [{"prompt": p, "adapter": a or "base model", "text": t} for (p, a), t in zip(batch, texts)]
    return result


# ------------------------------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Results: soft prompts on the reference tasks", "",
             f"Generated by `python -m bench.quality --budget {meta['budget']}` on {meta['model']} "
             f"({meta['machine']['cpu']}, {meta['machine']['torch_threads']} torch threads, torch {meta['machine']['torch']}, PEFT {meta['machine']['peft']}), {meta['date']}, "
             f"total {(meta['seconds'] + meta.get('merged_seconds', 0.0)) / 60:.0f} min. "
             + ("Every number below comes from that one run; " if not meta.get("merged_seconds") else
                "Tasks were run separately (`--merge`); each says its own budget and date; ")
             + "systems of a task share the base model, rows, order, steps and learning rate "
             "(see `bench/quality.py`).", ""]
    order = list(TASKS)  # the report's order, whichever task a --merge run redid last
    for name, task in sorted(result["tasks"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        if name == "generation":
            continue
        lines += [f"## {name}", "", task["split"] + "." + _run_note(task), "",
                  "| system | accuracy | macro-F1 | training time | adapter size |", "| --- | --- | --- | --- | --- |"]
        for system, r in sorted(task["systems"].items(), key=lambda kv: _system_rank(kv[0])):
            acc, f1 = _metric_cell(r, "accuracy", ".1%"), _metric_cell(r, "macro_f1", ".3f")
            size = f"{r['adapter_bytes'] / 1024:.1f} KiB" if r.get("adapter_bytes") else "-"
            secs = f"{r['seconds'] / 60:.1f} min" if r.get("seconds") else "-"
            lines.append(f"| {system} | {acc} | {f1} | {secs} | {size} |")
        for who, value in task.get("anchors", []):
            lines.append(f"| *published: {who}* | {value} | | | |")
        if "predictions" in task:
            shown = Path(task["predictions"]["path"])
            shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
            chosen = task["predictions"].get("system")
            lines += ["", f"Predictions for the unlabelled test tweets: `{shown}` (columns ID,Label; 1 = complaint, "
                          f"2 = no complaint)" + (f", predicted by the {chosen} system, the better one here by pooled "
                                                  f"cross-validated macro-F1." if chosen else ".")
                      + " The submission file, `results/raft_twitter_complaints_predictions.csv`, comes from the "
                        "best system of this page (see where each target stands)."]
        lines.append("")
    if "generation" in result["tasks"]:
        gen = result["tasks"]["generation"]
        lines += ["## Generation (held-out perplexity of the text, lower is better)", "",
                  "| data | base model | softprompt prompt tuning | PEFT prompt tuning |", "| --- | --- | --- | --- |"]
        for name, row in gen["systems"].items():
            lines.append(f"| {name} | {row['base model']['perplexity']:.2f} | "
                         f"{row['softprompt prompt tuning']['perplexity']:.2f} | "
                         f"{row['PEFT prompt tuning']['perplexity']:.2f} |")
        lines += ["", "Splits: " + "; ".join(f"{k}: {v}" for k, v in gen["split"].items()) + ".", "",
                  "Samples, both adapters and the base model in one generation batch:", ""]
        for s in gen["samples"]:
            lines.append(f"* **{s['adapter']}** — `{s['prompt']}` → {json.dumps(s['text'])}")
        lines.append("")
    return "\n".join(lines)


def _metric_cell(r: dict, key: str, fmt: str) -> str:
    """``value``, ``± std`` across folds and ``(pooled ...)`` where the run has them."""
    return format(r[key], fmt) + (f" ± {r[key + '_std']:{fmt}}" if key + "_std" in r else "") \
        + (f" (pooled {r[key + '_pooled']:{fmt}})" if key + "_pooled" in r else "")


SYSTEM_ORDER = ("zero-shot", "softprompt prompt tuning", "PEFT prompt tuning", "softprompt prefix tuning",
                "softprompt p tuning")


def _system_rank(name: str) -> int:
    """Rows in a fixed order, whatever order the numbers were stored or merged in."""
    return SYSTEM_ORDER.index(name) if name in SYSTEM_ORDER else len(SYSTEM_ORDER)


def _run_note(task: dict) -> str:
    run = task.get("run")
    if not run:
        return ""
    extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in run["overrides"].items())
    minutes = f", {run['minutes']:.0f} min" if run.get("minutes") is not None else ""
    kept = f"; the other systems are from the run of {run['kept_from']}" if run.get("kept_from") else ""
    return f" Budget {run['budget']}{extra}; run {run['date']}{minutes}{kept}."


NOTES_MARKER = "<!-- notes: kept when the tables above are regenerated -->"


def doc_numbers(doc: str | Path) -> Path:
    """The numbers behind a report, kept beside it (docs/results.md -> docs/results.json)."""
    return Path(doc).with_suffix(".json")


def previous_result(out: Path, doc: str | None) -> Path | None:
    """The run to merge into: ``<out>/quality.json``, else the numbers kept beside ``--doc``.

    ``runs/`` is not in the repository, so on a fresh checkout only the doc's numbers survive; without
    them a one-task rerun would rewrite the report with that task alone.
    """
    for path in (out / "quality.json", doc_numbers(doc) if doc else None):
        if path is not None and path.exists():
            return path
    return None


def write_doc(path: str, result: dict) -> None:
    """Write the generated tables (keeping hand-written notes below NOTES_MARKER) and their numbers."""
    from softprompt.fileio import atomic_write_text

    target = Path(path)
    old = target.read_text() if target.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else ""
    atomic_write_text(target, markdown(result) + ("\n" + NOTES_MARKER + notes if notes else ""))
    atomic_write_text(doc_numbers(target), json.dumps(result, indent=2, default=str) + "\n")  # keeps run order


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="financial_phrasebank,sst2,raft_twitter_complaints,generation",
                   help="Comma-separated: financial_phrasebank, sst2, raft_twitter_complaints, generation.")
    p.add_argument("--budget", choices=["standard", "full"], default="standard")
    p.add_argument("--quick", action="store_true", help="Harness check on a tiny random model, a few rows.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/quality", help="Directory for quality.json and the adapters.")
    p.add_argument("--doc", default=None, help="Write the markdown report here (full runs: docs/results.md).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cv-epochs", type=int, default=None,
                   help="Override the budget's epochs per cross-validation fold (RAFT).")
    p.add_argument("--merge", action="store_true",
                   help="Keep the other tasks of an existing <out>/quality.json, or of the numbers kept beside "
                        "--doc (each task records its own budget).")
    p.add_argument("--methods", default=None,
                   help="Comma-separated softprompt methods to train (default: the budget's three). With --merge, "
                        "a task's other systems are kept from the existing quality.json.")
    p.add_argument("--export", action="store_true",
                   help="Ship each task's best adapter of this run as its example in examples/adapters/ if it beats "
                        "every example of the task shipped there (bench.export's rule; the examples may come "
                        "from longer sweeps than this run).")
    p.add_argument("--report-only", action="store_true",
                   help="Only rewrite --doc (and, with --export, the example adapters) from <out>/quality.json (or the "
                        "numbers kept beside --doc).")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        source = previous_result(Path(args.out), args.doc)
        if source is None:
            raise SystemExit(f"bench.quality: --report-only: no {Path(args.out) / 'quality.json'}"
                             + (f" or {doc_numbers(args.doc)}" if args.doc else "") + " to report from")
        result = json.loads(source.read_text())
        if args.doc:
            write_doc(args.doc, result)
        if result["meta"]["budget"] != "quick" and args.export:
            export_examples(result)
        return 0
    harness.quiet()
    torch.set_num_threads(args.threads)
    budget = BUDGETS["quick" if args.quick else args.budget]
    overrides = {}
    if args.cv_epochs is not None:
        if args.cv_epochs < 1:
            raise SystemExit(f"bench.quality: --cv-epochs: expected a whole number >= 1, got {args.cv_epochs}")
        overrides["cv_epochs"] = args.cv_epochs
    if args.methods is not None:
        methods = tuple(m.strip().replace("-", "_") for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in LR]
        if unknown or not methods:
            raise SystemExit(f"bench.quality: --methods: expected some of {', '.join(LR)}, got {args.methods!r}")
        overrides["methods"] = ",".join(methods)
        budget = {**budget, "methods": methods}
    budget = {**budget, **{k: v for k, v in overrides.items() if k != "methods"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = TINY if args.quick else model_path(args.model)
    systems = Systems.build(source)
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.time()
    result = {"meta": {"budget": "quick" if args.quick else args.budget, "model": TINY if args.quick else args.model,
                       "machine": harness.machine(args.threads), "date": time.strftime("%Y-%m-%d"),
                       "lr": LR, "virtual_tokens": TOKENS, "seed": SEED}, "tasks": {}}
    merge_from = previous_result(out, args.doc) if args.merge else None
    if merge_from is not None:
        previous = json.loads(merge_from.read_text())
        if previous["meta"]["model"] != result["meta"]["model"]:
            raise SystemExit(f"bench.quality: --merge: {merge_from} is for {previous['meta']['model']}, "
                             f"not {result['meta']['model']}")
        result["tasks"] = {k: v for k, v in previous["tasks"].items() if k not in wanted}
        kept_systems = {k: v for k, v in previous["tasks"].items() if k in wanted} if args.methods else {}
        result["meta"]["merged_seconds"] = previous["meta"].get("seconds", 0.0) + previous["meta"].get("merged_seconds", 0.0)
    else:
        kept_systems = {}
    predictions = out / "raft_twitter_complaints_predictions.csv"
    for name in wanted:
        task_started = time.time()
        if name == "generation":
            result["tasks"]["generation"] = run_generation(
                systems, [TASKS["chatgpt_prompts"], TASKS["english_quotes"]], budget, out, print)
        elif name == "raft_twitter_complaints":
            result["tasks"][name] = run_raft(systems, TASKS[name], budget, out, print, predictions)
        elif name in TASKS:
            result["tasks"][name] = run_classification(systems, TASKS[name], budget, out, print)
        else:
            raise SystemExit(f"bench.quality: --tasks: unknown task {name!r}")
        result["tasks"][name]["run"] = {"budget": result["meta"]["budget"], "overrides": overrides,
                                        "date": result["meta"]["date"], "minutes": (time.time() - task_started) / 60}
        if name in kept_systems and "systems" in kept_systems[name]:
            # Only some methods were rerun: the task's other systems stay, with the run they came from.
            old = kept_systems[name]
            result["tasks"][name]["systems"] = {**old["systems"], **result["tasks"][name]["systems"]}
            result["tasks"][name]["run"]["kept_from"] = old.get("run", {}).get("date")
        result["meta"]["seconds"] = time.time() - started
        (out / "quality.json").write_text(json.dumps(result, indent=2, default=str))  # after every task
    if args.doc:
        write_doc(args.doc, result)
    if not args.quick and args.export:
        export_examples(result)
    print(f"done in {(time.time() - started) / 60:.1f} min; {out / 'quality.json'}")
    return 0


def export_examples(result: dict, examples: Path = EXAMPLES) -> None:
    """Offer each task's best softprompt adapter of this run as its example (``bench.export``'s rule: only
    if it beats every shipped example of the task on the task's fixed held-out evaluation)."""
    for name, task in result["tasks"].items():
        if name not in EVALUATIONS:
            continue  # generation has no example adapters
        if "final_adapter" in task:  # RAFT: the adapter trained on all rows, scored by its cross-validation
            path, score = task["final_adapter"], task["systems"]["softprompt prompt tuning"]["macro_f1_pooled"]
        else:
            ranked = [(r["accuracy"], r["path"]) for k, r in task["systems"].items()
                      if k.startswith("softprompt") and r.get("path")]
            if not ranked:
                continue
            score, path = max(ranked)
        if Path(path).is_dir():  # numbers read back from the doc may outlive their runs/ folder
            print("bench.quality: " + export_if_better(path, name, result["meta"]["model"], score, examples))
        else:
            print(f"bench.quality: {name}: not exported ({path} is gone)")


if __name__ == "__main__":
    sys.exit(main())
