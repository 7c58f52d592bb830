"""Where training rows come from: hub splits, explicit formats and encodings (hub calls are faked)."""

import sys
import types

import pytest

from softprompt.errors import ConfigError
from softprompt.training.config import load_config
from softprompt.training.jobs import prepare_job
from softprompt.training.loop import train

from tiny import tiny_model
from toy_data import toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from memory, recording what was asked for."""
    splits = {"train": toy_rows(24, seed=1), "validation": toy_rows(8, seed=2)}
    calls = []

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        return list(splits[split])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return splits, calls


def test_hub_data_trains_on_one_split_and_validates_on_another(tmp_path, fake_hub):
    splits, calls = fake_hub
    config = load_config(
        None,
        {
            "model": "tiny",
            "data": "hf:someone/toy:cfg",
            "validation_split": "validation",
            "label_column": "label",
            "epochs": 1,
            "batch_size": 8,
            "num_virtual_tokens": 2,
            "output": str(tmp_path / "out"),
            "eval_zero_shot": False,
        },
    )
    job = prepare_job(config.resolved_adapters()[0])
    assert ("someone/toy", "cfg", "train") in calls and ("someone/toy", "cfg", "validation") in calls
    assert len(job.train) == len(splits["train"])  # nothing held out of the training split
    assert {e.text for e in job.val} <= {r["text"] for r in splits["validation"]}
    result = train(config, model=tiny_model("gpt2"), progress=False)
    assert result.adapters["default"].best["n"] == len(job.val)


def test_format_and_encoding_flags_reach_the_reader(tmp_path):
    rows = toy_rows(20)
    rows[0]["text"] = "café " + rows[0]["text"]
    path = tmp_path / "toy.data"
    write_csv(tmp_path / "toy.csv", rows)
    path.write_bytes((tmp_path / "toy.csv").read_text(encoding="utf-8").encode("latin-1"))
    base = {"data": str(path), "label_column": "label", "output": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="cannot tell the format"):
        prepare_job(load_config(None, base).resolved_adapters()[0])
    job = prepare_job(load_config(None, {**base, "data_format": "CSV", "encoding": "latin-1"}).resolved_adapters()[0])
    assert any(e.text.startswith("café ") for e in job.train + job.val)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data_format": "xlsx"}, "--data-format: expected one of csv, tsv, jsonl, parquet, phrasebank, hf"),
        ({"encoding": "klingon-8"}, "--encoding: 'klingon-8' is not a known text encoding"),
        ({"validation_split": "validation"}, "--validation-split: applies to hub data sets"),
        ({"data": "hf:a/b", "validation_split": "train"}, "--validation-split: is the training split"),
    ],
)
def test_data_source_mistakes_name_the_flag(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data": "train.csv", "label_column": "label", **override})
