"""``softprompt predict``: one predicted label per row of unlabelled data, from an adapter or an ensemble."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

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
from softprompt.training.config import parse_verbalizer
from softprompt.training.predict import predict_file

NAME = "predict"
HELP = "Predict labels for unlabelled data with an adapter or an ensemble of adapters."
EXAMPLES = """
    Writes one predicted label per row of unlabelled data (label scoring). Several --adapter
    options make an ensemble: their label probabilities are averaged.

    examples:
      softprompt predict --model smollm2-135m --adapter runs/raft/default \\
          --data ../shared/data/raft_twitter_complaints/test_unlabeled.csv --id-column ID \\
          --output results/raft_twitter_complaints_predictions.csv
      softprompt predict --model smollm2-135m --adapter a=runs/a --adapter b=runs/b \\
          --data new.csv --output preds.csv --probabilities
      softprompt predict --model smollm2-135m --template $'Tweet: {Tweet text}\\nSentiment:' \\
          --verbalizer '{1: " negative", 2: " positive"}' --data test.csv --output zero_shot.csv
          (no --adapter: the zero-shot base model, with the template and label texts given)
    """


@dataclass
class PredictOptions:
    """The options of ``softprompt predict``."""

    model: str | None = model_option()
    dtype: str | None = dtype_option()
    quantize: str | None = quantize_option()
    decode: str | None = decode_option()
    adapter: list[str] = adapter_option(
        "Adapter (repeatable: several are an ensemble; none: the zero-shot base model)."
    )
    data: str | None = option(None, "Data file (CSV, TSV, JSONL, parquet, phrasebank).", required=True)
    output: str | None = option(None, "CSV file to write (written atomically).", required=True)
    verbalizer: str | None = option(
        None,
        "Raw label -> label text, as '1=complaint,2=no complaint' or a YAML "
        "mapping (keeps leading spaces); default: as trained.",
        metavar="RAW=TEXT,...",
    )
    id_column: str | None = option(None, "Column copied to the output to identify rows (default: row numbers).")
    label_name: str = option("Label", "Header of the predicted-label column (default Label).")
    template: str | None = option(None, "Prompt template with {column} fields (default: as trained).")
    probabilities: bool = option(False, "Also write p_<label> columns.")
    data_format: str | None = option(None, "Data format when the extension does not tell.", flag="--format")
    encoding: str | None = option(None, "Text encoding of the data file (default UTF-8).")
    batch_size: int = option(16, "Rows per batch (default 16).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, PredictOptions)


def run(args: argparse.Namespace) -> int:
    adapters = parse_adapter_specs(args.adapter)
    verbalizer = parse_verbalizer(args.verbalizer) if args.verbalizer is not None else None
    if args.batch_size < 1:
        raise SoftPromptError(f"--batch-size: expected an integer of at least 1, got {args.batch_size}")
    model = load(args.model, dtype=args.dtype, quantize=args.quantize, decode=args.decode)
    path = predict_file(
        model,
        adapters,
        args.data,
        args.output,
        id_column=args.id_column,
        label_name=args.label_name,
        template=args.template,
        verbalizer=verbalizer,
        probabilities=args.probabilities,
        batch_size=args.batch_size,
        data_format=args.data_format,
        encoding=args.encoding,
    )
    print(f"wrote {path}")
    return 0
