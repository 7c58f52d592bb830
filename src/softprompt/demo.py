"""`softprompt demo`: a soft prompt trained on a real model and real data, offline, in a few minutes.

SmolLM2-135M-Instruct (from PyPI) learns tweet sentiment from the human-rated tweets shipped inside
the vaderSentiment 3.3.2 source distribution. Zero-shot and tuned accuracy are measured on the same
held-out tweets, by label scoring; the adapter is saved (PEFT layout) and used to generate.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

TEMPLATE = "Tweet: {text}\nSentiment (positive or negative): "
LABELS = ["positive", "negative"]
INIT_TEXT = "Classify the sentiment of the tweet as positive or negative:"


def balanced_split(rows: list[dict], train_size: int, test_size: int, seed: int) -> tuple[list, list]:
    """Disjoint, label-balanced train and held-out sets, drawn with a seed."""
    rng = random.Random(seed)
    by_label = {label: [r for r in rows if r["label"] == label] for label in LABELS}
    train, test = [], []
    for group in by_label.values():
        rng.shuffle(group)
        test += group[: test_size // len(LABELS)]
        train += group[test_size // len(LABELS) : test_size // len(LABELS) + train_size // len(LABELS)]
    rng.shuffle(train)
    return train, test


def accuracy(model, rows: list[dict], adapter: str | None, batch_size: int = 16) -> float:
    correct = 0
    for start in tqdm(range(0, len(rows), batch_size), desc=f"scoring ({adapter or 'zero-shot'})", leave=False):
        batch = rows[start : start + batch_size]
        results = model.score([TEMPLATE.format(text=r["text"]) for r in batch], labels=LABELS, adapters=adapter)
        correct += sum(res.label == r["label"] for res, r in zip(results, batch))
    return correct / len(rows)


def train_prompt(
    model,
    rows: list[dict],
    name: str,
    *,
    epochs: int,
    lr: float,
    seed: int,
    num_virtual_tokens: int,
    output: str,
    batch_size: int = 8,
):
    """The demo's rows through `softprompt train`'s own loop (`train_jobs`): the same code as the CLI,
    so the demo also writes the resolved config, the metrics log and the loss plot next to the adapter."""
    import csv
    import io

    from softprompt.fileio import atomic_write_text
    from softprompt.training import load_config, prepare_job, train_jobs

    # The training tweets go next to the adapter, so `softprompt train --data <output>/train.csv` reruns it.
    data = Path(output) / "train.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["text", "label"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(output).mkdir(parents=True, exist_ok=True)
    atomic_write_text(data, buffer.getvalue())
    config = load_config(
        None,
        {
            "model": model.name_or_path,
            "data": str(data),
            "name": name,
            "method": "prompt_tuning",
            "num_virtual_tokens": num_virtual_tokens,
            "init": "text",
            "init_text": INIT_TEXT,
            "template": TEMPLATE,
            "text_column": "text",
            "label_column": "label",
            "verbalizer": {label: label for label in LABELS},
            "val_fraction": 0.0,
            "eval_zero_shot": False,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": 128,
            "seed": seed,
            "output": output,
        },
    )
    job = prepare_job(config.resolved_adapters()[0], val_rows=[])
    return train_jobs(config, model, [job], progress=True)


def run_demo(
    model_name: str = "smollm2-135m",
    output: str = "runs/demo",
    *,
    train_size: int = 160,
    test_size: int = 200,
    epochs: int = 2,
    lr: float = 3e-2,
    num_virtual_tokens: int = 8,
    seed: int = 0,
    model=None,
    rows: list[dict] | None = None,
) -> dict:
    """The demo as a library function; returns the measured accuracies."""
    from softprompt import load
    from softprompt.data.demo_tweets import load_vader_tweets

    started = time.time()
    torch.manual_seed(seed)
    if rows is None:
        print("fetching the vaderSentiment human-rated tweets (cached after the first run) ...")
        rows = load_vader_tweets()
    train, test = balanced_split(rows, train_size, test_size, seed)
    if model is None:
        print(f"loading {model_name} (the first run converts it from PyPI's GGUF and caches it) ...")
        model = load(model_name)
    zero_shot = accuracy(model, test, None)
    print(f"zero-shot accuracy on {len(test)} held-out tweets: {zero_shot:.1%}")
    trained = train_prompt(
        model, train, "sentiment", epochs=epochs, lr=lr, seed=seed, num_virtual_tokens=num_virtual_tokens, output=output
    )
    tuned = accuracy(model, test, "sentiment")
    print(f"tuned accuracy on the same {len(test)} held-out tweets: {tuned:.1%}  (zero-shot {zero_shot:.1%})")
    out = trained.adapters["sentiment"].path
    size = (out / "adapter_model.safetensors").stat().st_size
    print(f"adapter saved to {out} ({size / 1024:.1f} KiB, PEFT layout)")
    samples = [TEMPLATE.format(text=r["text"]) for r in test[:3]]
    for prompt, text in zip(samples, model.generate(samples, adapters="sentiment", max_new_tokens=3)):
        print(f"  {prompt.splitlines()[0][:70]!s:<72} -> {text.strip()!r}")
    print(f"done in {time.time() - started:.0f} s")
    return {"zero_shot_accuracy": zero_shot, "tuned_accuracy": tuned, "adapter": str(out)}
