"""An ensemble of classification adapters trained on DIFFERENT base models: label probabilities averaged.

    .venv/bin/python -m research.cross_model \\
        --member smollm2-135m=runs/reproduce/sst2-chain-4/out/default \\
        --member gemma3-270m=runs/reproduce/gemma-sst2-19000/sst2/pt20-lr0p1 \\
        --validation runs/reproduce/sst2-chain-4/val_new.tsv --test ../shared/data/sst2/dev.tsv \\
        --out runs/reproduce/sst2-two-models/ensemble.json

``softprompt predict --adapter a --adapter b`` averages adapters of ONE base model; this averages members
that each need their own base model, loaded one after the other (so only one is in memory at a time);
a member may be a base model alone (zero-shot). Weights are equal and fixed before anything is scored.
The scoring is the library's (`softprompt.ensemble_probabilities`, which ``softprompt sweep`` also uses for its
cross-model ensembles): each member renders the rows with the template and label words of its adapter's
training metadata (``--template``/``--verbalizer`` set them for every member), and all members must share the
raw labels. Rows any member trained on (its training fingerprints, under its own template) are dropped from
every split and counted, so a figure is never scored on training text.

Writes one JSON: per split, each member's and the ensemble's accuracy and macro-F1, how many rows the
members disagree on and how many all of them get wrong (the cap on any vote of these members).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python research/cross_model.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import softprompt
from research import harness
from research.paths import own_output
from softprompt.data import Template, load_rows
from softprompt.fileio import atomic_write_json
from softprompt.training import (
    adapter_settings,
    classification_report,
    fingerprint,
    parse_verbalizer,
    read_train_fingerprints,
)


def _member(spec: str) -> tuple[str, str | None]:
    model, sep, adapter = spec.partition("=")
    if not model or (sep and not adapter):
        raise SystemExit(
            f"research.cross_model: --member: expected MODEL=ADAPTER_DIR (or MODEL alone: the zero-shot "
            f"base model), got {spec!r}"
        )
    return model, adapter or None


def ensemble_members(members: list[tuple[str, str | None]], given: dict | None = None) -> list:
    """The members as resolved `softprompt.EnsembleMember` (template and label words read from each adapter);
    ``given`` (the command line's template and verbalizer) replace them for every member alike."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    verbalizer = {str(k): v for k, v in given["verbalizer"].items()} if "verbalizer" in given else None
    try:
        return [
            softprompt.EnsembleMember(m, a, template=given.get("template"), verbalizer=verbalizer).resolved()
            for m, a in members
        ]
    except softprompt.SoftPromptError as exc:
        raise SystemExit(f"research.cross_model: {exc}") from None


def label_column(members: list[tuple[str, str | None]], given: str | None) -> str:
    """The column of the gold labels: given, or the one every adapter was trained on."""
    if given:
        return given
    columns = {adapter_settings(a).get("label_column") for _, a in members if a}
    if len(columns) != 1 or None in columns:
        raise SystemExit(
            f"research.cross_model: the members' adapters record label columns {sorted(map(str, columns))}; "
            "give --label-column"
        )
    return columns.pop()


def run(
    members: list[tuple[str, str | None]],
    splits: dict[str, str],
    *,
    given: dict | None = None,
    batch_size: int = 16,
    log=print,
) -> dict:
    """Score every split with every member (one base model at a time), then average the probabilities."""
    given = given or {}
    resolved = ensemble_members(members, given)
    column = label_column(members, given.get("label_column"))
    trained_on = [
        (Template(m.template or "").render, read_train_fingerprints(a)) for m, (_, a) in zip(resolved, members) if a
    ]
    data, rows = {}, []
    for split, path in splits.items():
        loaded = load_rows(path)
        kept = [r for r in loaded if not any(fingerprint(render(r)) in seen for render, seen in trained_on)]
        data[split] = {"path": str(path), "rows": len(kept), "dropped_as_trained_on": len(loaded) - len(kept)}
        data[split]["gold"] = [str(r[column]) for r in kept]
        rows += kept
    # every split in one call: each base model loads once
    try:
        scored = softprompt.ensemble_probabilities(
            resolved, rows, batch_size=batch_size, progress=True, log=lambda line: log(f"research.cross_model: {line}")
        )
    except softprompt.SoftPromptError as exc:
        raise SystemExit(f"research.cross_model: {exc}") from None
    labels = scored.labels
    result = {
        "members": [
            {"model": m, "adapter": a, "template": r.template, "verbalizer": r.verbalizer}
            for (m, a), r in zip(members, resolved)
        ],
        "labels": labels,
        "weights": "equal",
        "splits": {},
    }
    start = 0
    for split, d in data.items():
        span = slice(start, start + d["rows"])
        start += d["rows"]
        gold = d["gold"]
        if unknown := set(gold) - set(labels):
            raise SystemExit(f"research.cross_model: {d['path']}: labels {sorted(unknown)} are none of {labels}")
        member_preds = [scored.predictions(p[span]) for p in scored.member_probs]
        ensemble = classification_report(gold, scored.predictions(scored.probs[span]), labels)
        result["splits"][split] = {
            "path": d["path"],
            "rows": d["rows"],
            "dropped_as_trained_on": d["dropped_as_trained_on"],
            "members": [
                {k: classification_report(gold, preds, labels)[k] for k in ("accuracy", "macro_f1")}
                for preds in member_preds
            ],
            "ensemble": {"accuracy": ensemble["accuracy"], "macro_f1": ensemble["macro_f1"]},
            "disagree": sum(len({preds[row] for preds in member_preds}) > 1 for row in range(d["rows"])),
            "all_wrong": sum(all(preds[row] != gold[row] for preds in member_preds) for row in range(d["rows"])),
        }
        s = result["splits"][split]
        shown = ", ".join(f"{m['accuracy']:.1%}" for m in s["members"])
        log(
            f"research.cross_model: {split}: members {shown}; ensemble {s['ensemble']['accuracy']:.1%} "
            f"(macro-F1 {s['ensemble']['macro_f1']:.3f}) on {s['rows']} rows; disagree {s['disagree']}, "
            f"all wrong {s['all_wrong']}"
        )
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m research.cross_model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="MODEL[=ADAPTER_DIR]",
        help="a base model (built-in name or directory) and an adapter trained on it, or the base "
        "model alone (zero-shot); repeat",
    )
    p.add_argument("--template", help="prompt template for every member (default: as the adapters were trained)")
    p.add_argument("--label-column", help="label column (default: as trained)")
    p.add_argument(
        "--verbalizer", help='label -> label text, e.g. \'{"1": " negative", "2": " positive"}\' (default: as trained)'
    )
    p.add_argument("--validation", help="data file scored to report the ensemble before the test split")
    p.add_argument("--test", required=True, help="held-out data file")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    own_output(args.out, "--out", "research.cross_model")
    harness.quiet()
    torch.set_num_threads(args.threads)
    members = [_member(s) for s in args.member]
    given = {
        "template": args.template,
        "label_column": args.label_column,
        "verbalizer": parse_verbalizer(args.verbalizer) if args.verbalizer else None,
    }
    for path in [args.validation, args.test] + [a for _, a in members if a]:
        if path and not Path(path).exists():
            raise SystemExit(f"research.cross_model: {path}: no such file or directory")
    splits = {"validation": args.validation, "test": args.test} if args.validation else {"test": args.test}
    result = run(members, splits, given=given, batch_size=args.batch_size)
    result["meta"] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": harness.machine(args.threads),
        "command": "python -m research.cross_model " + " ".join(argv or sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    print(f"research.cross_model: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
