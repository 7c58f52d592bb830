"""research/cross_model.py on two tiny base models of different families, each adapter with its own template and
label words: the JSON's per-member and ensemble figures, rows a member trained on dropped, labels that differ
refused. The scoring itself is `softprompt.ensemble_probabilities` (tests/training/test_ensemble.py)."""

import json

import pytest
import torch

import softprompt
from research import cross_model
from softprompt.training import classification_report, train

from tiny import save_tiny_checkpoint
from toy_data import TRAINING, toy_job, toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

SETUPS = {
    "bloom": {"template": "{text} =", "verbalizer": {"A": " x", "B": " y"}},
    "llama": {"template": "Text: {text}\nLabel:", "verbalizer": {"B": " no", "A": " yes"}},
}


def trained(tmp, family: str, rows, **extra) -> str:
    values = toy_job(
        write_csv(tmp / f"train-{family}-{len(extra)}.csv", rows),
        tmp / f"runs-{family}-{len(extra)}",
        {**TRAINING, **SETUPS[family]},
        model=str(tmp / family),
        **extra,
    )
    return str(train(values, progress=False).adapters["default"].path)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross-model")
    for family in SETUPS:
        save_tiny_checkpoint(family, tmp / family)
    train_rows = toy_rows(16)
    pairs = [(str(tmp / family), trained(tmp, family, train_rows)) for family in SETUPS]
    return tmp, pairs, train_rows


def test_members_on_two_bases_are_scored_and_rows_they_trained_on_dropped(members):
    tmp, pairs, train_rows = members
    seen = {r["text"] for r in train_rows}
    test_rows = [r for r in toy_rows(16, seed=7) if r["text"] not in seen][:8]  # short toy texts can repeat
    test = write_csv(tmp / "test.csv", train_rows[:3] + test_rows)  # 3 rows both members trained on
    val = write_csv(tmp / "val.csv", toy_rows(6, seed=8))
    out = tmp / "ensemble.json"
    argv = ["--member", f"{pairs[0][0]}={pairs[0][1]}", "--member", f"{pairs[1][0]}={pairs[1][1]}"]
    argv += ["--validation", val, "--test", test, "--out", str(out), "--threads", "1"]
    assert cross_model.main(argv) == 0
    torch.set_num_threads(1)  # main set its --threads
    result = json.loads(out.read_text())
    assert [m["template"] for m in result["members"]] == [s["template"] for s in SETUPS.values()]
    assert result["labels"] == ["A", "B"] and result["weights"] == "equal"
    split = result["splits"]["test"]
    assert split["dropped_as_trained_on"] == 3 and split["rows"] == 8
    assert result["splits"]["validation"]["rows"] == 6

    members_ = [softprompt.EnsembleMember(m, a) for m, a in pairs]
    scored = softprompt.ensemble_probabilities(members_, test_rows)
    gold = [r["label"] for r in test_rows]
    for i, figures in enumerate(split["members"]):
        own = classification_report(gold, scored.predictions(scored.member_probs[i]), ["A", "B"])
        assert figures == {"accuracy": own["accuracy"], "macro_f1": own["macro_f1"]}
    both = classification_report(gold, scored.predictions(), ["A", "B"])
    assert split["ensemble"] == {"accuracy": both["accuracy"], "macro_f1": both["macro_f1"]}
    preds = [scored.predictions(p) for p in scored.member_probs]
    assert split["disagree"] == sum(a != b for a, b in zip(*preds))
    assert split["all_wrong"] == sum(a != g and b != g for a, b, g in zip(*preds, gold))


def test_a_zero_shot_member_and_labels_that_differ(members):
    tmp, pairs, _ = members
    test = write_csv(tmp / "test2.csv", toy_rows(4, seed=9))
    given = {"template": "{text} ->", "label_column": "label", "verbalizer": {"A": " a", "B": " b"}}
    result = cross_model.run([(pairs[0][0], None), pairs[1]], {"test": test}, given=given, log=lambda *_: None)
    assert result["members"][1]["template"] == "{text} ->"  # given: for every member alike
    assert result["splits"]["test"]["rows"] == 4
    other = trained(tmp, "bloom", toy_rows(16, labels=("P", "Q")), verbalizer={"P": " p", "Q": " q"})
    with pytest.raises(SystemExit, match=r"ensemble member 1 .*labels \['P', 'Q'\] differ"):
        cross_model.run([pairs[0], (pairs[0][0], other)], {"test": test}, log=lambda *_: None)
    with pytest.raises(SystemExit, match="give template and verbalizer"):
        cross_model.run([(pairs[0][0], None)], {"test": test}, log=lambda *_: None)
