"""A learnable toy classification task and small file helpers, shared by the training and method tests."""

import csv
import json
import random

import pytest

from softprompt.training.config import TrainConfig, load_config
from softprompt.training.loop import train


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


def assert_resume_is_bit_identical(run, full, make_model) -> None:
    """A job crashed at step 3 (saving every 2 steps) and resumed ends as ``full``, the same job uninterrupted:
    the same step count and byte-identical adapter weights. ``run(output, **overrides)`` builds the job's config
    (in ``full.output``'s parent folder), ``make_model()`` a fresh base."""

    def crash_at_3(info):
        if info.step == 3:
            raise Interrupt

    cut = full.output.parent / "cut"
    with pytest.raises(Interrupt):
        train(run(cut, save_every=2), model=make_model(), on_step=crash_at_3, progress=False)
    resumed = train(run(cut, resume=True), model=make_model(), progress=False)
    assert resumed.steps == full.steps
    weights = "default/adapter_model.safetensors"
    assert (full.output / weights).read_bytes() == (cut / weights).read_bytes()


#: One quick prompt-tuning pass (1 epoch, batches of 8, lr 0.5, every row trained on): `toy_job` settings of the
#: ensemble tests, which need adapters, not good ones.
TRAINING = {
    "method": "prompt_tuning",
    "init": "random",
    "num_virtual_tokens": 2,
    "epochs": 1,
    "batch_size": 8,
    "lr": 0.5,
    "val_fraction": 0,
}


def toy_job(data: str, output, settings: dict, **overrides) -> TrainConfig:
    """A small training job on a toy data file (label column ``label``): 2 epochs, batches of 4, lr 0.05, a quarter
    of the rows for validation, no zero-shot pass, seed 0; ``settings`` (the method and its options), then
    ``overrides`` (a test's variations), add keys or replace these."""
    values = {
        "data": data,
        "label_column": "label",
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.05,
        "val_fraction": 0.25,
        "eval_zero_shot": False,
        "output": str(output),
        "seed": 0,
    }
    return load_config(None, {**values, **settings, **overrides})
