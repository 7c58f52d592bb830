"""The reference tasks and budgets research runs on: their data files, templates, label words and settings.

Shared by ``research.quality`` (every system on every task) and ``research.sweep`` (a grid on one task), so
both read the same rows, split the same way (seeded), and train with the same settings.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from research.paths import DATA
from softprompt.data import Verbalizer, build_examples, load_rows, train_val_split
from softprompt.training import TrainConfig, load_config


@dataclasses.dataclass
class Task:
    """One reference task: where its rows are, how they render, and the published figures beside it."""

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
        "financial_phrasebank",
        "classify",
        {"data": "financial_phrasebank/Sentences_AllAgree.txt"},
        "Sentence: {sentence}\nSentiment:",
        ("sentence",),
        "label",
        {"negative": " negative", "neutral": " neutral", "positive": " positive"},
        "Classify the sentiment of the financial news sentence as negative, neutral or positive.",
        anchors=(
            ("PEFT prefix tuning, t5-large (random 90/10)", "96.9% accuracy"),
            ("PEFT LoRA, mt0-large (random 90/10)", "97.4% accuracy"),
        ),
    ),
    "sst2": Task(
        "sst2",
        "classify",
        {"train": "sst2/train.tsv", "test": "sst2/dev.tsv"},
        "Review: {sentence}\nSentiment:",
        ("sentence",),
        "label",
        {"0": " negative", "1": " positive"},
        "Classify the sentiment of the movie review as positive or negative.",
        anchors=(("Google's released prompt, T5 1.1 base (dev)", "95.07% accuracy"),),
    ),
    "raft_twitter_complaints": Task(
        "raft_twitter_complaints",
        "classify",
        {"data": "raft_twitter_complaints/train.csv"},
        # A sentiment cue, not PEFT's "Label : complaint / no complaint": the base model already knows that
        # complaints read negative (zero-shot macro-F1 0.80 on the 50 rows, against 0.25; research/NOTES.md).
        "Tweet: {Tweet text}\nSentiment:",
        ("Tweet text",),
        "Label",
        {"1": " negative", "2": " positive"},
        "Classify the sentiment of the tweet as negative or positive.",
        kfold=10,
        anchors=(
            ("human (RAFT test)", "0.897 macro-F1"),
            ("Flan-T5 (RAFT test)", "0.892 macro-F1"),
            ("PEFT LoRA, T0-3B (RAFT test)", "0.863 macro-F1"),
            ("GPT-2 in-context (RAFT test)", "0.723 macro-F1"),
        ),
    ),
    "chatgpt_prompts": Task(
        "chatgpt_prompts", "generate", {"data": "awesome_chatgpt_prompts/prompts.csv"}, "{prompt}", ("prompt",)
    ),
    "english_quotes": Task(
        "english_quotes", "generate", {"data": "english_quotes/quotes.jsonl"}, "{quote}", ("quote",)
    ),
}

# Per budget: how much data each system sees, and model settings. "standard" fits in about an hour on
# 2 idle cores for every task together (a 135M model trains at 1-2 s per step of 8 rows there);
# "full" follows the reference recipes more closely and takes several hours.
BUDGETS = {
    "quick": {
        "quick": True,
        "epochs": 1,
        "train_limit": 24,
        "test_limit": 12,
        "max_length": 48,
        "batch_size": 4,
        "kfold": 2,
        "cv_epochs": 1,
        "raft_predict_limit": 8,
        "generation_limit": 24,
        "methods": ("prompt_tuning", "prefix_tuning", "p_tuning"),
    },
    "standard": {
        "epochs": 1,
        "train_limit": 600,
        "test_limit": None,
        "max_length": 96,
        "batch_size": 8,
        "kfold": 10,
        "cv_epochs": 4,
        "raft_predict_limit": None,
        "generation_limit": 200,
        "methods": ("prompt_tuning", "prefix_tuning", "p_tuning"),
    },
    "full": {
        "epochs": 3,
        "train_limit": 6000,
        "test_limit": None,
        "max_length": 128,
        "batch_size": 8,
        "kfold": 10,
        "cv_epochs": 20,
        "raft_predict_limit": None,
        "generation_limit": 1000,
        "methods": ("prompt_tuning", "prefix_tuning", "p_tuning"),
    },
}


def is_quick(budget: dict) -> bool:
    """The quick (harness-check) budget, also after command-line overrides copied it."""
    return bool(budget.get("quick"))


LR = {"prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "p_tuning": 1e-3}
TOKENS = {"prompt_tuning": 8, "prefix_tuning": 8, "p_tuning": 8}
GENERATION_TOKENS = 8
SEED = 42


# ------------------------------------------------------------------------------------------------ data
def synthetic_rows(task: Task, n: int, seed: int) -> list[dict]:
    """Stand-in rows with the task's columns (quick mode without ../shared/data)."""
    rng = random.Random(seed)
    labels = list(task.verbalizer or {"": ""})
    words = ["market", "profit", "loss", "rain", "sun", "good", "bad", "late", "flight", "cat", "tree", "river"]
    return [
        {
            **{c: " ".join(rng.choice(words) for _ in range(6)) for c in task.text_columns},
            **({task.label_column: labels[i % len(labels)]} if task.label_column else {}),
        }
        for i in range(n)
    ]


