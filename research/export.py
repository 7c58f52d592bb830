"""Which adapter ships as a task's ready-made example, and the one explicit step that copies it there.

Research runs never write into the product. Shipping an adapter of a run as an example is a separate
command that the user runs with the destination spelled out:

    .venv/bin/python -m research.export runs/quality/quality.json                  # what would ship (writes nothing)
    .venv/bin/python -m research.export runs/sweep/sst2/sweep.json --into examples/adapters   # ship it

Several harnesses can offer an adapter for the same task: ``research.quality`` (each task's best system
of its run), ``research.sweep`` (the adapter chosen on validation) and recipes run by hand. The rule that
keeps them from overwriting each other: an adapter is exported only if it beats, on the task's fixed
held-out evaluation (``EVALUATIONS``), every example of that task already shipped, on any base model.
``examples/adapters/scores.json`` records each shipped example's score on that evaluation, and
``tests/adapters/test_example_adapters.py`` checks it against the folders and their README table.

The folder is ``<task>/`` for the default base (smollm2-135m) and ``<task>-<model>/`` for another, so an
adapter is never copied over one of another base model's shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python research/export.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.models import TINY
from research.paths import EXAMPLES
from softprompt.fileio import atomic_directory, atomic_write_json
from softprompt.models.names import hub_id_for

SCORES_FILE = "scores.json"
DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class Evaluation:
    metric: str  # the key of the score in scores.json and in the harness's result
    label: str  # how the README table writes it
    on: str  # what it is measured on; the same for every harness, so scores compare


EVALUATIONS = {
    "financial_phrasebank": Evaluation(
        "accuracy", "accuracy", "the 226 test rows of the seeded (42) stratified 90/10 split of Sentences_AllAgree"
    ),
    "sst2": Evaluation("accuracy", "accuracy", "sst2/dev.tsv (872 rows)"),
    "raft_twitter_complaints": Evaluation(
        "macro_f1", "macro-F1", "10-fold cross-validation (seed 42) over the 50 labelled tweets, pooled"
    ),
}


@dataclass(frozen=True)
class Candidate:
    """An adapter a run offers as its task's example, with its score on the task's evaluation."""

    task: str
    model: str
    path: str
    score: float


def folder_name(task: str, model: str) -> str:
    return task if model == DEFAULT_BASE else f"{task}-{model}"


def shipped_scores(examples: Path = EXAMPLES) -> dict[str, dict]:
    """``{folder: {"task", "base_model", "metric", "value"}}`` of the shipped examples."""
    path = examples / SCORES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def best_shipped(task: str, examples: Path = EXAMPLES) -> tuple[str, float] | None:
    """The shipped example of ``task`` with the highest score, as ``(folder, score)``."""
    metric = EVALUATIONS[task].metric
    ranked = [
        (entry["value"], folder)
        for folder, entry in shipped_scores(examples).items()
        if entry["task"] == task and entry["metric"] == metric
    ]
    return (max(ranked)[1], max(ranked)[0]) if ranked else None


def export_if_better(
    path: str | Path, task: str, model: str, score: float, examples: Path = EXAMPLES, dry_run: bool = False
) -> str:
    """Ship the adapter at ``path`` as ``task``'s example if ``score`` (on ``EVALUATIONS[task]``) beats every
    shipped example of the task; returns what was done (with ``dry_run``: what would be), in a line for the log."""
    if task not in EVALUATIONS:
        return f"{task}: not exported (no fixed evaluation to compare examples on)"
    evaluation = EVALUATIONS[task]
    score = round(score, 4)  # as scores.json keeps it, so an adapter never "beats" its own recorded score
    best = best_shipped(task, examples)
    if best is not None and best[1] >= score:
        return (
            f"{task}: kept examples/adapters/{best[0]}/ ({evaluation.label} {best[1]:.4g} on {evaluation.on}); "
            f"this adapter scored {score:.4g}"
        )
    folder = folder_name(task, model)
    was = f"examples/adapters/{best[0]}/ at {best[1]:.4g}" if best else "no example"
    if dry_run:
        return (
            f"{task}: would export {path} to {examples / folder} ({evaluation.label} {score:.4g}, was {was}); "
            f"run again with --into {examples} to ship it"
        )
    target = copy_adapter(path, examples / folder, model)
    scores = shipped_scores(examples)
    scores[folder] = {"task": task, "base_model": model, "metric": evaluation.metric, "value": score}
    atomic_write_json(examples / SCORES_FILE, scores)
    return (
        f"{task}: exported to {target} ({evaluation.label} {score:.4g}, was {was}); "
        f"give it a row in {examples / 'README.md'}"
    )


def copy_adapter(path: str | Path, target: Path, model: str) -> Path:
    """Copy one trained adapter to ``target`` as a whole (``fileio.atomic_directory``), naming its base by
    built-in name and hub id."""
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


# ----------------------------------------------------------------------------- what a run offers
def candidates(result: dict) -> list[Candidate]:
    """Each task's best softprompt adapter of a ``research.quality`` run (its quality.json) or the adapter a
    ``research.sweep`` run chose on validation (its sweep.json), scored on the task's fixed evaluation."""
    model = result["meta"]["model"]
    if "selected" in result:  # a sweep: one task, the adapter chosen on validation, scored on test
        chosen = next(r for r in result["adapters"] if r["name"] == result["selected"])
        return [Candidate(result["task"], model, chosen["path"], chosen["test_accuracy"])]
    offered = []
    for name, task in result["tasks"].items():
        if name not in EVALUATIONS:
            continue  # generation has no example adapters
        if "final_adapter" in task:  # RAFT: the adapter trained on all rows, scored by its cross-validation
            offered.append(
                Candidate(
                    name, model, task["final_adapter"], task["systems"]["softprompt prompt tuning"]["macro_f1_pooled"]
                )
            )
            continue
        ranked = [
            (r["accuracy"], r["path"])
            for k, r in task["systems"].items()
            if k.startswith("softprompt") and r.get("path")
        ]
        if ranked:
            score, path = max(ranked)
            offered.append(Candidate(name, model, path, score))
    return offered


def export_examples(result: dict, examples: Path = EXAMPLES, dry_run: bool = False) -> list[str]:
    """Offer each adapter of a run (``candidates``) under ``export_if_better``'s rule; one log line each."""
    lines = []
    for c in candidates(result):
        if not Path(c.path).is_dir():  # numbers read back from research/results/ may outlive their runs/ folder
            lines.append(f"{c.task}: not exported ({c.path} is gone)")
            continue
        lines.append(export_if_better(c.path, c.task, c.model, c.score, examples, dry_run=dry_run))
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m research.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("result", help="a run's quality.json (research.quality) or sweep.json (research.sweep)")
    p.add_argument(
        "--into",
        default=None,
        help="the examples folder to ship into (examples/adapters); without it nothing is written and "
        "the command says what it would ship, compared with the examples in examples/adapters",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    source = Path(args.result)
    if not source.is_file():
        raise SystemExit(f"research.export: {source}: no such file")
    result = json.loads(source.read_text())
    meta = result.get("meta", {})
    if meta.get("budget") == "quick" or meta.get("model") == TINY:
        raise SystemExit(f"research.export: {source} is a quick (harness-check) run; its adapters are not examples")
    examples = Path(args.into) if args.into else EXAMPLES
    for line in export_examples(result, examples, dry_run=args.into is None):
        print("research.export: " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
