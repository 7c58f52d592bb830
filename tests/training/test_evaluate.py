"""Evaluation reports (hand-checked numbers), held-out guarantees, perplexity and cross-validation."""

import csv
import json
import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F

from softprompt.data import Example
from softprompt.data.heldout import fingerprint, read_train_fingerprints
from softprompt.engine.scoring import LabelScores
from softprompt.errors import DataError
from softprompt.training.config import load_config
from softprompt.training.cross_validate import cross_validate
from softprompt.training.evaluate import evaluate, evaluate_data, example_loss, normalize_text
from softprompt.training.loop import train

from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedModel:
    """Stands in for a SoftPromptModel: answers per (text, adapter) from a script."""

    def __init__(self, answers):
        self.answers = answers  # {(text, adapter): label or generated text}
        self.calls = []
        self.tokenizer = tiny_tokenizer()

    def score(self, texts, labels, adapters, **options):
        self.calls.append(list(adapters))
        return [LabelScores(self.answers[t, a], {label: 0.0 for label in labels}) for t, a in zip(texts, adapters)]

    def generate(self, texts, adapters, **options):
        self.calls.append(list(adapters))
        return [self.answers[t, a] for t, a in zip(texts, adapters)]


TRUTH = ["A", "A", "A", "A", "B", "B"]
TUNED = ["A", "A", "A", "B", "B", "A"]
EXAMPLES = [Example(f"text {i}", t, {}) for i, t in enumerate(TRUTH)]


def scripted(tuned, base):
    answers = {(e.text, "tuned"): p for e, p in zip(EXAMPLES, tuned)}
    answers.update({(e.text, None): p for e, p in zip(EXAMPLES, base)})
    return ScriptedModel(answers)


def test_report_numbers_by_hand():
    model = scripted(TUNED, ["A"] * 6)
    report = evaluate(model, EXAMPLES, "tuned", ["A", "B"], batch_size=4)
    m = report.metrics
    # tuned: A has tp 3 of 4 predicted, 3 of 4 true -> P = R = F1 = 0.75; B: tp 1 of 2, 1 of 2 -> 0.5
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["A"]["f1"] == pytest.approx(0.75) and m["per_class"]["B"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.625)
    assert m["confusion_matrix"] == [[3, 1], [1, 1]]
    assert report.predictions == TUNED and report.n == 6
    assert not report.checked_training_rows and "overlap was not checked" in report.format()
    # zero-shot base always says A: accuracy 4/6; A: P = 4/6, R = 1 -> F1 0.8; B: 0 -> macro 0.4
    assert report.base.adapter is None
    assert report.base.metrics["accuracy"] == pytest.approx(4 / 6)
    assert report.base.metrics["macro_f1"] == pytest.approx(0.4)
    # the adapter and the base model run in the same mixed batches
    assert model.calls == [["tuned"] * 4, ["tuned"] * 2 + [None] * 2, [None] * 4]
    text = report.format()
    assert "zero-shot" in text and "0.6250" in text and "0.4000" in text
    assert json.loads(json.dumps(report.to_dict()))["base"]["metrics"]["macro_f1"] == pytest.approx(0.4)


def test_generation_exact_match_after_normalisation():
    generated = [" a. ", "A\n", "The answer is A", "maybe", "b", "B!"]
    report = evaluate(
        scripted(generated, ["A"] * 6), EXAMPLES, "tuned", ["A", "B"], method="generate", compare_base=False
    )
    # rows 0, 1 match A; row 2 is not an exact match, row 3 is no label at all; rows 4, 5 match B
    assert report.metrics["accuracy"] == pytest.approx(4 / 6)
    assert report.metrics["invalid_predictions"] == 2
    assert report.predictions == generated and report.base is None
    assert normalize_text("  Hello,   World! ") == "hello, world"


def test_training_rows_are_never_reported_as_held_out():
    trained = {fingerprint(EXAMPLES[0].text), fingerprint(EXAMPLES[4].text)}
    report = evaluate(scripted(TUNED, ["A"] * 6), EXAMPLES, "tuned", ["A", "B"], train_fingerprints=trained)
    assert report.n == 4 and report.dropped_training_rows == 2 and report.checked_training_rows
    assert "held-out examples (2 training rows dropped)" in report.format()
    assert report.metrics["n"] == 4 and report.base.metrics["n"] == 4
    assert report.metrics["accuracy"] == pytest.approx(2 / 4)  # rows 1, 2 right; 3, 5 wrong
    with pytest.raises(DataError, match="was in the adapter's training data"):
        evaluate(
            scripted(TUNED, TUNED),
            EXAMPLES,
            "tuned",
            ["A", "B"],
            train_fingerprints={fingerprint(e.text) for e in EXAMPLES},
        )


