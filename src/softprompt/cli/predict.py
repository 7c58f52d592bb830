"""``softprompt predict``: one predicted label per row of unlabelled data, from an adapter or an ensemble."""

from __future__ import annotations

import argparse

from softprompt import load
from softprompt.cli.common import add_adapter_argument, add_model_argument, parse_adapter_specs
from softprompt.errors import SoftPromptError
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_adapter_argument(parser, "Adapter (repeatable: several are an ensemble; none: the zero-shot base model).")
    parser.add_argument("--data", required=True, help="Data file (CSV, TSV, JSONL, parquet, phrasebank).")
    parser.add_argument("--output", required=True, help="CSV file to write (written atomically).")
    parser.add_argument("--verbalizer", metavar="RAW=TEXT,...",
                        help="Raw label -> label text, as '1=complaint,2=no complaint' or a YAML mapping (keeps "
                             "leading spaces); default: as trained.")
    parser.add_argument("--id-column", help="Column copied to the output to identify rows (default: row numbers).")
    parser.add_argument("--label-name", default="Label", help="Header of the predicted-label column (default Label).")
    parser.add_argument("--template", help="Prompt template with {column} fields (default: as trained).")
    parser.add_argument("--probabilities", action="store_true", help="Also write p_<label> columns.")
    parser.add_argument("--format", dest="data_format", help="Data format when the extension does not tell.")
    parser.add_argument("--encoding", help="Text encoding of the data file (default UTF-8).")
    parser.add_argument("--batch-size", type=int, default=16, help="Rows per batch.")


def run(args: argparse.Namespace) -> int:
    adapters = parse_adapter_specs(args.adapter)
    verbalizer = parse_verbalizer(args.verbalizer) if args.verbalizer is not None else None
    if args.batch_size < 1:
        raise SoftPromptError(f"--batch-size: expected an integer of at least 1, got {args.batch_size}")
    model = load(args.model)
    path = predict_file(model, adapters, args.data, args.output, id_column=args.id_column,
                        label_name=args.label_name, template=args.template, verbalizer=verbalizer,
                        probabilities=args.probabilities,
                        batch_size=args.batch_size, data_format=args.data_format, encoding=args.encoding)
    print(f"wrote {path}")
    return 0
