"""An ensemble of classification adapters trained on DIFFERENT base models: label probabilities averaged.

    .venv/bin/python -m research.cross_model \\
        --member smollm2-135m=runs/reproduce/sst2-chain-4/out/default \\
        --member gemma3-270m=runs/reproduce/gemma-sst2-19000/sst2/pt20-lr0p1 \\
        --validation runs/reproduce/sst2-chain-4/val_new.tsv --test ../shared/data/sst2/dev.tsv \\
        --out runs/reproduce/sst2-two-models/ensemble.json

``softprompt predict --adapter a --adapter b`` averages adapters of ONE base model; this averages members
that each need their own base model, loaded one after the other (so only one is in memory at a time);
a member may be a base model alone (zero-shot). Weights are equal and fixed before anything is scored.
Every member renders the data the same way: each adapter's training metadata is read and checked to
agree, or ``--template``/``--label-column``/``--verbalizer`` set it for all of them.
Rows any member trained on (its training fingerprints) are dropped from every split and counted, so a
figure is never scored on training text.

``softprompt sweep`` ensembles the top settings of ONE base model (chosen by nested cross-validation or on
validation); members on different base models, each loaded in turn, stay here.

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
    label_probabilities,
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


def shared_settings(adapters: list[str], given: dict | None = None) -> dict:
    """The template, columns and verbalizer every member was trained with (they must agree); settings
    ``given`` (the command line's) replace what the adapters say, for every member alike."""
    keys = ("template", "text_column", "label_column", "verbalizer")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if not adapters:
        if set(given) >= {"template", "label_column", "verbalizer"}:
            return given
        raise SystemExit(
            "research.cross_model: no member has an adapter to read the template from; "
            "give --template, --label-column and --verbalizer"
        )
    settings = [{**{k: adapter_settings(a).get(k) for k in keys}, **given} for a in adapters]
    for adapter, s in zip(adapters, settings):
        if not s["template"] or not s["verbalizer"]:
            raise SystemExit(
                f"research.cross_model: {adapter}: no template/verbalizer in its training state "
                "(was it trained by softprompt on a classification task?)"
            )
        if s != settings[0]:
            raise SystemExit(
                f"research.cross_model: {adapter}: renders the data differently from {adapters[0]} "
                f"({s} vs {settings[0]}); the ensemble needs one template and verbalizer"
            )
    return settings[0]


def run(
    members: list[tuple[str, str | None]],
    splits: dict[str, str],
    *,
    given: dict | None = None,
    batch_size: int = 16,
    log=print,
) -> dict:
    """Score every split with every member (one base model at a time), then average the probabilities."""
    settings = shared_settings([a for _, a in members if a], given)
    render = Template(settings["template"]).render
    verbalizer = {str(k): v for k, v in settings["verbalizer"].items()}
    labels = list(verbalizer.values())
    seen = set().union(*(read_train_fingerprints(a) for _, a in members if a))
    data = {}
    for split, path in splits.items():
        rows = load_rows(path)
        kept = [r for r in rows if fingerprint(render(r)) not in seen]
        data[split] = {
            "path": str(path),
            "rows": len(kept),
            "dropped_as_trained_on": len(rows) - len(kept),
            "texts": [render(r) for r in kept],
            "gold": [verbalizer[str(r[settings["label_column"]])] for r in kept],
        }
    probs: dict[str, dict[str, list[list[float]]]] = {split: {} for split in splits}
    for i, (model_name, adapter) in enumerate(members):
        started = time.perf_counter()
        model = softprompt.load(model_name)
        if adapter:
            model.load_adapter(adapter, name="member")
        for split, d in data.items():
            probs[split][f"{i}"] = label_probabilities(
                model, d["texts"], labels, ["member" if adapter else None], batch_size=batch_size, progress=True
            )
        log(f"research.cross_model: member {i} ({model_name}) scored in {time.perf_counter() - started:.0f} s")
        del model
    result = {
        "members": [{"model": m, "adapter": a} for m, a in members],
        "labels": labels,
        "weights": "equal",
        "splits": {},
    }
    for split, d in data.items():

        def predict(p: list[float]) -> str:
            return labels[max(range(len(labels)), key=p.__getitem__)]

        member_preds = [[predict(p) for p in probs[split][f"{i}"]] for i in range(len(members))]
        mean = [
            [sum(probs[split][f"{i}"][row][j] for i in range(len(members))) / len(members) for j in range(len(labels))]
            for row in range(d["rows"])
        ]
        ensemble = classification_report(d["gold"], [predict(p) for p in mean], labels)
        gold = d["gold"]
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
