"""The plan of ``research.reproduce``: its steps, what each reproduces, and how each measures its figures.

Each ``Step`` holds the command lines the docs quote (``research.quality``, ``research.sweep``, ``softprompt
train --init-from`` and ``--kfold``, ``softprompt eval`` and ``predict``, ``research.cross_model``), the minutes
it took when the documented numbers were measured, the documented figures and a function that reads the
same figures back from what the step wrote. ``cut_unseen`` recovers the SST-2 chain's data cuts.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from research.paths import REPO, RESULTS
from softprompt.data import Template, load_rows
from softprompt.fileio import atomic_write_text
from softprompt.training import fingerprint, read_train_fingerprints

SST2_TEMPLATE = "Review: {sentence}\nSentiment:"
SST2_VERBALIZER = '{"0": " negative", "1": " positive"}'


@dataclass(frozen=True)
class Step:
    name: str
    what: str  # the part of the docs (results.md, research/NOTES.md) it reproduces
    minutes: float  # measured when the documented numbers were made (2 idle cores)
    commands: tuple[tuple[str, ...], ...]  # argv after the Python interpreter; <out>, <data>, <smollm2>... filled in
    measure: Callable[[Path], dict[str, float]]  # the step's output dir -> figure -> value
    documented: dict[str, float] = field(default_factory=dict)  # figure -> the value the docs report
    needs: tuple[str, ...] = ()  # steps whose outputs it reads
    stdout: str | None = None  # file (in the step dir) that takes the last command's standard output


# ------------------------------------------------------------------------------------------- measuring
def sweep_figures(task: str) -> Callable[[Path], dict[str, float]]:
    def measure(out: Path) -> dict[str, float]:
        result = json.loads((out / task / "sweep.json").read_text())
        figures = {f"{r['name']} test accuracy": r["test_accuracy"] for r in result["adapters"]}
        figures["chosen on validation: test accuracy"] = next(
            r["test_accuracy"] for r in result["adapters"] if r["name"] == result["selected"]
        )
        for key, e in result["ensembles"].items():
            figures[f"ensemble {key}: test accuracy"] = e["test_accuracy"]
        return figures

    return measure


def gemma_fpb_figures(out: Path) -> dict[str, float]:
    first = {f"lr 3e-2: {k}": v for k, v in sweep_figures("financial_phrasebank")(out / "lr3e-2").items()}
    return {**first, **sweep_figures("financial_phrasebank")(out)}


def eval_figures(out: Path) -> dict[str, float]:
    metrics = json.loads((out / "dev_eval.json").read_text())["default"]["metrics"]  # `softprompt eval --json`
    return {"dev accuracy": metrics["accuracy"], "dev macro-F1": metrics["macro_f1"]}


def quality_figures(tasks: tuple[str, ...]) -> Callable[[Path], dict[str, float]]:
    def measure(out: Path) -> dict[str, float]:
        return flatten_quality(json.loads((out / "quality.json").read_text()), tasks)

    return measure


def flatten_quality(result: dict, tasks: tuple[str, ...]) -> dict[str, float]:
    """``{task}: {system} {metric}`` -> value, for the metrics the results tables show."""
    figures = {}
    for task in tasks:
        for system, scores in result["tasks"].get(task, {}).get("systems", {}).items():
            if task == "generation":
                for name, value in scores.items():
                    figures[f"{system}, {name}: perplexity"] = value["perplexity"]
                continue
            for metric in ("accuracy", "macro_f1", "macro_f1_pooled"):
                if metric in scores:
                    figures[f"{task}, {system}: {metric}"] = scores[metric]
    return figures


def documented_quality(tasks: tuple[str, ...]) -> dict[str, float]:
    """The numbers behind the quality tables the docs quote (research/results/quality.json)."""
    path = RESULTS / "quality.json"
    return flatten_quality(json.loads(path.read_text()), tasks) if path.exists() else {}


def cross_model_figures(out: Path) -> dict[str, float]:
    result = json.loads((out / "ensemble.json").read_text())
    figures = {}
    for split, s in result["splits"].items():
        figures[f"{split}: ensemble accuracy"] = s["ensemble"]["accuracy"]
        figures[f"{split}: ensemble macro-F1"] = s["ensemble"]["macro_f1"]
        for i, m in enumerate(s["members"]):
            figures[f"{split}: member {i} ({result['members'][i]['model']}) accuracy"] = m["accuracy"]
        figures[f"{split}: rows all members get wrong"] = s["all_wrong"]
    return figures


def raft_transfer_figures(out: Path) -> dict[str, float]:
    def labels_by_id(path: Path) -> dict[str, str]:  # a `softprompt predict` file: ID,Label
        return {r["ID"]: r["Label"] for r in load_rows(path)}

    pooled = json.loads((out / "cv" / "cv_report.json").read_text())["pooled"]  # `softprompt train --kfold`
    predicted = labels_by_id(out / "predictions.csv")
    figures = {
        "10-fold CV pooled macro-F1": pooled["adapter"]["macro_f1"],
        "10-fold CV pooled accuracy": pooled["adapter"]["accuracy"],
        "zero-shot pooled macro-F1": pooled["base"]["macro_f1"],
        "test tweets predicted": len(predicted),
        "test tweets called complaints": sum(label == "1" for label in predicted.values()) / max(len(predicted), 1),
    }
    shipped = REPO / "results" / "raft_twitter_complaints_predictions.csv"
    if shipped.exists():  # the submission file in the repository: did this run predict the same labels?
        kept = labels_by_id(shipped)
        figures["predictions differing from results/"] = sum(kept.get(i) != label for i, label in predicted.items())
    return figures


# ------------------------------------------------------------------------------------------- the plan
RAFT_RECIPE = "recipes/results/raft_twitter_complaints_gemma.yaml"


def raft_transfer(*flags: str) -> tuple[str, ...]:
    """The RAFT recipe on gemma3-270m, started from the SST-2 adapter this plan trained (not the shipped copy).
    --max-length and --batch-size repeat the recipe's values so that --quick can shrink them (QUICK_FLAGS)."""
    return (
        "-m",
        "softprompt.cli",
        "train",
        RAFT_RECIPE,
        "--model",
        "<gemma>",
        "--init-from",
        "<runs>/gemma-sst2-19000/sst2/pt20-lr0p1",
        "--data",
        "<data>/raft_twitter_complaints/train.csv",
        "--max-length",
        "128",
        "--batch-size",
        "8",
        *flags,
    )


