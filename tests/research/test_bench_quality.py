"""The quality harness (research/quality.py) end to end in quick mode: a tiny random model and a few rows of
each task (the real rows when ../shared/data is there, stand-ins otherwise). It checks that every task
and system is reported, that the numbers are internally consistent and that the RAFT submission file
has the expected shape; it asserts no quality target (those are reported in docs/results.md)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_quality(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "research.quality",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
            "--doc",
            str(out / "results.md"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "quality.json").read_text()), (out / "results.md").read_text()


def test_every_classification_task_reports_every_system(quick_quality):
    _, result, doc = quick_quality
    for task in ("financial_phrasebank", "sst2"):
        systems = result["tasks"][task]["systems"]
        assert set(systems) == {
            "zero-shot",
            "softprompt prompt tuning",
            "softprompt prefix tuning",
            "softprompt p tuning",
            "PEFT prompt tuning",
        }
        for name, r in systems.items():
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
            matrix = r["confusion_matrix"]
            assert sum(map(sum, matrix)) == r["n"]
            assert r["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(matrix))) / r["n"])
            assert (r["adapter_bytes"] > 0) == (name != "zero-shot")
            assert f"| {name} | {r['accuracy']:.1%}" in doc
        assert f"## {task}" in doc


def test_raft_cross_validation_and_submission_file(quick_quality):
    out, result, doc = quick_quality
    raft = result["tasks"]["raft_twitter_complaints"]
    assert raft["split"].startswith("2-fold cross-validation")
    tuned = raft["systems"]["softprompt prompt tuning"]
    assert 0.0 <= tuned["macro_f1"] <= 1.0 and tuned["macro_f1_std"] >= 0.0
    # pooled over both folds' held-out rows: accuracy equals the fold mean (equal folds), shown in the table
    assert tuned["accuracy_pooled"] == pytest.approx(tuned["accuracy"]) and 0.0 <= tuned["macro_f1_pooled"] <= 1.0
    assert (
        f"| softprompt prompt tuning | {tuned['accuracy']:.1%} ± {tuned['accuracy_std']:.1%} "
        f"(pooled {tuned['accuracy_pooled']:.1%})" in doc
    )
    if "predictions" in raft:  # the unlabelled test tweets are in ../shared/data
        with open(raft["predictions"]["path"], newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["ID", "Label"] and len(rows) == 1 + 8
        assert {r[1] for r in rows[1:]} <= {"1", "2"}
        better = (
            "zero-shot"
            if raft["systems"]["zero-shot"]["macro_f1_pooled"] > tuned["macro_f1_pooled"]
            else "softprompt prompt tuning"
        )
        assert raft["predictions"]["system"] == better and f"predicted by the {better} system" in doc


def test_generation_reports_perplexity_and_one_mixed_batch_of_samples(quick_quality):
    _, result, doc = quick_quality
    gen = result["tasks"]["generation"]
    for name in ("chatgpt_prompts", "english_quotes"):
        for r in gen["systems"][name].values():
            assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
            assert r["tokens"] > 0
    assert {s["adapter"] for s in gen["samples"]} == {"base model", "chatgpt_prompts", "english_quotes"}
    assert "## Generation" in doc


def test_merge_reruns_one_task_with_its_own_budget_and_keeps_the_others(quick_quality):
    out, before, _ = quick_quality
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "research.quality",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
            "--tasks",
            "raft_twitter_complaints",
            "--cv-epochs",
            "2",
            "--merge",
            "--doc",
            str(out / "merged.md"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((out / "quality.json").read_text())
    assert set(after["tasks"]) == set(before["tasks"])
    for name in ("financial_phrasebank", "sst2", "generation"):
        assert after["tasks"][name] == before["tasks"][name]  # kept as they were
    assert after["tasks"]["raft_twitter_complaints"]["run"]["overrides"] == {"cv_epochs": 2}
    doc = (out / "merged.md").read_text()
    assert "Tasks were run separately" in doc and "cv epochs 2" in doc


def test_methods_rerun_one_method_and_keep_the_tasks_other_systems(quick_quality):
    out, _, _ = quick_quality
    before = json.loads((out / "quality.json").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "research.quality",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
            "--tasks",
            "sst2",
            "--methods",
            "prefix-tuning",
            "--merge",
            "--doc",
            str(out / "methods.md"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((out / "quality.json").read_text())["tasks"]["sst2"]
    old = before["tasks"]["sst2"]
    assert list(after["systems"]) == list(old["systems"])  # same systems, same order
    for name in ("PEFT prompt tuning", "softprompt prompt tuning", "softprompt p tuning"):
        assert after["systems"][name] == old["systems"][name]  # kept, not rerun
    assert after["run"]["overrides"] == {"methods": "prefix_tuning"} and after["run"]["kept_from"] == old["run"]["date"]
    assert "the other systems are from the run of" in (out / "methods.md").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "research.quality", "--quick", "--out", str(out), "--methods", "lora"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "--methods: expected some of prompt_tuning" in bad.stderr


def test_merge_on_a_fresh_checkout_reads_the_numbers_kept_beside_the_doc(quick_quality, tmp_path):
    out, before, _ = quick_quality
    assert json.loads((out / "results.json").read_text()) == before  # the doc's numbers travel with it
    doc = tmp_path / "research" / "results" / "quality.md"  # a fresh checkout: the report and its numbers, no runs/
    doc.parent.mkdir(parents=True)
    shutil.copy(out / "results.md", doc)
    shutil.copy(out / "results.json", doc.with_suffix(".json"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "research.quality",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "fresh_runs"),
            "--tasks",
            "raft_twitter_complaints",
            "--merge",
            "--doc",
            str(doc),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads(doc.with_suffix(".json").read_text())
    assert set(after["tasks"]) == set(before["tasks"])
    for name in ("financial_phrasebank", "sst2", "generation"):
        assert after["tasks"][name] == before["tasks"][name]
    text = doc.read_text()
    assert all(f"## {name}" in text for name in ("financial_phrasebank", "sst2", "raft_twitter_complaints"))
    phrasebank = text.split("## financial_phrasebank", 1)[1].split("## ", 1)[0]
    assert (
        phrasebank.index("| zero-shot |")
        < phrasebank.index("| softprompt prompt tuning |")
        < phrasebank.index("| PEFT prompt tuning |")
        < phrasebank.index("| softprompt p tuning |")
    )
    # the report is rebuilt from the numbers beside it, unchanged (rows keep their fixed order)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "research.quality",
            "--report-only",
            "--out",
            str(tmp_path / "no_runs"),
            "--doc",
            str(doc),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc.read_text() == text


def test_research_never_writes_into_the_product(quick_quality, tmp_path, capsys):
    # docs/ and examples/ belong to the product: a research run given a path there refuses it, before any work.
    from research import quality, sweep
    from research.paths import EXAMPLES, REPO

    for argv in (
        ["--report-only", "--out", str(REPO / "docs"), "--doc", str(tmp_path / "a.md")],
        ["--report-only", "--out", str(tmp_path), "--doc", str(REPO / "docs" / "results.md")],
        ["--quick", "--out", str(EXAMPLES), "--tasks", "sst2"],
    ):
        with pytest.raises(SystemExit, match="belongs to the product"):
            quality.main(argv)
    with pytest.raises(SystemExit, match="--out: .* belongs to the product"):
        sweep.main(["--quick", "--out", str(EXAMPLES)])
    with pytest.raises(SystemExit):
        quality.parse_args(["--export"])  # shipping an example is research.export's explicit step, not a flag
    assert "unrecognized arguments: --export" in capsys.readouterr().err


def test_example_adapters_are_replaced_only_with_export_into(quick_quality, tmp_path, capsys):
    # The examples may come from longer sweeps than a standard run: only `research.export RESULT --into DIR`
    # writes there; without --into it says what it would ship and writes nothing.
    from research import export, quality

    out, before, _ = quick_quality
    stored = tmp_path / "runs"
    stored.mkdir()
    result = {**before, "meta": {**before["meta"], "budget": "standard", "model": "smollm2-135m"}}
    (stored / "quality.json").write_text(json.dumps(result))
    examples = tmp_path / "examples"
    examples.mkdir()
    assert quality.main(["--report-only", "--out", str(stored), "--doc", str(tmp_path / "a.md")]) == 0
    assert list(examples.iterdir()) == [] and (tmp_path / "a.md").exists()
    assert export.main([str(stored / "quality.json")]) == 0  # compares with the shipped examples, writes nothing
    assert capsys.readouterr().out.count("research.export: ") == 3
    assert export.export_examples(result, examples, dry_run=True) and list(examples.iterdir()) == []
    assert export.main([str(stored / "quality.json"), "--into", str(examples)]) == 0
    assert sorted(p.name for p in examples.iterdir()) == sorted(
        ["financial_phrasebank", "sst2", "raft_twitter_complaints", export.SCORES_FILE]
    )
    with pytest.raises(SystemExit, match="quick .* run"):  # a harness check's adapters never ship
        export.main([str(out / "quality.json"), "--into", str(examples)])


def test_export_offers_each_task_its_best_adapter_of_the_run(quick_quality, tmp_path):
    from research.export import export_examples, shipped_scores

    _, result, _ = quick_quality
    examples = tmp_path / "examples"
    examples.mkdir()
    export_examples(result, examples)
    scores = shipped_scores(examples)
    assert set(scores) == {"financial_phrasebank-tiny-llama", "sst2-tiny-llama", "raft_twitter_complaints-tiny-llama"}
    for task in ("financial_phrasebank", "sst2"):
        best = max(r["accuracy"] for k, r in result["tasks"][task]["systems"].items() if k.startswith("softprompt"))
        assert scores[f"{task}-tiny-llama"]["value"] == round(best, 4)
    raft = result["tasks"]["raft_twitter_complaints"]["systems"]["softprompt prompt tuning"]
    assert scores["raft_twitter_complaints-tiny-llama"] == {
        "task": "raft_twitter_complaints",
        "base_model": "tiny-llama",
        "metric": "macro_f1",
        "value": round(raft["macro_f1_pooled"], 4),
    }
    assert (examples / "sst2-tiny-llama" / "adapter_model.safetensors").exists()
    # the same run offered again replaces nothing: its adapters do not beat themselves
    assert sum(": kept examples/adapters/" in line for line in export_examples(result, examples)) == 3
