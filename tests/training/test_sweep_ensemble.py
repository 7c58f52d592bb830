"""softprompt sweep with ``ensemble: k`` over settings of different base models, templates and label words: the
top-k candidate spans them, the final members train in one job per base, chosen.yaml holds each member's
recipe, the test score and --predict come from `ensemble_probabilities`, and one base is in memory at a time."""

import gc
import json
import weakref

import pytest
import yaml

from softprompt.data import load_rows
from softprompt.training import sweep_run as sweep_module
from softprompt.training.config import load_config
from softprompt.training.ensemble import EnsembleMember, ensemble_probabilities
from softprompt.training.metrics import classification_report
from softprompt.training.sweep_report import argmax
from softprompt.training.sweep_run import sweep
from softprompt.training.sweep_space import parse_sweep

from tiny import save_tiny_checkpoint
from toy_data import toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cross_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep-ensemble")
    bloom, llama = save_tiny_checkpoint("bloom", tmp / "bloom"), save_tiny_checkpoint("llama", tmp / "llama")
    space = {
        "system": [
            {"model": bloom, "template": "{text} ="},
            {"model": llama, "template": "Text: {text}\nLabel:", "verbalizer": {"B": " no", "A": " yes"}},
        ]
    }
    values = {
        "model": bloom,
        "data": write_csv(tmp / "toy.csv", toy_rows(12)),
        "label_column": "label",
        "method": "prompt_tuning",
        "init": "random",
        "num_virtual_tokens": 2,
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.5,
        "val_fraction": 0,
        "output": str(tmp / "out"),
        "space": space,
        "sweep": {
            "outer_folds": 2,
            "inner_folds": 2,
            "ensemble": 2,
            "bootstrap": 20,
            "test_data": write_csv(tmp / "test.csv", toy_rows(6, 4)),
        },
    }
    unlabelled = write_csv(tmp / "new.csv", [{"ID": f"n{i}", "text": r["text"]} for i, r in enumerate(toy_rows(5, 9))])
    return tmp, parse_sweep(values), unlabelled, (bloom, llama)


def force_the_ensemble(monkeypatch) -> list[dict]:
    """Make the top-2 ensemble every choice's winner (random tiny models cannot be made to prefer it); returns
    the real choices, as they are made."""
    real = sweep_module._Run.choose
    unforced: list[dict] = []

    def ensemble_wins(self, tags, among=None):
        choice = real(self, tags, among)
        unforced.append(choice)
        return {**choice, "chosen": "top2", "members": sorted((0, 1), key=lambda i: -choice["scores"][f"s{i}"])}

    monkeypatch.setattr(sweep_module._Run, "choose", ensemble_wins)
    return unforced


def test_top_k_spans_base_models_and_the_final_ensemble_predicts(cross_model, monkeypatch):
    tmp, spec, unlabelled, bases = cross_model
    unforced = force_the_ensemble(monkeypatch)
    result = sweep(spec, predict=unlabelled, id_column="ID", progress=False)
    out, report = result.output, result.report

    # every choice had the cross-model ensemble as a candidate, scored on the pooled inner probabilities
    assert unforced and all("top2" in c["scores"] for c in unforced)
    truth, probs = [], []
    for j in (1, 2):  # all rows' inner folds: the final choice's
        parts = [json.loads((out / "results" / f"o0i{j}-s{i}.json").read_text()) for i in (0, 1)]
        truth += parts[0]["truth"]
        probs += [[(a + b) / 2 for a, b in zip(p, q)] for p, q in zip(parts[0]["probs"], parts[1]["probs"])]
    assert unforced[-1]["scores"]["top2"] == pytest.approx(
        classification_report(truth, argmax(probs, ["A", "B"]), ["A", "B"])["macro_f1"]
    )

    final = report["final"]
    assert final["chosen"] == "top2" and {m["model"] for m in final["members"]} == set(bases)
    assert set(result.adapters) == {"member0", "member1"}
    assert {p.parent.name for p in result.adapters.values()} == {"job0", "job1"}  # one job per base model

    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert [m["model"] for m in chosen["members"]] == [m["model"] for m in final["members"]]
    for n, recipe in enumerate(chosen["members"]):  # each a recipe `softprompt train` loads
        config = load_config(None, recipe)
        assert config.name == f"member{n}" and config.model == final["members"][n]["model"]
        assert str(result.adapters[f"member{n}"]).startswith(config.output)

    members = [EnsembleMember(m["model"], str(result.adapters[f"member{n}"])) for n, m in enumerate(final["members"])]
    rows = load_rows(unlabelled)
    expected = ensemble_probabilities(members, rows)
    predicted = load_rows(result.predictions)
    assert [r["ID"] for r in predicted] == [f"n{i}" for i in range(5)]
    assert [r["Label"] for r in predicted] == expected.predictions()

    test_rows = load_rows(spec.options.test_data)
    on_test = ensemble_probabilities(members, test_rows)
    gold = [r["label"] for r in test_rows]
    assert report["estimate"]["test"]["n"] == 6
    assert report["estimate"]["test"]["macro_f1"] == pytest.approx(
        classification_report(gold, on_test.predictions(), on_test.labels)["macro_f1"]
    )


def test_one_base_model_is_held_at_a_time(cross_model, monkeypatch):
    """Training, the final ensemble's test score and --predict across two bases: when a base loads, no other
    base the sweep loaded is still alive (as `ensemble_probabilities` loads them)."""
    tmp, spec, unlabelled, bases = cross_model
    force_the_ensemble(monkeypatch)
    live: list[weakref.ref] = []
    loads: list[tuple[str, int]] = []  # (base loading, bases alive then)

    def counting(config):
        gc.collect()
        loads.append((config.model, sum(ref() is not None for ref in live)))
        model = real(config)
        live.append(weakref.ref(model))
        return model

    real = sweep_module.load_model
    monkeypatch.setattr(sweep_module, "load_model", counting)
    result = sweep(spec, output=str(tmp / "one-at-a-time"), predict=unlabelled, progress=False)
    assert result.report["final"]["chosen"] == "top2" and result.predictions is not None
    assert {name for name, _ in loads} == set(bases)
    assert [alive for _, alive in loads] == [0] * len(loads)
