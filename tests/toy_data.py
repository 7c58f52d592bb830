"""A learnable toy classification task and small file helpers, shared by the training and method tests."""

import csv
import json
import random


def toy_rows(n: int, seed: int = 0, labels=("A", "B")) -> list[dict]:
    """Strings of x/y/z are class A, strings of a/b/c class B: learnable from the last character."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = i % 2
        text = "".join(rng.choice("xyz" if c == 0 else "abc") for _ in range(rng.randint(4, 8)))
        rows.append({"text": text, "label": labels[c]})
    return rows


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    """Raised from an ``on_step`` callback to stop a run as a crash would."""
