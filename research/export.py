"""Which adapter ships as a task's ready-made example, and copying it to examples/adapters/.

Several harnesses can offer an adapter for the same task: ``research.quality`` (its table's best system),
``research.sweep`` (the adapter chosen on validation) and recipes run by hand. The rule that keeps them
from overwriting each other: an adapter is exported only if it beats, on the task's fixed held-out
evaluation (``EVALUATIONS``), every example of that task already shipped, on any base model.
``examples/adapters/scores.json`` records each shipped example's score on that evaluation, and
``tests/test_example_adapters.py`` checks it against the folders and their README table.

The folder is ``<task>/`` for the default base (smollm2-135m) and ``<task>-<model>/`` for another, so an
adapter is never copied over one of another base model's shape.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from softprompt.fileio import atomic_directory, atomic_write_json

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"
SCORES_FILE = "scores.json"
DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class Evaluation:
    metric: str  # the key of the score in scores.json and in the harness's result
    label: str  # how the README table writes it
    on: str  # what it is measured on; the same for every harness, so scores compare


EVALUATIONS = {
    "financial_phrasebank": Evaluation("accuracy", "accuracy",
                                       "the 226 test rows of the seeded (42) stratified 90/10 split of Sentences_AllAgree"),
    "sst2": Evaluation("accuracy", "accuracy", "sst2/dev.tsv (872 rows)"),
    "raft_twitter_complaints": Evaluation("macro_f1", "macro-F1",
                                          "10-fold cross-validation (seed 42) over the 50 labelled tweets, pooled"),
}


def folder_name(task: str, model: str) -> str:
    return task if model == DEFAULT_BASE else f"{task}-{model}"


def shipped_scores(examples: Path = EXAMPLES) -> dict[str, dict]:
    """``{folder: {"task", "base_model", "metric", "value"}}`` of the shipped examples."""
    path = examples / SCORES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def best_shipped(task: str, examples: Path = EXAMPLES) -> tuple[str, float] | None:
    """The shipped example of ``task`` with the highest score, as ``(folder, score)``."""
    metric = EVALUATIONS[task].metric
    ranked = [(entry["value"], folder) for folder, entry in shipped_scores(examples).items()
              if entry["task"] == task and entry["metric"] == metric]
    return (max(ranked)[1], max(ranked)[0]) if ranked else None


def export_if_better(path: str | Path, task: str, model: str, score: float, examples: Path = EXAMPLES) -> str:
    """Ship the adapter at ``path`` as ``task``'s example if ``score`` (on ``EVALUATIONS[task]``) beats every
    shipped example of the task; returns what was done, in a line for the log."""
    if task not in EVALUATIONS:
        return f"{task}: not exported (no fixed evaluation to compare examples on)"
    evaluation = EVALUATIONS[task]
    score = round(score, 4)  # as scores.json keeps it, so an adapter never "beats" its own recorded score
    best = best_shipped(task, examples)
    if best is not None and best[1] >= score:
        return (f"{task}: kept examples/adapters/{best[0]}/ ({evaluation.label} {best[1]:.4g} on {evaluation.on}); "
                f"this adapter scored {score:.4g}")
    folder = folder_name(task, model)
    target = copy_adapter(path, examples / folder, model)
    scores = shipped_scores(examples)
    scores[folder] = {"task": task, "base_model": model, "metric": evaluation.metric, "value": score}
    atomic_write_json(examples / SCORES_FILE, scores)
    was = f"examples/adapters/{best[0]}/ at {best[1]:.4g}" if best else "no example"
    return (f"{task}: exported to {target} ({evaluation.label} {score:.4g}, was {was}); "
            f"give it a row in {examples / 'README.md'}")


def copy_adapter(path: str | Path, target: Path, model: str) -> Path:
    """Copy one trained adapter to ``target`` as a whole (``fileio.atomic_directory``), naming its base by
    built-in name and hub id."""
    from softprompt.models.names import hub_id_for

    with atomic_directory(target) as staging:
        # training_state.* stays: it records the template, verbalizer and training rows, which
        # `softprompt eval` / `predict` use; checkpoints (optimizer state) do not.
        shutil.copytree(path, staging, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
        meta_path = staging / "softprompt.json"
        meta = json.loads(meta_path.read_text())
        meta["base_model"] = model  # the built-in name, not this machine's cache path
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        peft_path = staging / "adapter_config.json"
        peft_config = json.loads(peft_path.read_text())
        for key in ("base_model_name_or_path", "tokenizer_name_or_path"):
            if peft_config.get(key):
                peft_config[key] = hub_id_for(model)
        peft_path.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 would follow the folder
    return target
