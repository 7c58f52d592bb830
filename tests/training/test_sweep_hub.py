"""softprompt sweep on a hub data set (faked: tests never reach the hub): ``sweep.test_split`` scores the final
choice on a split of its own, and every misuse of it is one error naming the field."""

import sys
import types

import pytest

from softprompt.errors import ConfigError
from softprompt.training import sweep_run as sweep_module
from softprompt.training.sweep_run import sweep
from softprompt.training.sweep_space import parse_sweep

from tiny import tiny_model
from toy_data import toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

SPLITS = {"train": toy_rows(24, seed=1), "validation": toy_rows(8, seed=2), "test": toy_rows(10, seed=4)}


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from memory (every name has the same splits), recording what was asked for."""
    calls = []

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        return list(SPLITS[split])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def hub_recipe(tmp, sweep_section: dict, **extra) -> dict:
    return {
        "data": "hf:someone/toy",
        "validation_split": "validation",
        "label_column": "label",
        "method": "prompt_tuning",
        "init": "random",
        "num_virtual_tokens": 2,
        "epochs": 1,
        "batch_size": 8,
        "output": str(tmp / "out"),
        "space": {"lr": [1.0, 1e-3]},
        "sweep": {"bootstrap": 20, **sweep_section},
        **extra,
    }


@pytest.mark.parametrize(
    ("section", "asked"),
    [
        ({"test_split": "test"}, ("someone/toy", None, "test")),  # a split of the recipe's data
        ({"test_data": "hf:other/set:cfg", "test_split": "test"}, ("other/set", "cfg", "test")),
    ],
)
def test_test_split_scores_the_final_choice_on_that_split(tmp_path, fake_hub, monkeypatch, section, asked):
    texts = []

    def recording(model, rows, *args, **kwargs):
        texts.append(list(rows))
        return real(model, rows, *args, **kwargs)

    real = sweep_module.label_probabilities
    monkeypatch.setattr(sweep_module, "label_probabilities", recording)
    result = sweep(parse_sweep(hub_recipe(tmp_path, section)), model=tiny_model("bloom"), progress=False)
    assert asked in fake_hub and ("someone/toy", None, "train") in fake_hub
    assert result.report["estimate"]["test"]["n"] == len(SPLITS["test"]) == 10
    assert texts[-1] == [r["text"] for r in SPLITS["test"]]  # the test score: exactly the test split's rows, once
    assert all(t != texts[-1] for t in texts[:-1])


@pytest.mark.parametrize(
    ("extra", "section", "message"),
    [
        ({"data": "LOCAL"}, {"test_split": "test"}, "sweep.test_split: applies to hub data sets"),
        ({}, {"test_data": "LOCAL", "test_split": "test"}, "sweep.test_split: applies to hub data sets"),
        ({}, {"test_split": "train"}, r"sweep.test_split: is the training split \('train'\)"),
        ({"data_split": "dev"}, {"test_split": "dev"}, r"sweep.test_split: is the training split \('dev'\)"),
        ({}, {"test_split": "validation"}, r"sweep.test_split: is the validation split \('validation'\)"),
        ({}, {"test_split": "test", "test_fraction": 0.2}, "sweep.test_split: give it or sweep.test_fraction"),
        ({}, {"test_split": " "}, "sweep.test_split: expected a split name"),
        ({}, {"test_data": "hf:someone/toy"}, "sweep.test_data: is the recipe.s hub data, read at its training split"),
    ],
)
def test_test_split_mistakes_are_one_error_naming_the_field(tmp_path, extra, section, message):
    local = write_csv(tmp_path / "toy.csv", toy_rows(12))
    values = hub_recipe(tmp_path, section, **extra)
    if values["data"] == "LOCAL":
        values = {**values, "data": local, "validation_split": None}
    values["sweep"] = {k: local if v == "LOCAL" else v for k, v in values["sweep"].items()}
    with pytest.raises(ConfigError, match=message) as caught:
        parse_sweep(values)
    assert "\n" not in str(caught.value)


def test_other_hub_sets_may_share_the_training_split_name(tmp_path):
    """Split names are compared within one data set: another set's train split is held out of this one."""
    spec = parse_sweep(hub_recipe(tmp_path, {"test_data": "hf:other/set", "test_split": "train"}))
    assert spec.options.test_split == "train"
