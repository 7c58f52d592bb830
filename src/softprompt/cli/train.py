"""`softprompt train` and `softprompt eval`: thin shells over `train.train` / `evaluate.cross_validate`
and `evaluate.evaluate_data`. Training options come from `TrainConfig` (one source of help text)."""

from __future__ import annotations

import argparse
import json


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from softprompt.training.config import TrainConfig

    parser.usage = "softprompt train [CONFIG.yaml] [--KEY VALUE ...]"
    lines = [f"  {o.flag:<28} {o.help}" for o in TrainConfig.options()]
    parser.epilog = (parser.epilog or "") + "\noptions from the config (--KEY VALUE overrides the file):\n" + "\n".join(lines)


def cmd_train(args, extra: list[str]) -> int:
    from softprompt.training.config import load_config

    path = extra[0] if extra and not extra[0].startswith("-") else None
    config = load_config(path, overrides=extra[1:] if path else extra)
    from softprompt.training.distributed import current

    main = current().is_main  # under accelerate launch / torchrun only the main process prints
    if config.kfold:
        from softprompt.training.cross_validate import cross_validate

        report = cross_validate(config)
        if main:
            print(report.format())
        return 0
    from softprompt.training.loop import train

    result = train(config)
    for name, adapter in result.adapters.items():
        if main:
            print(f"{name}: best {adapter.best} -> {adapter.path}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Base model: built-in name, local directory or hub id.")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH", help="Adapter (repeatable).")
    parser.add_argument("--data", required=True, help="Held-out data file (CSV, TSV, JSONL, parquet, phrasebank).")
    parser.add_argument("--template", help="Prompt template with {column} fields (default: as trained).")
    parser.add_argument("--text-column", help="Text column (default: as trained).")
    parser.add_argument("--label-column", help="Label column (default: as trained).")
    parser.add_argument("--method", default="score", choices=["score", "generate", "perplexity"],
                        help="Label scoring (default), generation exact match, or perplexity.")
    parser.add_argument("--format", dest="data_format", help="Data format when the extension does not tell: "
                        "csv, tsv, jsonl, parquet, phrasebank or hf.")
    parser.add_argument("--encoding", help="Text encoding of the data file (default UTF-8).")
    parser.add_argument("--split", default="test", help="Split of a hub data set (default: test).")
    parser.add_argument("--batch-size", type=int, default=16, help="Rows per batch.")
    parser.add_argument("--plot", metavar="PNG", help="Also draw each adapter's confusion matrix to this PNG "
                        "(NAME is inserted before the extension when several adapters are evaluated).")
    parser.add_argument("--json", action="store_true", help="Print JSON.")


def cmd_eval(args, extra: list[str]) -> int:
    from softprompt import load
    from softprompt.cli.app import parse_adapter_specs
    from softprompt.errors import SoftPromptError
    from softprompt.training.evaluate import evaluate_data

    if extra:
        raise SoftPromptError(f"unrecognised arguments: {' '.join(extra)}")
    if args.plot and args.method == "perplexity":
        raise SoftPromptError("--plot: a confusion matrix needs labelled data evaluated with --method score "
                              "or generate, not perplexity")
    adapters = parse_adapter_specs(args.adapter)
    if not adapters:
        raise SoftPromptError("--adapter: give at least one adapter to evaluate")
    model = load(args.model)
    reports = {}
    for name, path in adapters.items():
        model.load_adapter(path, name=name)
        reports[name] = evaluate_data(model, name, args.data, adapter_dir=path, template=args.template,
                                      text_column=args.text_column, label_column=args.label_column,
                                      method=args.method, batch_size=args.batch_size,
                                      data_format=args.data_format, encoding=args.encoding, split=args.split)
        if args.plot:
            _plot_confusion(reports[name], args.plot, name if len(adapters) > 1 else None)
    if args.json:
        print(json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=2, default=str))
    else:
        for name, report in reports.items():
            print(f"== {name}\n{report.format()}")
    return 0


def _plot_confusion(report, path: str, name: str | None) -> None:
    from pathlib import Path

    from softprompt.errors import SoftPromptError
    from softprompt.training.metrics import plot_confusion_matrix

    if report.metrics.get("confusion_matrix") is None:
        raise SoftPromptError("--plot: a confusion matrix needs labelled data evaluated with --method score "
                              "or generate")
    target = Path(path)
    if name:
        target = target.with_name(f"{target.stem}-{name}{target.suffix or '.png'}")
    plot_confusion_matrix(report.metrics, target)
