"""`softprompt demo`: a soft prompt trained on a real model and real data, offline, in a few minutes.

SmolLM2-135M-Instruct (from PyPI) learns tweet sentiment from the human-rated tweets shipped inside
the vaderSentiment 3.3.2 source distribution. Zero-shot and tuned accuracy are measured on the same
held-out tweets, by label scoring; the adapter is saved (PEFT layout) and used to generate.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

TEMPLATE = "Tweet: {text}\nSentiment (positive or negative): "
LABELS = ["positive", "negative"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="Base model (default smollm2-135m).")
    parser.add_argument("--output", default="runs/demo", help="Where the adapter is written (default runs/demo).")
    parser.add_argument("--train-size", type=int, default=160, help="Training tweets (default 160, balanced).")
    parser.add_argument("--test-size", type=int, default=200, help="Held-out tweets (default 200, balanced).")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs (default 2).")
    parser.add_argument("--lr", type=float, default=3e-2, help="Learning rate (default 3e-2).")
    parser.add_argument("--num-virtual-tokens", type=int, default=8, help="Virtual tokens (default 8).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the split and training.")


def balanced_split(rows: list[dict], train_size: int, test_size: int, seed: int) -> tuple[list, list]:
    """Disjoint, label-balanced train and held-out sets, drawn with a seed."""
    rng = random.Random(seed)
    by_label = {label: [r for r in rows if r["label"] == label] for label in LABELS}
    train, test = [], []
    for label, group in by_label.items():
        rng.shuffle(group)
        test += group[: test_size // len(LABELS)]
        train += group[test_size // len(LABELS): test_size // len(LABELS) + train_size // len(LABELS)]
    rng.shuffle(train)
    return train, test


def accuracy(model, rows: list[dict], adapter: str | None, batch_size: int = 16) -> float:
    correct = 0
    for start in tqdm(range(0, len(rows), batch_size), desc=f"scoring ({adapter or 'zero-shot'})", leave=False):
        batch = rows[start:start + batch_size]
        results = model.score([TEMPLATE.format(text=r["text"]) for r in batch], labels=LABELS, adapters=adapter)
        correct += sum(res.label == r["label"] for res, r in zip(results, batch))
    return correct / len(rows)


def train_prompt(model, rows: list[dict], name: str, *, epochs: int, lr: float, seed: int, batch_size: int = 8):
    """Set-up, loop, done: AdamW on the adapter only, loss on the label tokens only."""
    from .tokens import pad_batch, pad_id

    tok = model.tokenizer
    eos = tok.eos_token_id
    examples = []
    for r in rows:
        prompt = tok(TEMPLATE.format(text=r["text"]))["input_ids"][-96:]
        answer = tok(r["label"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        examples.append((prompt + answer, [-100] * len(prompt) + answer))
    params = list(model.adapters[name].parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5) * (1 - s / steps))
    rng = random.Random(seed)
    model.train()
    bar = tqdm(total=steps, desc="training")
    for _ in range(epochs):
        rng.shuffle(examples)
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            ids, mask = pad_batch([e[0] for e in batch], pad_id(tok), side="right")
            labels, _ = pad_batch([e[1] for e in batch], -100, side="right")
            loss = model(ids, mask, adapters=name, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
    bar.close()
    model.eval()


def run_demo(model_name: str = "smollm2-135m", output: str = "runs/demo", *, train_size: int = 160,
             test_size: int = 200, epochs: int = 2, lr: float = 3e-2, num_virtual_tokens: int = 8,
             seed: int = 0, model=None, rows: list[dict] | None = None) -> dict:
    """The demo as a library function; returns the measured accuracies."""
    from . import load
    from .demo_data import load_vader_tweets

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
    model.add_adapter("sentiment", method="prompt_tuning", num_virtual_tokens=num_virtual_tokens,
                      init_text="Classify the sentiment of the tweet as positive or negative:", seed=seed)
    train_prompt(model, train, "sentiment", epochs=epochs, lr=lr, seed=seed)
    tuned = accuracy(model, test, "sentiment")
    print(f"tuned accuracy on the same {len(test)} held-out tweets: {tuned:.1%}  (zero-shot {zero_shot:.1%})")
    out = Path(output) / "sentiment"
    model.save_adapter("sentiment", str(out))
    size = (out / "adapter_model.safetensors").stat().st_size
    print(f"adapter saved to {out} ({size / 1024:.1f} KiB, PEFT layout)")
    samples = [TEMPLATE.format(text=r["text"]) for r in test[:3]]
    for prompt, text in zip(samples, model.generate(samples, adapters="sentiment", max_new_tokens=3)):
        print(f"  {prompt.splitlines()[0][:70]!s:<72} -> {text.strip()!r}")
    print(f"done in {time.time() - started:.0f} s")
    return {"zero_shot_accuracy": zero_shot, "tuned_accuracy": tuned, "adapter": str(out)}


def cmd_demo(args) -> int:
    run_demo(args.model, args.output, train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
             lr=args.lr, num_virtual_tokens=args.num_virtual_tokens, seed=args.seed)
    return 0