def test_perplexity_of_unlabelled_text_matches_a_direct_computation():
    model = tiny_model("gpt2")
    model.add_adapter("p", method="prefix_tuning", num_virtual_tokens=3, seed=0)
    texts = ["hello world", "soft prompts"]
    report = evaluate(model, [Example(t, None, {}) for t in texts], "p", batch_size=1)
    assert report.method == "perplexity" and report.base.method == "perplexity"
    # by hand for the base model: next-token cross-entropy over every token after the first, + eos
    total, tokens = 0.0, 0
    for t in texts:
        ids = torch.tensor([model.tokenizer(t)["input_ids"] + [model.tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model.base(ids).logits[0, :-1]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    assert report.base.metrics["tokens"] == tokens
    assert report.base.metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert report.metrics["perplexity"] != report.base.metrics["perplexity"]
    assert example_loss(model, [Example("hello world", None, {})], None)[1] == len("hello world") + 1 - 1


# -------------------------------------------------------------------------------- with real training


def toy_csv(path, n, seed=0):
    rng = random.Random(seed)
    rows = [
        {
            "text": "".join(rng.choice("xyz" if i % 2 == 0 else "abc") for _ in range(rng.randint(4, 8))),
            "label": "A" if i % 2 == 0 else "B",
        }
        for i in range(n)
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_evaluate_data_uses_the_adapters_settings_and_drops_its_training_rows(tmp_path):
    data = toy_csv(tmp_path / "train.csv", 24)
    config = load_config(
        None,
        {
            "data": data,
            "label_column": "label",
            "template": "{text} =",
            "epochs": 1,
            "method": "prefix_tuning",
            "num_virtual_tokens": 2,
            "val_fraction": 0.25,
            "output": str(tmp_path / "out"),
        },
    )
    model = tiny_model("gpt2")
    train(config, model=model, progress=False)
    adapter_dir = tmp_path / "out" / "default"
    assert len(read_train_fingerprints(adapter_dir)) == 18
    report = evaluate_data(model, "default", data, adapter_dir=adapter_dir)  # the training file itself
    assert report.dropped_training_rows == 18 and report.n == 6  # only the validation rows are left
    assert report.metrics["labels"] == ["A", "B"]
    fresh = toy_csv(tmp_path / "fresh.csv", 10, seed=99)
    report = evaluate_data(model, "default", fresh, adapter_dir=adapter_dir, method="generate")
    assert report.n == 10 and report.dropped_training_rows == 0 and report.base is not None


def test_cross_validate_trains_all_folds_in_one_job(tmp_path):
    data = toy_csv(tmp_path / "toy.csv", 36)
    # init random: lr 1.0 is tuned to PEFT's N(0, 1) start on this random-weight model.
    config = load_config(
        None,
        {
            "data": data,
            "label_column": "label",
            "method": "prefix_tuning",
            "init": "random",
            "num_virtual_tokens": 4,
            "lr": 1.0,
            "lr_schedule": "constant",
            "epochs": 10,
            "batch_size": 8,
            "val_fraction": 0.2,
            "eval_every": 2,
            "eval_zero_shot": False,
            "output": str(tmp_path / "cv"),
        },
    )
    model = tiny_model("bloom")
    calls = []
    report = cross_validate(config, k=3, model=model, progress=False, on_step=lambda info: calls.append(info.lr))
    assert report.k == 3 and len(report.folds) == 3
    assert sorted(model.adapters) == ["default-fold1", "default-fold2", "default-fold3"]  # one base model
    assert set(calls[0]) == {"default-fold1", "default-fold2", "default-fold3"}  # one job, one optimizer
    assert sum(f.n for f in report.folds) == 36  # every row is held out exactly once
    accuracies = [f.metrics["accuracy"] for f in report.folds]
    assert report.summary["accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert report.summary["accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies))
    assert report.summary["base_accuracy"]["mean"] == pytest.approx(
        statistics.fmean(f.base.metrics["accuracy"] for f in report.folds)
    )
    assert report.summary["accuracy"]["mean"] > report.summary["base_accuracy"]["mean"] + 0.3
    # pooled: one report over every held-out prediction; with equal folds its accuracy is the fold mean
    pooled = report.pooled["adapter"]
    assert pooled["n"] == 36 and sum(map(sum, pooled["confusion_matrix"])) == 36
    assert pooled["accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert report.pooled["base"]["accuracy"] == pytest.approx(report.summary["base_accuracy"]["mean"])
    saved = json.loads((tmp_path / "cv" / "cv_report.json").read_text())
    assert saved["summary"] == report.summary and saved["pooled"] == report.pooled
    assert "±" in report.format() and "pooled over all 36 held-out rows" in report.format()
    for i in (1, 2, 3):
        assert (tmp_path / "cv" / f"default-fold{i}" / "adapter_model.safetensors").is_file()


def test_cross_validation_interrupted_by_a_signal_saves_and_resumes_to_the_same_report(tmp_path):
    import os
    import signal

    from softprompt.training.loop import TrainingInterrupted

    data = toy_csv(tmp_path / "toy.csv", 24)
    values = {
        "data": data,
        "label_column": "label",
        "method": "prompt_tuning",
        "num_virtual_tokens": 2,
        "lr": 0.3,
        "epochs": 3,
        "batch_size": 8,
        "val_fraction": 0.0,
        "eval_zero_shot": False,
        "seed": 1,
    }
    reference = cross_validate(
        load_config(None, {**values, "output": str(tmp_path / "ref")}), k=2, model=tiny_model("gpt2"), progress=False
    )

    def on_step(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = str(tmp_path / "cv")
    with pytest.raises(TrainingInterrupted, match="stopped after step 2"):
        cross_validate(
            load_config(None, {**values, "output": out}), k=2, model=tiny_model("gpt2"), progress=False, on_step=on_step
        )
    resumed = cross_validate(
        load_config(None, {**values, "output": out, "resume": True}), k=2, model=tiny_model("gpt2"), progress=False
    )
    assert resumed.summary == reference.summary
    assert [f.predictions for f in resumed.folds] == [f.predictions for f in reference.folds]
