"""Which rows training reads: ``--max-rows`` (a seeded sample, stratified by label) and a ``--text-column``
the file lacks (an error even when a ``--template`` says what to read)."""

from __future__ import annotations

import json

import pytest

from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.training.config import load_config
from softprompt.training.jobs import prepare_job

from tiny import save_tiny_checkpoint, tiny_model
from toy_data import write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def sorted_by_label(tmp_path, n=60):
    """Like financial_phrasebank: every 'neg' row first, then every 'pos' row."""
    rows = [{"text": f"bad {i}", "label": "neg"} for i in range(n // 2)]
    rows += [{"text": f"good {i}", "label": "pos"} for i in range(n // 2)]
    return write_csv(tmp_path / "sorted.csv", rows)


def test_max_rows_samples_every_label_with_the_seed_and_is_inherited(tmp_path):
    data = sorted_by_label(tmp_path)
    base = {"data": data, "label_column": "label", "val_fraction": 0.0}
    (spec,) = load_config(None, {**base, "max_rows": 10}).resolved_adapters()
    job = prepare_job(spec)
    assert len(job.train) == 10
    assert sorted(e.target for e in job.train) == ["neg"] * 5 + ["pos"] * 5  # not the file's first ten lines
    again = prepare_job(load_config(None, {**base, "max_rows": 10}).resolved_adapters()[0])
    assert [e.text for e in again.train] == [e.text for e in job.train]  # same seed, same rows
    other = prepare_job(load_config(None, {**base, "max_rows": 10, "seed": 1}).resolved_adapters()[0])
    assert [e.text for e in other.train] != [e.text for e in job.train]
    # per adapter: inherited from the top level unless an adapter sets its own
    multi = load_config(None, {**base, "max_rows": 10, "adapters": [{"name": "a"}, {"name": "b", "max_rows": 4}]})
    a, b = multi.resolved_adapters()
    assert (a.max_rows, b.max_rows) == (10, 4) and len(prepare_job(b).train) == 4
    (everything,) = load_config(None, {**base, "max_rows": 1000}).resolved_adapters()
    assert len(prepare_job(everything).train) == 60
    # held-out rows come from the sample too
    (split,) = load_config(None, {**base, "max_rows": 20, "val_fraction": 0.25}).resolved_adapters()
    job = prepare_job(split)
    assert (len(job.train), len(job.val)) == (15, 5)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"max_rows": 0}, "--max-rows: expected an integer of at least 1, got 0"),
        ({"max_rows": "many"}, "--max-rows"),
        ({"adapters": [{"name": "a", "max_rows": -3}]}, r"adapters\[0\] \(a\): --max-rows: expected an integer"),
    ],
)
def test_max_rows_is_validated_and_names_the_flag(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"model": "tiny", "data": "train.csv", "label_column": "label", **override})


def test_a_text_column_the_file_lacks_fails_even_with_a_template(tmp_path, capsys):
    data = sorted_by_label(tmp_path, 20)
    (spec,) = load_config(
        None, {"data": data, "label_column": "label", "template": "Review: {text}", "text_column": "txt"}
    ).resolved_adapters()
    with pytest.raises(ConfigError, match=r"--text-column: .*sorted.csv has no column 'txt' \(did you mean 'text'"):
        prepare_job(spec)
    # without --text-column, a template that names its own columns needs no 'text' column
    write_csv(tmp_path / "other.csv", [{"body": f"x{i}", "label": "ab"[i % 2]} for i in range(12)])
    (fine,) = load_config(
        None, {"data": str(tmp_path / "other.csv"), "label_column": "label", "template": "Body: {body} ="}
    ).resolved_adapters()
    assert fine.text_column is None and len(prepare_job(fine).train) > 0
    # end to end: one line naming the column and the columns the file has, exit 2
    model = save_tiny_checkpoint("gpt2", tmp_path / "model")
    argv = ["train", "--model", model, "--data", data, "--label-column", "label", "--template", "T: {text}"]
    assert main([*argv, "--text-column", "nosuch", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--text-column: " + data + " has no column 'nosuch'; its columns are 'text', 'label'")


def test_eval_max_rows_scores_a_stratified_sample(tmp_path, capsys):
    data = sorted_by_label(tmp_path, 40)
    model_dir = save_tiny_checkpoint("gpt2", tmp_path / "model")
    model = tiny_model("gpt2")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=2, seed=0)
    model.save_adapter("a", tmp_path / "a")
    argv = ["eval", "--model", model_dir, "--adapter", f"a={tmp_path / 'a'}", "--data", data]
    assert main([*argv, "--label-column", "label", "--max-rows", "8", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])["a"]
    assert report["n"] == 8 and [report["metrics"]["per_class"][c]["support"] for c in ("neg", "pos")] == [4, 4]
    assert main([*argv, "--label-column", "label", "--max-rows", "0"]) == 2
    assert "--max-rows" in capsys.readouterr().err


def test_a_run_saved_when_text_column_defaulted_to_text_resumes(tmp_path, capsys):
    """Runs saved before --text-column defaulted to unset wrote 'text' beside their template; they resume."""
    data = sorted_by_label(tmp_path, 20)
    model = save_tiny_checkpoint("gpt2", tmp_path / "model")
    out = tmp_path / "out"
    argv = ["train", "--model", model, "--data", data, "--label-column", "label", "--template", "T: {text} =",
            "--num-virtual-tokens", "2", "--epochs", "1", "--batch-size", "8", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    state_file = out / "default" / "checkpoints" / "last" / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["config"]["text_column"] is None
    state["config"]["text_column"] = "text"
    state_file.write_text(json.dumps(state))
    assert main([*argv, "--resume"]) == 0
    state["config"]["text_column"] = "body"  # a real change is still refused
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "--text-column 'body' -> None" in capsys.readouterr().err