def task_rows(task: Task, budget: dict, quick: bool) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out test rows, description of the split)."""
    paths = {k: DATA / v for k, v in task.files.items()}
    if not all(p.exists() for p in paths.values()):
        if not quick:
            raise SystemExit(f"research: {task.name} needs {', '.join(map(str, paths.values()))}")
        rows = synthetic_rows(task, budget["train_limit"] + budget["test_limit"], SEED)
        return rows[: budget["train_limit"]], rows[budget["train_limit"] :], "synthetic stand-in rows"
    if "data" in paths:
        rows = load_rows(paths["data"])
        train, test = train_val_split(rows, task.test_fraction, SEED, task.label_column, source=str(paths["data"]))
        how = (
            f"seeded stratified {1 - task.test_fraction:.0%}/{task.test_fraction:.0%} split of "
            f"{task.files['data']} (seed {SEED}): {len(train)} train / {len(test)} test rows"
        )
    else:
        train, test = load_rows(paths["train"]), load_rows(paths["test"])
        how = f"{task.files['train']} ({len(train)} rows) / {task.files['test']} ({len(test)} rows)"
    if budget["train_limit"] and len(train) > budget["train_limit"]:
        train = random.Random(SEED).sample(train, budget["train_limit"])
        how += f"; training on a seeded sample of {budget['train_limit']} training rows"
    if budget["test_limit"] and len(test) > budget["test_limit"]:
        test = test[: budget["test_limit"]]
        how += f"; first {budget['test_limit']} test rows"
    return train, test, how


def examples(task: Task, rows: list[dict], source: str):
    """The task's rows rendered with its template and label words."""
    verb = Verbalizer(task.verbalizer) if task.verbalizer else None
    return build_examples(rows, task.template, task.label_column, verb, source=source)


def config_for(task: Task, budget: dict, method: str, out: Path, **extra) -> TrainConfig:
    """A training config for one method on the task under the budget; ``extra`` overrides any field."""
    return load_config(None, config_values(task, budget, method, out, **extra))


def config_values(task: Task, budget: dict, method: str, out: Path, **extra) -> dict:
    """`config_for`'s recipe as the keys a recipe file (or a sweep file, `softprompt.sweep`) holds."""
    values = {
        "model": "research",
        "data": str(DATA / next(iter(task.files.values()))),
        "template": task.template,
        "label_column": task.label_column,
        "verbalizer": task.verbalizer,
        "method": method,
        "num_virtual_tokens": TOKENS[method],
        "lr": LR[method],
        "epochs": budget["epochs"],
        "batch_size": budget["batch_size"],
        "max_length": budget["max_length"],
        "warmup_ratio": 0.06,
        "seed": SEED,
        "output": str(out),
        "eval_zero_shot": False,
        "val_fraction": 0.0,
        "log_every": 5,
        "name": f"{task.name}-{method.replace('_', '-')}",
    }
    if method in ("prompt_tuning", "prefix_tuning") and task.init_text:
        # Prompt tuning starts from the text's embeddings, prefix tuning from its keys/values.
        values.update(init="text", init_text=task.init_text)
    values.update(extra)
    return {k: v for k, v in values.items() if v is not None}


def reported_metrics(metrics: dict) -> dict:
    """The classification figures a result records, whichever system produced them."""
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "confusion_matrix", "labels") if k in metrics}
