"""`softprompt predict`: labels for unlabelled rows, written back as raw values; ensembles average."""

import csv

import pytest

from softprompt.cli import main
from softprompt.training.predict import label_probabilities

from tiny import save_tiny_checkpoint
from toy_data import toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    model_dir = save_tiny_checkpoint("bloom", tmp / "model")
    rows = [
        {"ID": str(100 + i), "text": r["text"], "label": "1" if r["label"] == "A" else "2"}
        for i, r in enumerate(toy_rows(96, seed=3))
    ]
    write_csv(tmp / "train.csv", rows[:64])
    write_csv(tmp / "test.csv", [{"ID": r["ID"], "text": r["text"]} for r in rows[64:]])
    for name, seed in (("a", 0), ("b", 1)):
        assert (
            main(
                [
                    "train",
                    "--model",
                    model_dir,
                    "--data",
                    str(tmp / "train.csv"),
                    "--label-column",
                    "label",
                    "--verbalizer",
                    "1=A,2=B",
                    "--method",
                    "prefix-tuning",
                    "--init",
                    "random",
                    "--num-virtual-tokens",
                    "4",
                    "--lr",
                    "1.0",
                    "--lr-schedule",
                    "constant",
                    "--epochs",
                    "8",
                    "--val-fraction",
                    "0.25",
                    "--seed",
                    str(seed),
                    "--name",
                    name,
                    "--output",
                    str(tmp / "runs"),
                ]
            )
            == 0
        )
    return tmp, model_dir, {r["ID"]: r["label"] for r in rows[64:]}


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_use_the_id_column_and_raw_labels(trained, capsys):
    tmp, model_dir, truth = trained
    out = tmp / "preds.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                model_dir,
                "--adapter",
                str(tmp / "runs" / "a"),
                "--data",
                str(tmp / "test.csv"),
                "--id-column",
                "ID",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = read(out)
    assert list(rows[0]) == ["ID", "Label"]
    assert [r["ID"] for r in rows] == list(truth)
    assert {r["Label"] for r in rows} <= {"1", "2"}
    correct = sum(r["Label"] == truth[r["ID"]] for r in rows)
    assert correct / len(rows) >= 0.75, correct  # chance is 0.5; swapped labels would give 0.1


def test_an_ensemble_averages_each_adapters_label_probabilities(trained):
    import softprompt

    tmp, model_dir, truth = trained
    out = tmp / "ensemble.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                model_dir,
                "--adapter",
                f"a={tmp / 'runs' / 'a'}",
                "--adapter",
                f"b={tmp / 'runs' / 'b'}",
                "--data",
                str(tmp / "test.csv"),
                "--output",
                str(out),
                "--probabilities",
            ]
        )
        == 0
    )
    rows = read(out)
    assert list(rows[0]) == ["row", "Label", "p_A", "p_B"]
    model = softprompt.load(model_dir)
    model.load_adapter(tmp / "runs" / "a", name="a")
    model.load_adapter(tmp / "runs" / "b", name="b")
    texts = [r["text"] for r in read(tmp / "test.csv")]
    alone = [label_probabilities(model, texts, ["A", "B"], [n]) for n in ("a", "b")]
    for i, row in enumerate(rows):
        expected = [(alone[0][i][j] + alone[1][i][j]) / 2 for j in range(2)]
        assert float(row["p_A"]) == pytest.approx(expected[0], abs=2e-6)
        assert float(row["p_A"]) + float(row["p_B"]) == pytest.approx(1.0, abs=2e-6)
        assert row["Label"] == ("1" if expected[0] > expected[1] else "2")


def test_predict_mistakes_are_one_line(trained, capsys):
    tmp, model_dir, _ = trained
    out = tmp / "never.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                model_dir,
                "--adapter",
                str(tmp / "runs" / "a"),
                "--data",
                str(tmp / "test.csv"),
                "--id-column",
                "Id",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "'Id'" in err and "ID" in err and "Traceback" not in err and not out.exists()
    assert main(["predict", "--model", model_dir, "--data", str(tmp / "test.csv"), "--output", str(out)]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "--model",
                model_dir,
                "--data",
                str(tmp / "test.csv"),
                "--output",
                str(out),
                "--template",
                "{text} =",
                "--verbalizer",
                "1A2B",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--verbalizer" in err and "RAW=TEXT" in err and not out.exists()


def test_without_an_adapter_the_zero_shot_base_model_predicts(trained):
    import softprompt

    tmp, model_dir, truth = trained
    out = tmp / "zero_shot.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                model_dir,
                "--data",
                str(tmp / "test.csv"),
                "--id-column",
                "ID",
                "--template",
                "{text} =",
                "--verbalizer",
                '{1: " A", 2: " B"}',
                "--probabilities",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = read(out)
    assert list(rows[0]) == ["ID", "Label", "p_A", "p_B"] and [r["ID"] for r in rows] == list(truth)
    model = softprompt.load(model_dir)
    texts = [f"{r['text']} =" for r in read(tmp / "test.csv")]
    base = label_probabilities(model, texts, [" A", " B"], [None])  # the bare model, leading spaces kept
    for row, p in zip(rows, base):
        assert float(row["p_A"]) == pytest.approx(p[0], abs=2e-6)
        assert row["Label"] == ("1" if p[0] > p[1] else "2")
