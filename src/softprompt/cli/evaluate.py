"""``softprompt eval``: adapters (and the zero-shot base model) scored on held-out data.

Its options are the fields of `EvalOptions` (help text beside each), turned into flags by
`softprompt.options.add_arguments`, as every subcommand's are.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from softprompt import load
from softprompt.cli.common import (
    adapter_option,
    decode_option,
    dtype_option,
    model_option,
    parse_adapter_specs,
    quantize_option,
)
from softprompt.errors import SoftPromptError
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option
from softprompt.training.evaluate import EVAL_METHODS, evaluate_data
from softprompt.training.metrics import plot_confusion_matrix

NAME = "eval"
HELP = "Evaluate adapters (and the zero-shot base model) on held-out data."
TAKES_EXTRA = True  # to answer unknown words with the command's own one-line error
EXAMPLES = """
    examples:
      softprompt eval --model smollm2-135m --adapter runs/sentiment/default --data dev.csv \\
          --text-column text --label-column label --template "Tweet: {text} Sentiment: "
      softprompt eval --model smollm2-135m --adapter a=runs/a --adapter b=runs/b --data dev.csv ... --json
      softprompt eval --model smollm2-135m --adapter runs/sentiment/default --data dev.txt --format tsv \\
          --plot confusion.png
    """


@dataclass
class EvalOptions:
    """The options of ``softprompt eval``."""

    model: str | None = model_option()
    dtype: str | None = dtype_option()
    quantize: str | None = quantize_option()
    decode: str | None = decode_option()
    adapter: list[str] = adapter_option("Adapter (repeatable).")
    data: str | None = option(None, "Held-out data file (CSV, TSV, JSONL, parquet, phrasebank).", required=True)
    template: str | None = option(None, "Prompt template with {column} fields (default: as trained).")
    text_column: str | None = option(None, "Text column (default: as trained).")
    label_column: str | None = option(None, "Label column (default: as trained).")
    task_column: str | None = option(None, "Each row's task, for a multitask adapter (default: as trained).")
    method: str = option(
        "score", "Label scoring (default), generation exact match, or perplexity.", choices=EVAL_METHODS
    )
    data_format: str | None = option(
        None,
        "Data format when the extension does not tell: csv, tsv, jsonl, parquet, phrasebank or hf.",
        flag="--format",
    )
    encoding: str | None = option(None, "Text encoding of the data file (default UTF-8).")
    split: str = option("test", "Split of a hub data set (default: test).")
    batch_size: int = option(16, "Rows per batch (default 16).")
    max_rows: int | None = option(
        None,
        "Evaluate a seeded sample of at most N rows, every label keeping its share (before training rows are "
        "dropped; default: all rows).",
    )
    plot: str | None = option(
        None,
        "Also draw each adapter's confusion matrix to this PNG (NAME is inserted "
        "before the extension when several adapters are evaluated).",
        metavar="PNG",
    )
    json: bool = option(False, "Print JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, EvalOptions)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SoftPromptError(f"unrecognised arguments: {' '.join(extra)}")
    if args.plot and args.method == "perplexity":
        raise SoftPromptError(
            "--plot: a confusion matrix needs labelled data evaluated with --method score or generate, not perplexity"
        )
    adapters = parse_adapter_specs(args.adapter)
    if not adapters:
        raise SoftPromptError("--adapter: give at least one adapter to evaluate")
    model = load(args.model, dtype=args.dtype, quantize=args.quantize, decode=args.decode)
    reports = {}
    for name, path in adapters.items():
        model.load_adapter(path, name=name)
        reports[name] = evaluate_data(
            model,
            name,
            args.data,
            adapter_dir=path,
            template=args.template,
            text_column=args.text_column,
            label_column=args.label_column,
            task_column=args.task_column,
            method=args.method,
            batch_size=args.batch_size,
            data_format=args.data_format,
            encoding=args.encoding,
            split=args.split,
            max_rows=args.max_rows,
        )
        if args.plot:
            written = _plot_confusion(reports[name], args.plot, name if len(adapters) > 1 else None)
            # stderr under --json, so stdout stays one JSON document
            print(f"{name}: confusion matrix -> {written}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=2, default=str))
    else:
        for name, report in reports.items():
            print(f"== {name}\n{report.format()}")
    return 0


def _plot_confusion(report, path: str, name: str | None) -> Path:
    if report.metrics.get("confusion_matrix") is None:
        raise SoftPromptError(
            "--plot: a confusion matrix needs labelled data evaluated with --method score or generate"
        )
    target = Path(path)
    if name:
        target = target.with_name(f"{target.stem}-{name}{target.suffix or '.png'}")
    plot_confusion_matrix(report.metrics, target)
    return target
