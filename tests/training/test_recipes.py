"""Every shipped recipe parses and validates; every offline and results recipe trains a step on a tiny model.

``recipes/`` holds the reference uses (hub models and data), ``recipes/offline/`` their twins on the built-in
smollm2-135m, ``recipes/results/`` the settings behind docs/results.md's best figures. The offline and
results recipes read ../shared/data (relative to the repository root). Where that directory is
absent (a bare CI checkout), each data file is replaced by a small stand-in with the same columns and
format, so the recipe's template, columns and verbalizer are still exercised.
"""

import json
from pathlib import Path

import pytest
import yaml

from softprompt.data import Template
from softprompt.training.config import load_config
from softprompt.training.loop import train
from softprompt.training.sweep_space import load_sweep

from tiny import tiny_model

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))  # sweep files (`softprompt sweep`), not recipes
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p not in SWEEPS)
HUB = sorted((REPO / "recipes").glob("*.yaml"))
OFFLINE = sorted((REPO / "recipes" / "offline").glob("*.yaml"))
RESULTS = sorted((REPO / "recipes" / "results").glob("*.yaml"))
SHARED_SETTINGS = (
    "method",
    "num_virtual_tokens",
    "init",
    "init_text",
    "lr",
    "epochs",
    "batch_size",
    "val_fraction",
    "label_column",
    "verbalizer",
    "seed",
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_four_reference_uses_are_shipped_online_and_offline():
    assert len(HUB) >= 4
    assert [p.name for p in OFFLINE] == [p.name for p in HUB]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_parses_into_settings_of_a_runs_output(path):
    sweep = load_sweep(path)
    assert len(sweep.settings) >= 2 and sweep.base.output.startswith("runs/")
    assert sweep.options.outer_folds >= 2 and sweep.options.inner_folds >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses_and_validates(path):
    config = load_config(path)
    adapters = config.resolved_adapters()
    assert adapters and config.model and config.output.startswith("runs/")
    for spec in adapters:
        assert spec.data
    if path.parent.name in ("offline", "results"):
        assert config.model in ("smollm2-135m", "gemma3-270m")  # built-in: runs here without the hub
        assert all(not spec.data.startswith("hf:") for spec in adapters)
        if path.parent.name == "offline":
            assert config.model == "smollm2-135m"
    else:
        assert all(spec.data.startswith("hf:") for spec in adapters)
        assert config.model != "smollm2-135m"


@pytest.mark.parametrize("name", [p.name for p in HUB])
def test_offline_twin_keeps_the_reference_settings(name):
    online = yaml.safe_load((REPO / "recipes" / name).read_text())
    offline = yaml.safe_load((REPO / "recipes" / "offline" / name).read_text())
    for key in SHARED_SETTINGS:
        if key == "verbalizer" and online.get("data_format") != offline.get("data_format"):
            continue  # the hub copy stores class ids where the local file has the label names
        assert online.get(key) == offline.get(key), key
    assert [a["name"] for a in online.get("adapters", [])] == [a["name"] for a in offline.get("adapters", [])]


def _stand_in(path: Path, columns: list[str], label_column: str | None, labels: list[str], tmp: Path) -> Path:
    """A small data file shaped like ``path`` (its format and columns), for a checkout without the data."""
    out = tmp / path.name
    rows = [
        {c: (labels[i % len(labels)] if c == label_column else f"sample {c} text number {i}") for c in columns}
        for i in range(40)
    ]
    if path.suffix == ".txt":  # financial_phrasebank: sentence@label
        out.write_text("".join(f"{r['sentence']}@{r['label']}\n" for r in rows))
    elif path.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    return out


def test_results_recipes_start_from_a_shipped_adapter_of_their_base_model():
    assert RESULTS
    for path in RESULTS:
        config = load_config(path)
        if config.init_from is None:
            continue
        saved = json.loads((REPO / config.init_from / "softprompt.json").read_text())
        assert saved["base_model"] == config.model, path.name
        assert saved["config"]["method"] == config.method, path.name
        (spec,) = config.resolved_adapters()
        assert saved["config"]["num_virtual_tokens"] == spec.method_options["num_virtual_tokens"], path.name


@pytest.mark.parametrize("path", OFFLINE + RESULTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_offline_recipe_trains_one_step_on_a_tiny_model(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes' data paths are relative to the repository root
    raw = yaml.safe_load(path.read_text())
    overrides = {
        "output": str(tmp_path / "out"),
        "max_steps": 1,
        "batch_size": 4,
        "eval_zero_shot": False,
        "max_length": 64,
    }
    if raw.pop("init_from", None):  # a real model's adapter does not fit the tiny model (checked above instead)
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump(raw))
    config = load_config(path, overrides)
    specs = config.resolved_adapters()
    if not all(Path(spec.data).exists() for spec in specs):
        labels = [str(k) for k in raw.get("verbalizer") or {}] or ["negative", "neutral", "positive"]
        moved = []
        for spec, entry in zip(specs, raw.get("adapters") or [raw]):
            columns = sorted(set(Template(spec.template).fields) | ({spec.label_column} - {None}))
            if Path(spec.data).suffix == ".txt":
                columns = ["sentence", "label"]
            moved.append(
                {**entry, "data": str(_stand_in(Path(spec.data), columns, spec.label_column, labels, tmp_path))}
            )
        overrides.update({"adapters": moved} if raw.get("adapters") else {"data": moved[0]["data"]})
        config = load_config(path, overrides)
    result = train(config, model=tiny_model("llama"), progress=False)
    assert set(result.adapters) == {spec.name for spec in specs}
    for name, adapter in result.adapters.items():
        assert (tmp_path / "out" / name / "adapter_model.safetensors").exists()
        assert adapter.best["n"] > 0
        assert ("accuracy" in adapter.best) == (specs[0].label_column is not None)