def sweep(out_task: str, *flags: str) -> tuple[str, ...]:
    return ("-m", "research.sweep", "--task", out_task, *flags, "--out", "<out>")


def sst2_chain_step(
    n: int,
    start: str,
    seen_adapters: tuple[str, ...],
    seen_files: tuple[str, ...],
    seed: int,
    train: int | None,
    dedupe: bool,
    minutes: float,
    dev: float,
    what: str,
) -> Step:
    """One link of the SST-2 chain: cut rows no earlier run saw, continue the adapter on them, score dev."""
    cut = (
        [
            "-m",
            "research.reproduce",
            "cut",
            "--data",
            "<data>/sst2/train.tsv",
            "--seed",
            str(seed),
            "--val",
            "1000",
            "--out",
            "<out>",
        ]
        + (["--train", str(train)] if train else [])
        + (["--dedupe"] if dedupe else [])
    )
    for a in seen_adapters:
        cut += ["--seen-adapter", a]
    for f in seen_files:
        cut += ["--seen-file", f]
    train_cmd = (
        "-m",
        "softprompt.cli",
        "train",
        "--model",
        "<smollm2>",
        "--method",
        "prefix-tuning",
        "--num-virtual-tokens",
        "20",
        "--init-from",
        start,
        "--data",
        "<out>/train_new.tsv",
        "--validation-data",
        "<out>/val_new.tsv",
        "--label-column",
        "label",
        "--template",
        SST2_TEMPLATE,
        "--verbalizer",
        SST2_VERBALIZER,
        "--max-length",
        "96",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-ratio",
        "0.06",
        "--seed",
        "42",
        "--eval-zero-shot",
        "false",
        "--log-every",
        "25",
        "--output",
        "<out>/out",
    )
    evaluate = (
        "-m",
        "softprompt.cli",
        "eval",
        "--model",
        "<smollm2>",
        "--adapter",
        "<out>/out/default",
        "--data",
        "<data>/sst2/dev.tsv",
        "--json",
    )
    return Step(
        f"sst2-chain-{n}",
        what,
        minutes,
        (tuple(cut), train_cmd, evaluate),
        eval_figures,
        {"dev accuracy": dev},
        needs=tuple(sorted({a.split("/")[1] for a in seen_adapters + (start,)})),
        stdout="dev_eval.json",
    )


