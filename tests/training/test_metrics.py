"""Classification metrics, the text report, perplexity and the PNG plots (softprompt.training.metrics)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softprompt.errors import ConfigError, DataError
from softprompt.training.metrics import (
    classification_report,
    format_report,
    perplexity,
    plot_confusion_matrix,
    plot_loss_curve,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-worked example. Confusion matrix (rows true, columns predicted, order a b c):
#   a: 2 1 0    b: 0 1 1    c: 0 0 1
# a: P = 2/2, R = 2/3, F1 = 0.8;  b: P = 1/2, R = 1/2, F1 = 0.5;  c: P = 1/2, R = 1/1, F1 = 2/3
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_hand_computed_report():
    report = classification_report(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert report["n"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    expected = {"a": (1.0, 2 / 3, 0.8, 3), "b": (0.5, 0.5, 0.5, 2), "c": (0.5, 1.0, 2 / 3, 1)}
    for label, (p, r, f1, support) in expected.items():
        m = report["per_class"][label]
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f1))
        assert m["support"] == support
    assert report["macro_f1"] == pytest.approx(59 / 90)  # (4/5 + 1/2 + 2/3) / 3
    assert report["macro_precision"] == pytest.approx(2 / 3)
    assert report["macro_recall"] == pytest.approx(13 / 18)
    assert report["invalid_predictions"] == 0


def test_labels_order_sets_matrix_order():
    report = classification_report(Y_TRUE, Y_PRED, ["c", "b", "a"])
    assert report["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert report["labels"] == ["c", "b", "a"]


def test_label_never_seen_counts_zero_in_macro_average():
    report = classification_report(["x", "x", "y"], ["x", "y", "y"], ["x", "y", "z"])
    assert report["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # x: P 1, R 1/2, F1 2/3; y: P 1/2, R 1, F1 2/3; z: 0
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_predictions_outside_labels_count_as_wrong():
    report = classification_report(["a", "b", "b"], ["a", "maybe", "b"], ["a", "b"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["invalid_predictions"] == 1
    assert report["confusion_matrix"] == [[1, 0], [0, 1]]
    assert report["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert report["per_class"]["b"]["precision"] == pytest.approx(1.0)
    assert "predictions outside the label set: 1" in format_report(report)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((["a"], ["a", "b"], ["a", "b"]), DataError, "1 true labels but 2 predictions"),
        (([], [], ["a"]), DataError, "no examples to score"),
        ((["a", "q"], ["a", "a"], ["a"]), DataError, r"example 2 has true label 'q', which is not one of 'a'"),
        ((["a"], ["a"], []), ConfigError, "labels is empty"),
        ((["a"], ["a"], ["a", "b", "a"]), ConfigError, "label 'a' is listed twice"),
    ],
)
def test_report_errors(args, error, message):
    with pytest.raises(error, match=message):
        classification_report(*args)


def test_format_report_table_and_matrix():
    text = format_report(classification_report(Y_TRUE, Y_PRED, ["a", "b", "c"]))
    lines = text.splitlines()
    assert lines[0] == "n = 6   accuracy = 0.6667   macro F1 = 0.6556"
    row_a = next(line for line in lines if line.startswith("a ") and "1.0000" in line)
    assert row_a.split() == ["a", "1.0000", "0.6667", "0.8000", "3"]
    assert any(line.split() == ["macro", "avg", "0.6667", "0.7222", "0.6556", "6"] for line in lines)
    start = lines.index("confusion matrix (rows = true, columns = predicted)")
    assert lines[start + 1].split() == ["true", "\\", "predicted", "a", "b", "c"]
    assert [line.split() for line in lines[start + 2 : start + 5]] == [
        ["a", "2", "1", "0"],
        ["b", "0", "1", "1"],
        ["c", "0", "0", "1"],
    ]


def test_format_report_aligns_long_labels():
    report = classification_report(
        ["no complaint", "complaint"], ["no complaint", "no complaint"], ["complaint", "no complaint"]
    )
    lines = format_report(report).splitlines()
    matrix = lines[lines.index("confusion matrix (rows = true, columns = predicted)") + 1 :]
    assert len({len(line) for line in matrix}) == 1  # a rectangular block
    assert matrix[1].split() == ["complaint", "0", "1"]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abcd")), min_size=1, max_size=40))
def test_report_invariants(pairs):
    y_true, y_pred = [t for t, _ in pairs], [p for _, p in pairs]
    report = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(sum(t == p for t, p in pairs) / len(pairs))
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == len(pairs) - y_pred.count("d") == len(pairs) - report["invalid_predictions"]
    assert [report["per_class"][x]["support"] for x in "abc"] == [y_true.count(x) for x in "abc"]
    for m in report["per_class"].values():
        assert 0.0 <= m["f1"] <= 1.0 and min(m["precision"], m["recall"]) <= m["f1"] + 1e-12
    assert 0.0 <= report["macro_f1"] <= 1.0


def test_perplexity():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(DataError, match="at least one scored token"):
        perplexity(1.0, 0)


def _png_pixels(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def test_plot_confusion_matrix_writes_png_atomically(tmp_path):
    path = tmp_path / "plots" / "confusion.png"
    report = classification_report(Y_TRUE, Y_PRED, ["a", "b", "c"])
    plot_confusion_matrix(report, path)
    image = _png_pixels(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    path.write_bytes(b"old")
    plot_confusion_matrix(report, path)  # replaces an existing file
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in path.parent.iterdir()) == ["confusion.png"]  # no temp files left behind


def test_plot_loss_curve(tmp_path):
    records = [{"step": s, "loss": 2.0 / (s + 1), "epoch": s // 5} for s in range(12)]
    records[4]["val_loss"] = 0.9
    records.append({"step": 12, "val_loss": 0.5, "epoch": 2})  # an evaluation-only record
    path = tmp_path / "loss.png"
    plot_loss_curve(records, path)
    assert _png_pixels(path).shape[1] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_plot_loss_curve_errors(tmp_path):
    with pytest.raises(DataError, match="no records to plot"):
        plot_loss_curve([], tmp_path / "x.png")
    with pytest.raises(DataError, match=r"record 2 .* needs a 'step' and a 'loss'"):
        plot_loss_curve([{"step": 0, "loss": 1.0}, {"loss": 0.5}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
