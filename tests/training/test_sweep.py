"""softprompt sweep on the toy task and a tiny model: sampling, nested CV, resume, bad entries, outputs."""

import csv
import json

import pytest
import yaml

from softprompt.cli import main
from softprompt.data import load_rows, train_val_split
from softprompt.errors import ConfigError
from softprompt.training import sweep_run as sweep_module
from softprompt.training.config import load_config
from softprompt.training.loop import train
from softprompt.training.metrics import classification_report
from softprompt.training.sweep_report import argmax
from softprompt.training.sweep_run import sweep
from softprompt.training.sweep_space import job_config, parse_sweep, recipe_values

from tiny import tiny_model
from toy_data import toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = {"lr": [1.0, 1e-3], "num_virtual_tokens": [2, 3]}


def recipe(tmp, **extra) -> dict:
    return {
        "data": write_csv(tmp / "toy.csv", toy_rows(24)),
        "label_column": "label",
        "method": "prompt_tuning",
        "init": "random",
        "epochs": 2,
        "batch_size": 8,
        "val_fraction": 0,
        "lr_schedule": "constant",
        "output": str(tmp / "out"),
        "space": SPACE,
        "sweep": {"outer_folds": 3, "inner_folds": 2, "ensemble": 2, "bootstrap": 50},
        **extra,
    }


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    unlabelled = write_csv(tmp / "new.csv", [{"ID": f"n{i}", "text": r["text"]} for i, r in enumerate(toy_rows(5, 9))])
    test = write_csv(tmp / "test.csv", toy_rows(10, 4))
    spec = parse_sweep(recipe(tmp, sweep={**recipe(tmp)["sweep"], "test_data": test}))
    model = tiny_model("bloom")
    result = sweep(spec, model=model, predict=unlabelled, id_column="ID", progress=False)
    return tmp, spec, model, result


def test_grid_and_seeded_random_sampling(tmp_path):
    grid = parse_sweep(recipe(tmp_path)).settings
    assert len(grid) == 4 and {s["lr"] for s in grid} == {1.0, 1e-3}
    drawn = parse_sweep(recipe(tmp_path, sweep={"samples": 3, "seed": 1})).settings
    assert len(drawn) == 3 and all(s in grid for s in drawn)
    assert drawn == parse_sweep(recipe(tmp_path, sweep={"samples": 3, "seed": 1})).settings
    bundles = parse_sweep(
        recipe(tmp_path, space={"prompt": [{"template": "{text} =", "lr": 0.5}, {"template": "{text}:"}]})
    )
    assert bundles.settings == [{"template": "{text} =", "lr": 0.5}, {"template": "{text}:"}]