def plan() -> list[Step]:
    fpb, sst = "financial_phrasebank", "sst2"
    quality_tasks = ("financial_phrasebank", "sst2", "generation")
    prefix = ("--methods", "prefix_tuning", "--train-limit", "2038", "--ensemble", "2", "--threads", "2")
    chain1 = "<runs>/sst2-prefix-20k/sst2/prefix20-lr0p01"
    chain = [f"<runs>/sst2-chain-{n}/out/default" for n in (2, 3, 4)]
    return [
        Step(
            "quality",
            "the financial_phrasebank, SST-2 and generation tables (standard budget: 600 rows, 1 epoch; "
            "PEFT beside softprompt)",
            150.0,
            (
                (
                    "-m",
                    "research.quality",
                    "--tasks",
                    ",".join(quality_tasks),
                    "--threads",
                    "1",
                    "--out",
                    "<out>",
                    "--doc",
                    "<out>/quality.md",
                ),
            ),
            quality_figures(quality_tasks),
            documented_quality(quality_tasks),
        ),
        Step(
            "quality-raft",
            "the RAFT table (10-fold CV, 10 epochs per fold) and its test-tweet predictions",
            20.0,
            (
                (
                    "-m",
                    "research.quality",
                    "--tasks",
                    "raft_twitter_complaints",
                    "--cv-epochs",
                    "10",
                    "--out",
                    "<out>",
                    "--doc",
                    "<out>/quality.md",
                ),
            ),
            quality_figures(("raft_twitter_complaints",)),
            documented_quality(("raft_twitter_complaints",)),
        ),
        Step(
            "fpb-prompt-500",
            "financial_phrasebank prompt-tuning grid, 450 rows, 2 epochs",
            39.5,
            (sweep(fpb, "--lrs", "3e-2,1e-1", "--tokens", "8,20", "--train-limit", "500", "--threads", "1"),),
            sweep_figures(fpb),
            {"chosen on validation: test accuracy": 0.894, "ensemble all: test accuracy": 0.916},
        ),
        Step(
            "fpb-prompt-full",
            "financial_phrasebank prompt-tuning grid, all 1,834 rows, 1 epoch",
            64.7,
            (
                sweep(
                    fpb,
                    "--lrs",
                    "3e-2,1e-1",
                    "--tokens",
                    "8,20",
                    "--train-limit",
                    "2038",
                    "--epochs",
                    "1",
                    "--threads",
                    "2",
                ),
            ),
            sweep_figures(fpb),
            {"chosen on validation: test accuracy": 0.942},
        ),
        *[
            Step(
                f"fpb-prefix-e{e}",
                f"financial_phrasebank prefix tuning, all rows, {e} epoch(s)",
                minutes,
                (sweep(fpb, *prefix, "--lrs", lrs, "--tokens", tokens, "--epochs", str(e)),),
                sweep_figures(fpb),
                {"chosen on validation: test accuracy": acc},
            )
            for e, lrs, tokens, minutes, acc in (
                (1, "1e-2,3e-2", "20", 10.0, 0.960),
                (2, "1e-2,3e-2", "20", 26.4, 0.965),
                (3, "5e-3,1e-2", "20", 32.6, 0.973),
                (4, "1e-2", "20,40", 59.8, 0.978),
            )
        ],
        Step(
            "sst2-4000",
            "SST-2 prompt and prefix tuning in one job, 3,600 rows",
            28.5,
            (
                sweep(
                    sst,
                    "--methods",
                    "prompt_tuning,prefix_tuning",
                    "--lrs",
                    "3e-2",
                    "--tokens",
                    "20",
                    "--train-limit",
                    "4000",
                    "--epochs",
                    "1",
                    "--ensemble",
                    "2",
                    "--threads",
                    "2",
                ),
            ),
            sweep_figures(sst),
            {"pt20-lr0p03 test accuracy": 0.885, "prefix20-lr0p03 test accuracy": 0.882},
        ),
        Step(
            "sst2-prefix-20k",
            "SST-2 prefix tuning, 19,000 rows (the chain's first link)",
            39.0,
            (
                sweep(
                    sst,
                    "--methods",
                    "prefix_tuning",
                    "--lrs",
                    "1e-2",
                    "--tokens",
                    "20",
                    "--train-limit",
                    "20000",
                    "--val-fraction",
                    "0.05",
                    "--epochs",
                    "1",
                    "--ensemble",
                    "1",
                    "--threads",
                    "2",
                ),
            ),
            sweep_figures(sst),
            {"chosen on validation: test accuracy": 0.898},
        ),
        # The chain's data cuts are the ones its runs used (recovered from their files): which rows were
        # already seen, the shuffle seed, and whether duplicate texts were dropped.
        sst2_chain_step(
            2,
            chain1,
            (chain1,),
            (),
            7,
            19000,
            False,
            40.0,
            0.903,
            "SST-2 chain, 2nd link: 19,000 unseen rows, --init-from, lr 3e-3",
        ),
        sst2_chain_step(
            3,
            chain[0],
            (chain1, chain[0]),
            ("<runs>/sst2-chain-2/val_new.tsv",),
            11,
            14000,
            False,
            29.0,
            0.907,
            "SST-2 chain, 3rd link: 14,000 more rows",
        ),
        sst2_chain_step(
            4,
            chain[1],
            (chain1, chain[0], chain[1]),
            ("<runs>/sst2-chain-2/val_new.tsv", "<runs>/sst2-chain-3/val_new.tsv"),
            11,
            None,
            True,
            26.0,
            0.908,
            "SST-2 chain, 4th link: the last 12,058 distinct texts",
        ),
        Step(
            "gemma-fpb",
            "gemma3-270m on financial_phrasebank at smollm2's lr, then its own lr sweep",
            8.5,
            (
                sweep(
                    fpb,
                    "--model",
                    "<gemma>",
                    "--lrs",
                    "3e-2",
                    "--tokens",
                    "8",
                    "--train-limit",
                    "600",
                    "--epochs",
                    "1",
                    "--ensemble",
                    "1",
                )
                + ("--out", "<out>/lr3e-2"),
                sweep(
                    fpb,
                    "--model",
                    "<gemma>",
                    "--lrs",
                    "1e-1,3e-1",
                    "--tokens",
                    "8",
                    "--train-limit",
                    "600",
                    "--epochs",
                    "1",
                    "--ensemble",
                    "1",
                ),
            ),
            gemma_fpb_figures,
            {
                "lr 3e-2: pt8-lr0p03 test accuracy": 0.686,
                "chosen on validation: test accuracy": 0.867,
                "pt8-lr0p3 test accuracy": 0.814,
                "ensemble all: test accuracy": 0.845,
            },
        ),
        Step(
            "gemma-sst2-3600",
            "gemma3-270m SST-2 prompt tuning, 3,600 rows",
            9.3,
            (
                sweep(
                    sst,
                    "--model",
                    "<gemma>",
                    "--methods",
                    "prompt_tuning",
                    "--lrs",
                    "1e-1",
                    "--tokens",
                    "20",
                    "--train-limit",
                    "4000",
                    "--epochs",
                    "1",
                    "--ensemble",
                    "1",
                    "--threads",
                    "2",
                ),
            ),
            sweep_figures(sst),
            {"chosen on validation: test accuracy": 0.890},
        ),
        Step(
            "gemma-sst2-19000",
            "gemma3-270m SST-2 prompt tuning, 19,000 rows (the best single adapter)",
            44.9,
            (
                sweep(
                    sst,
                    "--model",
                    "<gemma>",
                    "--methods",
                    "prompt_tuning",
                    "--lrs",
                    "1e-1",
                    "--tokens",
                    "20",
                    "--train-limit",
                    "20000",
                    "--val-fraction",
                    "0.05",
                    "--epochs",
                    "1",
                    "--ensemble",
                    "1",
                    "--threads",
                    "2",
                ),
            ),
            sweep_figures(sst),
            {"chosen on validation: test accuracy": 0.912},
        ),
        Step(
            "sst2-two-models",
            "the SST-2 ensemble of smollm2's chain and gemma's adapter (equal weights)",
            8.0,
            (
                (
                    "-m",
                    "research.cross_model",
                    "--member",
                    f"<smollm2>={chain[2]}",
                    "--member",
                    "<gemma>=<runs>/gemma-sst2-19000/sst2/pt20-lr0p1",
                    "--validation",
                    "<runs>/sst2-chain-4/val_new.tsv",
                    "--test",
                    "<data>/sst2/dev.tsv",
                    "--out",
                    "<out>/ensemble.json",
                ),
            ),
            cross_model_figures,
            {
                "test: ensemble accuracy": 0.917,
                "validation: ensemble accuracy": 0.926,
                "test: rows all members get wrong": 47,
            },
            needs=("sst2-chain-4", "gemma-sst2-19000"),
        ),
        Step(
            "raft-two-models",
            "RAFT: smollm2 zero-shot averaged with gemma's SST-2 adapter (no RAFT training)",
            3.0,
            (
                (
                    "-m",
                    "research.cross_model",
                    "--member",
                    "<smollm2>",
                    "--member",
                    "<gemma>=<runs>/gemma-sst2-19000/sst2/pt20-lr0p1",
                    "--template",
                    "Tweet: {Tweet text}\nSentiment:",
                    "--label-column",
                    "Label",
                    "--verbalizer",
                    '{"1": " negative", "2": " positive"}',
                    "--test",
                    "<data>/raft_twitter_complaints/train.csv",
                    "--out",
                    "<out>/ensemble.json",
                ),
            ),
            cross_model_figures,
            {"test: ensemble macro-F1": 0.836, "test: ensemble accuracy": 0.84},
            needs=("gemma-sst2-19000",),
        ),
        Step(
            "raft-gemma-transfer",
            "RAFT: gemma3-270m prompt tuning from its SST-2 adapter (10-fold CV), then the "
            "adapter on all 50 tweets and the submission file",
            21.0,
            (
                raft_transfer("--kfold", "10", "--output", "<out>/cv"),
                raft_transfer("--output", "<out>/final"),
                (
                    "-m",
                    "softprompt.cli",
                    "predict",
                    "--model",
                    "<gemma>",
                    "--adapter",
                    "<out>/final/default",
                    "--data",
                    "<data>/raft_twitter_complaints/test_unlabeled.csv",
                    "--id-column",
                    "ID",
                    "--batch-size",
                    "16",
                    "--output",
                    "<out>/predictions.csv",
                ),
            ),
            raft_transfer_figures,
            {
                "10-fold CV pooled macro-F1": 0.866,
                "10-fold CV pooled accuracy": 0.88,
                "zero-shot pooled macro-F1": 0.608,
                "test tweets predicted": 3399,
                "predictions differing from results/": 0,
            },
            needs=("gemma-sst2-19000",),
        ),
    ]


