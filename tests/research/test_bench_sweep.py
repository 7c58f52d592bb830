"""The sweep harness (research/sweep.py) in quick mode: a tiny random model, a few rows. It checks that one
job trains every (method, lr, length) adapter, that selection uses validation accuracy only, and that the
ensembles are what averaging the members' label probabilities gives. No quality target is asserted."""

import json
from pathlib import Path

import pytest
import torch

from research import sweep
from research.models import TINY, Systems
from research.tasks import BUDGETS


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    argv = ["--quick", "--threads", "1", "--lrs", "1e-2,1e-1", "--tokens", "2,4", "--ensemble", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert sweep.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    where = out / "financial_phrasebank"
    return where, json.loads((where / "sweep.json").read_text())


def test_one_job_trains_every_grid_point(quick_sweep):
    where, result = quick_sweep
    grid = {(r["lr"], r["num_virtual_tokens"]) for r in result["adapters"]}
    assert grid == {(1e-2, 2), (1e-1, 2), (1e-2, 4), (1e-1, 4)}
    for r in result["adapters"]:
        config = json.loads((Path(r["path"]) / "adapter_config.json").read_text())
        assert config["num_virtual_tokens"] == r["num_virtual_tokens"]
        for key in ("val_accuracy", "test_accuracy", "test_macro_f1"):
            assert 0.0 <= r[key] <= 1.0
    # one job: every adapter's steps were the same optimizer steps of one loop
    assert result["steps"] > 0 and result["fit_rows"] + result["val_rows"] == 24


def test_selection_and_ensembles_use_validation_only(quick_sweep):
    where, result = quick_sweep
    best = next(r for r in result["adapters"] if r["name"] == result["selected"])
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in result["adapters"])  # softprompt.sweep's choice
    top1 = result["ensembles"]["top 1 by validation"]
    assert top1["members"] == [result["selected"]]
    # An ensemble of one is that adapter: same test accuracy as scoring it alone.
    assert top1["test_accuracy"] == pytest.approx(best["test_accuracy"])
    assert sorted(result["ensembles"]["all"]["members"]) == sorted(r["name"] for r in result["adapters"])
    doc = (where / "sweep.md").read_text()
    assert f"| {result['selected']} (chosen) |" in doc
    assert (where / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ensemble_averages_member_probabilities(tmp_path, one_thread):
    from softprompt.training import classification_report

    systems = Systems.build(TINY)
    # Two methods in one job: the ensemble then mixes a prompt-tuned and a prefix-tuned adapter.
    result = sweep.run_sweep(
        systems,
        "financial_phrasebank",
        lrs=[1e-1],
        tokens=[2],
        budget=BUDGETS["quick"],
        val_fraction=0.2,
        ensemble=2,
        out=tmp_path,
        log=lambda *_: None,
        methods=("prompt_tuning", "prefix_tuning"),
    )
    peft_types = {
        r["name"]: json.loads((Path(r["path"]) / "adapter_config.json").read_text())["peft_type"]
        for r in result["adapters"]
    }
    assert peft_types == {"pt2-lr0p1": "PROMPT_TUNING", "prefix2-lr0p1": "PREFIX_TUNING"}
    from research.tasks import TASKS, examples, task_rows

    task = TASKS["financial_phrasebank"]
    _, test_rows, _ = task_rows(task, BUDGETS["quick"], True)
    test = examples(task, test_rows, "test")
    labels = list(task.verbalizer.values())
    names = [r["name"] for r in result["adapters"]]
    room = sweep._room(systems, labels, BUDGETS["quick"])
    total = torch.zeros(len(test), len(labels), dtype=torch.float64)
    for name in names:
        scored = systems.ours.score(
            [e.text for e in test], labels=labels, adapters=[name] * len(test), max_input_tokens=room
        )
        total += torch.tensor([[s.scores[label] for label in labels] for s in scored], dtype=torch.float64).softmax(-1)
    preds = [labels[i] for i in total.argmax(-1).tolist()]
    expected = classification_report([e.target for e in test], preds, labels)
    assert result["ensembles"]["all"]["test_accuracy"] == pytest.approx(expected["accuracy"])
    assert result["ensembles"]["all"]["test_macro_f1"] == pytest.approx(expected["macro_f1"])