def test_every_bad_space_entry_is_listed(tmp_path):
    space = {"lrr": [1], "lr": [0.1, -1], "num_virtual_tokens": [0], "epochs": "3", "template": ["{nope"]}
    with pytest.raises(ConfigError) as err:
        parse_sweep(recipe(tmp_path, space=space), source="s.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 5, lines
    assert "s.yaml: space.lrr: not an option a sweep can vary (did you mean 'lr'?)" in lines[0]
    assert lines[1].startswith("s.yaml: space.lr[1]") and "above 0" in lines[1]
    assert lines[2].startswith("s.yaml: space.num_virtual_tokens[0]")
    assert lines[3].startswith("s.yaml: space.epochs: expected a non-empty list")
    assert lines[4].startswith("s.yaml: space.template[0]")


def test_inner_folds_choose_and_outer_folds_estimate(nested):
    tmp, spec, _, result = nested
    out, report = result.output, result.report
    assert len(report["outer_folds"]) == 3
    outer_rows = []
    for fold in report["outer_folds"]:
        o = fold["fold"]
        inner = {
            i: [json.loads((out / "results" / f"o{o}i{j}-s{i}.json").read_text()) for j in (1, 2)]
            for i in range(len(spec.settings))
        }
        labels = ["A", "B"]
        scores = {
            f"s{i}": classification_report(
                [t for r in rs for t in r["truth"]], argmax([p for r in rs for p in r["probs"]], labels), labels
            )["macro_f1"]
            for i, rs in inner.items()
        }
        singles = {k: v for k, v in fold["inner_scores"].items() if k.startswith("s")}
        assert singles == pytest.approx(scores)  # the choice was made from the inner results alone
        assert fold["inner_scores"][fold["chosen"]] == max(fold["inner_scores"].values())
        test = json.loads((out / "results" / f"o{o}test-s{fold['members'][0]}.json").read_text())
        seen_inner = {row for rs in inner.values() for r in rs for row in r["rows"]}
        assert not seen_inner & set(test["rows"])  # the outer fold's rows never informed its choice
        outer_rows += test["rows"]
    assert sorted(outer_rows) == list(range(24))  # every labelled row estimated exactly once
    estimate = report["estimate"]
    assert estimate["pooled"]["n"] == 24
    lo, hi = estimate["pooled_interval"]
    assert lo <= estimate["pooled"]["macro_f1"] <= hi
    assert report["final"]["chosen"] in {row["candidate"] for row in report["leaderboard"]}
    assert estimate["test"]["n"] == 10  # the test file, scored once by the final choice
    assert "test (10 rows, scored once, for the final choice)" in result.format()


def test_outputs_recipe_adapter_and_predictions(nested, tmp_path):
    tmp, _, _, result = nested
    out = result.output
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.png", "sweep_report.json", "chosen.yaml"):
        assert (out / name).stat().st_size > 0
    for path in result.adapters.values():
        assert (path / "adapter_model.safetensors").exists()
    with open(result.predictions) as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == [f"n{i}" for i in range(5)] and {r["Label"] for r in rows} <= {"A", "B"}
    values = yaml.safe_load((out / "chosen.yaml").read_text())
    values.update(output=str(tmp_path / "retrain"), epochs=1)
    (tmp_path / "chosen.yaml").write_text(yaml.safe_dump(values))
    config = load_config(tmp_path / "chosen.yaml")  # what `softprompt train chosen.yaml` reads
    trained = train(config, model=tiny_model("bloom"), progress=False)
    assert set(trained.adapters) == set(result.adapters)


def test_a_rerun_skips_what_is_done(nested, monkeypatch):
    tmp, spec, model, result = nested
    trained = []

    def counting(config, model, jobs, **kwargs):
        trained.extend(job.name for job in jobs)
        return real(config, model, jobs, **kwargs)

    real = sweep_module.train_jobs
    monkeypatch.setattr(sweep_module, "train_jobs", counting)
    (result.output / "results" / "o2i1-s3.json").unlink()
    again = sweep(spec, model=model, progress=False)
    assert trained == ["o2i1-s3"]
    assert again.report["estimate"] == result.report["estimate"]
    other = parse_sweep(recipe(tmp, space={"lr": [0.5]}))
    with pytest.raises(ConfigError, match="holds results of another sweep"):
        sweep(other, model=model, progress=False)


def test_selection_on_validation_scores_test_once(tmp_path):
    values = recipe(
        tmp_path,
        validation_data=write_csv(tmp_path / "val.csv", toy_rows(8, 3)),
        space={"lr": [1.0, 1e-3]},
        sweep={"test_data": write_csv(tmp_path / "test.csv", toy_rows(10, 4)), "bootstrap": 20},
    )
    result = sweep(parse_sweep(values), model=tiny_model("bloom"), progress=False)
    report = result.report
    assert report["estimate"]["test"]["n"] == 10
    assert [r["candidate"] for r in report["leaderboard"]][0] == report["final"]["chosen"]
    assert sorted(p.name for p in (result.output / "results").glob("*.json")) == [
        "space.json",
        "val-s0.json",
        "val-s1.json",
    ]


def test_cli_help_and_a_bad_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "nested cross-validation" in capsys.readouterr().out
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, space={"lr": ["fast"]})))
    assert main(["sweep", str(path)]) == 2
    assert "space.lr[0]" in capsys.readouterr().err


def test_selection_on_a_val_fraction_split(tmp_path):
    values = recipe(tmp_path, val_fraction=0.25, space={"num_virtual_tokens": [2]}, sweep={"selection": "validation"})
    result = sweep(parse_sweep(values), model=tiny_model("bloom"), progress=False)
    scored = json.loads((result.output / "results" / "val-s0.json").read_text())
    assert len(scored["truth"]) == 6  # the 25% of 24 rows held out of training choose
    assert result.report["estimate"] is None and result.report["final"]["chosen"] == "s0"
    with pytest.raises(ConfigError, match="space.seed"):
        parse_sweep({**values, "space": {"seed": [1, 2]}})