# -------------------------------------------------------------------------------------- the data cuts
def cut_unseen(
    data: Path,
    out: Path,
    *,
    seen_adapters: list[str],
    seen_files: list[str],
    seed: int,
    val: int,
    train: int | None,
    dedupe: bool,
) -> tuple[int, int]:
    """Rows of ``data`` whose rendered text no listed adapter trained on and no listed file holds, shuffled
    (seeded); the first ``val`` to ``val_new.tsv``, the next ``train`` (else the rest) to ``train_new.tsv``."""
    render = Template(SST2_TEMPLATE).render
    seen: set[int] = set()
    for adapter in seen_adapters:
        seen |= read_train_fingerprints(adapter)
    for path in seen_files:
        seen |= {fingerprint(render(r)) for r in load_rows(path)}
    fresh, kept = [], set()
    for row in load_rows(data):
        key = fingerprint(render(row))
        if key in seen or (dedupe and key in kept):
            continue
        kept.add(key)
        fresh.append(row)
    random.Random(seed).shuffle(fresh)
    parts = {"val_new.tsv": fresh[:val], "train_new.tsv": fresh[val : val + train if train else None]}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in parts.items():  # written as the documented runs wrote theirs (byte for byte)
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer,
            ["sentence", "label"],
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
            escapechar="\\",
            lineterminator="\r\n",
        )
        writer.writeheader()
        writer.writerows({"sentence": r["sentence"], "label": r["label"]} for r in rows)
        atomic_write_text(out / name, buffer.getvalue())
    return len(parts["val_new.tsv"]), len(parts["train_new.tsv"])
