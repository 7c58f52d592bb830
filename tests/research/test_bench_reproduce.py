"""research/reproduce.py (one command for every measured number the docs quote) and research/cross_model.py, in quick
mode: every step's documented command lines run on a tiny random model and stand-in rows. It checks the
plan itself (each step measures the figures it documents, the SST-2 chain's cuts never reuse a row, a
finished step is not redone, missing inputs and failing commands are one clear error), not quality."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from research import cross_model, reproduce, reproduce_plan

ROOT = Path(__file__).resolve().parents[2]
QUALITY_STEPS = {"quality", "quality-raft"}  # research.quality --quick has its own test (test_bench_quality.py)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    steps = [s.name for s in reproduce_plan.plan() if s.name not in QUALITY_STEPS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "research.reproduce", "--quick", "--out", str(out), "--only", ",".join(steps)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, steps, proc.stdout


def test_every_step_measures_the_figures_it_documents(quick_run):
    out, steps, _ = quick_run
    for name in steps:
        done = json.loads((out / name / "done.json").read_text())
        assert done["quick"] is True and done["documented"], name
        assert set(done["documented"]) <= set(done["reproduced"]), name  # else the summary could not compare
        for figure, value in done["reproduced"].items():
            if "accuracy" in figure:
                assert 0.0 <= value <= 1.0, (name, figure, value)


def test_the_summary_sets_each_documented_number_beside_its_rerun(quick_run):
    out, steps, stdout = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert [d["step"] for d in summary] == steps
    chain4 = next(d for d in summary if d["step"] == "sst2-chain-4")
    table = (out / "summary.md").read_text()
    assert f"| sst2-chain-4 | dev accuracy | 90.8% | {chain4['reproduced']['dev accuracy']:.1%} |" in table
    assert "| fpb-prefix-e4 | chosen on validation: test accuracy | 97.8% |" in table
    assert "quick mode" in table and "research.reproduce: wrote" in stdout


def test_the_sst2_chain_never_trains_or_validates_on_a_row_an_earlier_link_saw(quick_run):
    from softprompt.data import Template, load_rows
    from softprompt.training import fingerprint, read_train_fingerprints

    out, _, _ = quick_run
    render = Template(reproduce_plan.SST2_TEMPLATE).render

    def texts(path):
        return {fingerprint(render(r)) for r in load_rows(path)}

    first = read_train_fingerprints(out / "sst2-prefix-20k" / "sst2" / "prefix20-lr0p01")
    earlier = set(first)
    for n in (2, 3, 4):
        link = out / f"sst2-chain-{n}"
        val, train = texts(link / "val_new.tsv"), texts(link / "train_new.tsv")
        assert val and train and not val & train
        assert not (val | train) & earlier, n
        learnt = read_train_fingerprints(link / "out" / "default")
        assert learnt >= train | first  # the chain's adapter remembers every link's rows, so eval drops them all
        earlier |= val | train
    config = (out / "sst2-chain-4" / "out" / "config.yaml").read_text()
    assert "sst2-chain-3/out/default" in config and "lr: 0.003" in config  # continued from the previous link


def test_the_raft_transfer_step_cross_validates_the_recipe_and_writes_a_submission(quick_run):
    out, _, _ = quick_run
    where = out / "raft-gemma-transfer"
    report = json.loads((where / "cv" / "cv_report.json").read_text())
    assert report["k"] == 10 and len(report["folds"]) == 10 and report["pooled"]["adapter"]["n"] == 20
    # both trainings started from the SST-2 adapter this plan trained, with the recipe's template
    for run in (where / "cv", where / "final"):
        saved = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config beside every output
        assert "gemma-sst2-19000" in saved["init_from"] and saved["template"] == "Tweet: {Tweet text}\nSentiment:"
    with open(where / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == [str(50 + i) for i in range(12)]
    assert {r[1] for r in rows[1:]} <= {"1", "2"}
    done = json.loads((where / "done.json").read_text())["reproduced"]
    assert done["test tweets predicted"] == 12
    assert done["test tweets called complaints"] == sum(r[1] == "1" for r in rows[1:]) / 12


def test_a_finished_step_is_not_run_again(quick_run, capsys):
    out, steps, _ = quick_run
    done = out / "sst2-chain-4" / "done.json"
    before = done.stat().st_mtime_ns
    assert reproduce.main(["--quick", "--out", str(out), "--only", "sst2-chain-4"]) == 0
    assert "0 of 1 steps to run" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == before
    # the summary still covers the steps an earlier invocation finished, not just those of --only
    assert [d["step"] for d in json.loads((out / "summary.json").read_text())] == steps


def test_the_plan_lists_every_step_with_its_estimate(capsys):
    assert reproduce.main(["--list", "--out", "/nonexistent/reproduce"]) == 0
    shown = capsys.readouterr().out
    steps = reproduce_plan.plan()
    assert f"{sum(s.minutes for s in steps) / 60:.1f} h on 2 idle CPU cores" in shown
    for step in steps:
        assert step.name in shown and step.what in shown
    assert len({s.name for s in steps}) == len(steps)


def test_unknown_steps_and_missing_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--only: no step nope"):
        reproduce.main(["--only", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="sst2-two-models needs sst2-chain-4, gemma-sst2-19000 done first"):
        reproduce.main(["--quick", "--only", "sst2-two-models", "--out", str(tmp_path)])


def test_a_failing_command_stops_the_run_and_leaves_the_step_unfinished(tmp_path):
    step = reproduce_plan.Step(
        "broken", "a command that fails", 1.0, (("-c", "import sys; sys.exit(3)"),), measure=lambda out: {}
    )
    ctx = reproduce.Context(tmp_path, tmp_path, {}, quick=False)
    with pytest.raises(SystemExit, match="step broken: .* exited with 3"):
        reproduce.run_step(step, ctx)
    assert not (tmp_path / "broken" / "done.json").exists()


def test_cut_is_seeded_and_leaves_out_seen_rows_and_duplicates(tmp_path):
    rows = [(f"sentence {i % 30}", str(i % 2)) for i in range(40)]  # 10 texts appear twice
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    seen = tmp_path / "seen.tsv"
    seen.write_text("sentence\tlabel\nsentence 0\t0\nsentence 1\t1\n")

    def cut(name, **kw):
        n = reproduce_plan.cut_unseen(
            data, tmp_path / name, seen_adapters=[], seen_files=[str(seen)], seed=3, val=4, **kw
        )
        read = []
        for f in ("val_new.tsv", "train_new.tsv"):
            with open(tmp_path / name / f, newline="") as rows:
                read.append(list(csv.reader(rows, delimiter="\t"))[1:])
        return n, read

    (n_val, n_train), (val, train) = cut("a", train=None, dedupe=True)
    texts = [s for s, _ in val + train]
    assert (n_val, n_train) == (4, 24) and len(set(texts)) == 28 and not {"sentence 0", "sentence 1"} & set(texts)
    assert cut("b", train=None, dedupe=True)[1] == [val, train]  # seeded: the same cut again
    assert cut("c", train=5, dedupe=False)[0] == (4, 5)
    assert cut("d", train=None, dedupe=False)[0] == (4, 36 - 4)  # without dedupe, repeated texts stay


def test_the_cross_model_ensemble_averages_members_and_drops_rows_they_trained_on(quick_run, tmp_path):
    import softprompt
    from softprompt.data import load_rows
    from softprompt.training import label_probabilities

    out, _, _ = quick_run
    done = json.loads((out / "sst2-two-models" / "ensemble.json").read_text())
    assert done["splits"]["validation"]["dropped_as_trained_on"] == 0
    model_dir = str(out / "quick_model")
    a = str(out / "sst2-chain-4" / "out" / "default")
    b = str(out / "gemma-sst2-19000" / "sst2" / "pt20-lr0p1")
    trained_on = load_rows(out / "sst2-chain-4" / "train_new.tsv")
    dev = load_rows(out / "quick_data" / "sst2" / "dev.tsv")
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in trained_on[:5] + dev))
    result = cross_model.run([(model_dir, a), (model_dir, b)], {"test": str(mixed)}, log=lambda *_: None)
    test = result["splits"]["test"]
    assert test["dropped_as_trained_on"] == 5 and test["rows"] == len(dev)

    model = softprompt.load(model_dir)
    model.load_adapter(a, name="a")
    model.load_adapter(b, name="b")
    texts = [reproduce_plan.SST2_TEMPLATE.format(sentence=r["sentence"]) for r in dev]
    labels = [" negative", " positive"]
    both = label_probabilities(model, texts, labels, ["a", "b"])  # one base model: predict's own average
    gold = [labels[int(r["label"])] for r in dev]
    right = sum(labels[p.index(max(p))] == y for p, y in zip(both, gold))
    assert test["ensemble"]["accuracy"] == pytest.approx(right / len(dev))


def test_members_with_other_labels_are_refused(quick_run):
    import softprompt

    out, _, _ = quick_run
    model_dir = str(out / "quick_model")
    sst2 = str(out / "sst2-chain-4" / "out" / "default")
    phrasebank = str(out / "fpb-prefix-e1" / "financial_phrasebank" / "prefix20-lr0p01")
    members = cross_model.ensemble_members([(model_dir, sst2), (model_dir, phrasebank)])
    with pytest.raises(softprompt.ConfigError, match="ensemble member 1 .* differ from member 0"):
        softprompt.ensemble_probabilities(members, [])
    with pytest.raises(SystemExit, match="--member: expected MODEL=ADAPTER_DIR"):
        cross_model.main(["--member", "smollm2-135m=", "--test", "x.tsv", "--out", "y.json"])
    with pytest.raises(SystemExit, match="give template and verbalizer"):
        cross_model.ensemble_members([("smollm2-135m", None)], {"template": "{text}"})
