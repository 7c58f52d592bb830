"""Inputs: SST-2 sentences read in place from the shared data folder (never copied), or a synthetic stand-in.

The shared folder is found at ``$SOFTPROMPT_BENCH_DATA`` (a folder holding ``train.tsv``/``dev.tsv``),
else ``<repo>/../shared/data/sst2``, else ``/work/shared/data/sst2``. Quick mode falls back to a small
synthetic set when none is there, so the harness check runs anywhere; a full run requires the real data.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = {0: " negative", 1: " positive"}
INIT_TEXT = "Classify the sentiment of the movie review as positive or negative."


def sst2_dir() -> Path | None:
    candidates = [
        os.environ.get("SOFTPROMPT_BENCH_DATA"),
        REPO.parent / "shared" / "data" / "sst2",
        "/work/shared/data/sst2",
    ]
    for c in candidates:
        if c and (Path(c) / "dev.tsv").is_file() and (Path(c) / "train.tsv").is_file():
            return Path(c)
    return None


@dataclass
class Example:
    text: str
    label: int


def read_tsv(path: Path) -> list[Example]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        text, label = header.index("sentence"), header.index("label")
        return [Example(row[text].strip(), int(row[label])) for row in reader if row]


_WORDS = {
    1: ["good", "great", "fine", "lovely", "superb", "charming", "warm", "funny"],
    0: ["bad", "dull", "awful", "boring", "weak", "messy", "flat", "tedious"],
}


def synthetic(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(_WORDS[label]) for _ in range(rng.randint(4, 14))]
        out.append(Example("the film is " + " ".join(words), label))
    return out


def load_sst2(require: bool) -> tuple[list[Example], list[Example], str]:
    """``(train, dev, where)``; ``where`` says which data was used."""
    folder = sst2_dir()
    if folder is None:
        if require:
            raise SystemExit(
                "research: SST-2 not found (set SOFTPROMPT_BENCH_DATA to a folder with train.tsv and "
                "dev.tsv, or run with --quick)"
            )
        return synthetic(400, 0), synthetic(200, 1), "synthetic (SST-2 not found)"
    return read_tsv(folder / "train.tsv"), read_tsv(folder / "dev.tsv"), str(folder)


def prompt(example: Example) -> str:
    return TEMPLATE.format(text=example.text)


def fixed_length_batch(
    tokenizer, examples: list[Example], rows: int, length: int, label_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` real rows of exactly ``length`` tokens (no padding): review text, then the template's end and
    the label word; loss on the last ``label_tokens`` tokens only, as in a classification fine-tune."""
    rng = random.Random(seed)
    pool = list(examples)
    rng.shuffle(pool)
    ids = []
    for ex in pool:
        tail = tokenizer("\nSentiment:" + LABELS[ex.label], add_special_tokens=False)["input_ids"]
        head = tokenizer("Review: " + ex.text, add_special_tokens=False)["input_ids"]
        # Long enough reviews only; short ones are extended with the next review's words.
        while len(head) + len(tail) < length:
            head += tokenizer(" " + rng.choice(pool).text, add_special_tokens=False)["input_ids"]
        ids.append(head[: length - len(tail)] + tail)
        if len(ids) == rows:
            break
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[:, : length - label_tokens] = -100
    return input_ids, torch.ones_like(input_ids), labels