def test_test_fraction_is_held_out_before_anything_else(tmp_path, monkeypatch):
    """One labelled file (financial_phrasebank's case): the test rows are cut first, max_rows samples the
    rest, the choice is made on a val_fraction split of that, and the test rows are scored once."""
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(toy_rows(24))]
    values = recipe(
        tmp_path,
        data=write_csv(tmp_path / "all.csv", rows),
        text_column="text",
        template="{text}",
        max_rows=12,
        val_fraction=0.25,
        space={"lr": [1.0, 1e-3]},
        sweep={"selection": "validation", "test_fraction": 0.25, "seed": 3, "bootstrap": 20},
    )
    seen = []

    def recording(config, model, jobs, **kwargs):
        seen.extend(e.row["id"] for job in jobs for e in (*job.train, *job.val))
        return real(config, model, jobs, **kwargs)

    real = sweep_module.train_jobs
    monkeypatch.setattr(sweep_module, "train_jobs", recording)
    result = sweep(parse_sweep(values), model=tiny_model("bloom"), progress=False)
    test = {r["id"] for r in train_val_split(load_rows(values["data"]), 0.25, 3, "label")[1]}
    assert result.report["estimate"]["test"]["n"] == len(test) == 6
    assert len(set(seen)) == 12 and not set(seen) & test  # max_rows of the 18 left; no test row trained or chose
    assert len(json.loads((result.output / "results" / "val-s0.json").read_text())["truth"]) == 3
    with pytest.raises(ConfigError, match="sweep.test_fraction"):
        parse_sweep({**values, "sweep": {"test_fraction": 1.5}})
    with pytest.raises(ConfigError, match="not both"):
        parse_sweep({**values, "sweep": {"test_fraction": 0.2, "test_data": values["data"]}})


def test_a_null_choice_overrides_the_recipe(tmp_path):
    """An adapter's None inherits the job's value: a setting's null must still mean null (init_from: null in a
    space whose recipe starts from an adapter), in a job of its own and beside a setting that keeps it."""
    start = str(tmp_path / "start")
    values = recipe(tmp_path, init_from=start, space={"start": [{"init_from": None}, {"lr": 0.5}]})
    values.pop("init")
    spec = parse_sweep(values)
    alone = [job_config(spec.base, [("a", s)]).resolved_adapters()[0].init_from for s in spec.settings]
    together = [
        a.init_from
        for a in job_config(spec.base, [("a", spec.settings[0]), ("b", spec.settings[1])]).resolved_adapters()
    ]
    assert alone == together == [None, start]


def test_compare_gives_each_method_its_own_nested_estimate_and_cpt_drops_prompt_options(tmp_path):
    space = {
        "methods": [
            {"method": "prompt_tuning", "lr": 1.0},
            {"method": "prompt_tuning", "lr": 1e-3},
            {"method": "cpt", "cpt_examples": 2},
        ]
    }
    values = recipe(tmp_path, init="text", init_text="a or b", space=space)
    values["data"] = write_csv(tmp_path / "toy.csv", toy_rows(12))
    values["sweep"] = {"outer_folds": 2, "inner_folds": 2, "bootstrap": 20, "compare": "method"}
    spec = parse_sweep(values)  # the recipe's init_text means nothing to CPT: its setting drops it
    chosen = recipe_values(spec, [spec.settings[2]], str(tmp_path / "chosen"))
    assert chosen["method"] == "cpt" and "init_text" not in chosen and "init" not in chosen
    assert load_config(None, chosen).method_options["cpt_examples"] == 2
    report = sweep(spec, model=tiny_model("llama"), progress=False).report
    compared = {v["value"]: v for v in report["compared"]["values"]}
    assert report["compared"]["key"] == "method" and set(compared) == {"prompt_tuning", "cpt"}
    for value, own in (("prompt_tuning", {"s0", "s1"}), ("cpt", {"s2"})):
        estimate = compared[value]["estimate"]
        assert estimate["pooled"]["n"] == 12 and len(compared[value]["outer_folds"]) == 2
        for fold, overall in zip(compared[value]["outer_folds"], report["outer_folds"]):
            assert set(fold["inner_scores"]) == own  # chosen among its own settings, on the inner folds
            assert fold["inner_scores"] == {k: overall["inner_scores"][k] for k in own}
            assert fold["chosen"] == max(own, key=lambda k: (fold["inner_scores"][k], -int(k[1:])))
            if fold["chosen"] == overall["chosen"]:  # the same choice scored once on the same outer rows
                assert fold["test"] == overall["test"]
    with pytest.raises(ConfigError, match="sweep.compare: 'template' is not varied by the space"):
        parse_sweep({**values, "space": SPACE, "sweep": {"compare": "template"}})
    with pytest.raises(ConfigError, match="sweep.compare: 'methd' is not an option a sweep can vary"):
        parse_sweep({**values, "sweep": {"compare": "methd"}})
