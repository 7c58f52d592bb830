"""research/export.py: an adapter becomes a task's shipped example only if it beats every example of the task
already shipped, on the task's fixed evaluation; the copy names its base and never lands half-written; and it
is the one research command that writes into examples/, only when given --into."""

import json
from pathlib import Path

import pytest

from research import export
from research.export import (
    EVALUATIONS,
    SCORES_FILE,
    Candidate,
    candidates,
    export_if_better,
    folder_name,
    shipped_scores,
)
from research.paths import REPO, own_output


def trained_adapter(where: Path, tag: str) -> Path:
    """The files copy_adapter rewrites (the weights are opaque to it), plus a checkpoint it must leave out."""
    where.mkdir(parents=True)
    (where / "softprompt.json").write_text(json.dumps({"base_model": "/cache/some/path", "tag": tag}))
    (where / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/cache/some/path", "peft_type": "PROMPT_TUNING"})
    )
    (where / "adapter_model.safetensors").write_bytes(tag.encode())
    (where / "checkpoints" / "last").mkdir(parents=True)
    (where / "checkpoints" / "last" / "optimizer.safetensors").write_bytes(b"x")
    return where


@pytest.fixture
def examples(tmp_path):
    root = tmp_path / "examples"
    root.mkdir()
    return root


def test_first_adapter_of_a_task_is_exported_with_its_base_named(examples, tmp_path):
    source = trained_adapter(tmp_path / "run" / "pt", "first")
    message = export_if_better(source, "sst2", "smollm2-135m", 0.9, examples)
    target = examples / "sst2"
    assert "exported" in message and str(target) in message
    assert json.loads((target / "softprompt.json").read_text())["base_model"] == "smollm2-135m"
    peft = json.loads((target / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (target / "checkpoints").exists() and (target / "adapter_model.safetensors").read_bytes() == b"first"
    assert shipped_scores(examples) == {
        "sst2": {"task": "sst2", "base_model": "smollm2-135m", "metric": "accuracy", "value": 0.9}
    }
    assert sorted(p.name for p in examples.iterdir()) == sorted(["sst2", SCORES_FILE])  # no staging folder left


def test_a_worse_or_equal_adapter_keeps_the_shipped_example(examples, tmp_path):
    export_if_better(trained_adapter(tmp_path / "a", "shipped"), "sst2", "gemma3-270m", 0.91, examples)
    before = shipped_scores(examples)
    for score in (0.91, 0.80):
        message = export_if_better(
            trained_adapter(tmp_path / f"b{score}", "worse"), "sst2", "smollm2-135m", score, examples
        )
        assert message.startswith("sst2: kept examples/adapters/sst2-gemma3-270m/")
    # a smollm2 adapter that does not beat the gemma example is not shipped beside it either
    assert not (examples / "sst2").exists() and shipped_scores(examples) == before
    assert (examples / "sst2-gemma3-270m" / "adapter_model.safetensors").read_bytes() == b"shipped"


def test_a_better_adapter_replaces_its_own_base_example_and_leaves_other_tasks(examples, tmp_path):
    export_if_better(trained_adapter(tmp_path / "a", "old"), "sst2", "smollm2-135m", 0.85, examples)
    export_if_better(trained_adapter(tmp_path / "f", "fin"), "financial_phrasebank", "smollm2-135m", 0.97, examples)
    message = export_if_better(trained_adapter(tmp_path / "b", "new"), "sst2", "smollm2-135m", 0.88, examples)
    assert "was examples/adapters/sst2/ at 0.85" in message
    assert (examples / "sst2" / "adapter_model.safetensors").read_bytes() == b"new"
    scores = shipped_scores(examples)
    assert scores["sst2"]["value"] == 0.88 and scores["financial_phrasebank"]["value"] == 0.97
    # a better gemma adapter goes to its own folder: the smollm2 one (another shape) stays
    export_if_better(trained_adapter(tmp_path / "g", "gemma"), "sst2", "gemma3-270m", 0.9, examples)
    assert (examples / "sst2" / "adapter_model.safetensors").read_bytes() == b"new"
    assert (examples / "sst2-gemma3-270m" / "adapter_model.safetensors").read_bytes() == b"gemma"


def test_an_adapter_does_not_beat_its_own_recorded_score(examples, tmp_path):
    export_if_better(trained_adapter(tmp_path / "a", "first"), "sst2", "smollm2-135m", 7 / 12, examples)
    assert shipped_scores(examples)["sst2"]["value"] == 0.5833
    message = export_if_better(trained_adapter(tmp_path / "b", "again"), "sst2", "smollm2-135m", 7 / 12, examples)
    assert message.startswith("sst2: kept examples/adapters/sst2/")
    assert (examples / "sst2" / "adapter_model.safetensors").read_bytes() == b"first"


def test_a_task_without_a_fixed_evaluation_is_not_exported(examples, tmp_path):
    message = export_if_better(trained_adapter(tmp_path / "a", "x"), "chatgpt_prompts", "smollm2-135m", 1.0, examples)
    assert "not exported" in message and list(examples.iterdir()) == []


def test_every_evaluation_names_a_metric_the_harnesses_report():
    assert {e.metric for e in EVALUATIONS.values()} <= {"accuracy", "macro_f1"}
    assert folder_name("sst2", "smollm2-135m") == "sst2" and folder_name("sst2", "gemma3-270m") == "sst2-gemma3-270m"


def test_a_dry_run_says_what_would_ship_and_writes_nothing(examples, tmp_path):
    message = export_if_better(
        trained_adapter(tmp_path / "a", "x"), "sst2", "smollm2-135m", 0.9, examples, dry_run=True
    )
    assert message.startswith("sst2: would export") and f"--into {examples}" in message
    assert list(examples.iterdir()) == []


def test_a_sweep_offers_the_adapter_chosen_on_validation_and_ships_it_only_into_the_folder_named(examples, tmp_path):
    chosen, other = trained_adapter(tmp_path / "pt8", "chosen"), trained_adapter(tmp_path / "pt20", "other")
    sweep = {
        "task": "sst2",
        "selected": "pt8",
        "meta": {"model": "gemma3-270m"},
        "adapters": [
            {"name": "pt8", "path": str(chosen), "test_accuracy": 0.8},  # chosen on validation,
            {"name": "pt20", "path": str(other), "test_accuracy": 0.9},
        ],
    }  # not the best on test
    assert candidates(sweep) == [Candidate("sst2", "gemma3-270m", str(chosen), 0.8)]
    result = tmp_path / "sweep.json"
    result.write_text(json.dumps(sweep))
    assert export.main([str(result), "--into", str(examples)]) == 0
    assert (examples / "sst2-gemma3-270m" / "adapter_model.safetensors").read_bytes() == b"chosen"
    gone = {**sweep, "adapters": [{"name": "pt8", "path": str(tmp_path / "deleted"), "test_accuracy": 0.95}]}
    assert export.export_examples(gone, examples) == [f"sst2: not exported ({tmp_path / 'deleted'} is gone)"]
    with pytest.raises(SystemExit, match="no such file"):
        export.main([str(tmp_path / "missing.json")])


def test_research_outputs_stay_out_of_the_product(tmp_path):
    assert own_output(tmp_path / "runs", "--out", "research.x") == tmp_path / "runs"
    assert own_output("runs/quality", "--out", "research.x") == Path("runs/quality")
    for inside in ("docs", "docs/results.md", "examples/adapters", "src/softprompt", "results"):
        with pytest.raises(
            SystemExit, match=f"research.x: --doc: .*{inside.split('/')[0]}/, which belongs to the product"
        ):
            own_output(REPO / inside, "--doc", "research.x")
