"""The `softprompt` command. Each subcommand is a thin shell over one library function.

User mistakes (`SoftPromptError`) print one line and exit 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap

from softprompt.errors import SoftPromptError

EPILOGS = {
    "train": """
        examples:
          softprompt train recipes/offline/raft_twitter_complaints.yaml      # smollm2-135m, local data
          softprompt train recipes/raft_twitter_complaints.yaml --model smollm2-135m \\
              --data ../shared/data/raft_twitter_complaints/train.csv --kfold 10
          softprompt train --model smollm2-135m --data hf:glue:sst2 --validation-split validation \\
              --text-column sentence --label-column label --verbalizer '0=negative,1=positive'
          softprompt train --model smollm2-135m --method prompt-tuning --data tweets.csv \\
              --text-column text --label-column label --template "Tweet: {text} Sentiment: " \\
              --num-virtual-tokens 8 --init-text "Classify the sentiment:" --epochs 5 --batch-size 8 \\
              --lr 3e-2 --seed 0 --output runs/sentiment
          softprompt train --model smollm2-135m --method prefix-tuning --data tweets.csv \\
              --text-column text --label-column label --init-text "Classify the sentiment:" \\
              --num-virtual-tokens 8 --lr 1e-2        # prefix starts from the text's keys/values
          softprompt train recipes/raft_twitter_complaints.yaml --output runs/raft --resume
          softprompt train --model smollm2-135m --method prefix-tuning --num-virtual-tokens 20 \\
              --data more_reviews.csv --init-from examples/adapters/sst2 --lr 3e-3 --output runs/more
              (warm start: a new job from a saved adapter, e.g. more rows, or another related task)
        """,
    "eval": """
        examples:
          softprompt eval --model smollm2-135m --adapter runs/sentiment/default --data dev.csv \\
              --text-column text --label-column label --template "Tweet: {text} Sentiment: "
          softprompt eval --model smollm2-135m --adapter a=runs/a --adapter b=runs/b --data dev.csv ... --json
          softprompt eval --model smollm2-135m --adapter runs/sentiment/default --data dev.txt --format tsv \\
              --plot confusion.png
        """,
    "predict": """
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
        """,
    "generate": """
        Every prompt is generated with every adapter given (and with the bare model with --base),
        all in one mixed batch.

        examples:
          softprompt generate --model smollm2-135m --adapter quotes=runs/quotes "Write a quote about rain:"
          softprompt generate --model smollm2-135m --adapter a=runs/a --adapter b=runs/b --base \\
              --max-new-tokens 20 --json "Hello" "Tell me a joke"
        """,
    "inspect": """
        examples:
          softprompt inspect runs/sentiment/default
          softprompt inspect runs/sentiment/default --model smollm2-135m   # nearest vocabulary tokens
          softprompt inspect runs/sentiment/default --json
        """,
    "push": """
        Uploads an adapter directory to the Hugging Face Hub in PEFT's layout (PeftModel.from_pretrained
        loads it), with softprompt's records (template, verbalizer, training-row fingerprints) and a
        generated model card (README.md; one in the directory is used instead). Log in first
        (`hf auth login`) or pass --token.

        examples:
          softprompt push examples/adapters/sst2-gemma3-270m your-name/sst2-gemma3-270m-prompt
          softprompt push runs/sentiment/default your-name/tweet-sentiment --private
          softprompt eval --model gemma3-270m --adapter your-name/sst2-gemma3-270m-prompt --data dev.tsv
        """,
    "models": """
        examples:
          softprompt models
          softprompt models --json
        """,
    "serve": """
        examples:
          softprompt serve --model smollm2-135m --adapter quotes=runs/quotes --adapter prompts=runs/prompts
          softprompt serve --model smollm2-135m --adapter-dir runs/adapters --port 8080
        """,
    "demo": """
        Trains a soft prompt on smollm2-135m for tweet sentiment (human-rated tweets from the
        vaderSentiment 3.3.2 source distribution, fetched from PyPI and cached), prints zero-shot versus
        tuned accuracy on held-out tweets, saves the adapter and generates with it.

        examples:
          softprompt demo
          softprompt demo --output runs/demo --epochs 2
        """,
}


def _parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=textwrap.dedent(EPILOGS[name]),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """``[NAME=]PATH`` items into {name: path}; a bare path is named after its directory.

    Each local directory is checked here (`check_adapter_dir`), before any command loads the base model."""
    from softprompt.adapters.peft_format import check_adapter_dir

    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, os.path.basename(os.path.normpath(spec))
        if not name or not path:
            raise SoftPromptError(f"--adapter {spec!r}: expected NAME=PATH or PATH")
        if name in out:
            raise SoftPromptError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out[name] = path
    for path in out.values():
        check_adapter_dir(path)
    return out


# ---------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from softprompt import load
    from softprompt.engine.generation import generate

    adapters = parse_adapter_specs(args.adapter)
    model = load(args.model, dtype=args.dtype)
    for name, path in adapters.items():
        model.load_adapter(path, name=name)
    columns: list[str | None] = list(adapters) + ([None] if args.base or not adapters else [])
    prompts = [p for p in args.prompts for _ in columns]
    names = [c for _ in args.prompts for c in columns]
    results = generate(model, prompts, adapters=names, return_details=True, max_new_tokens=args.max_new_tokens,
                       do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                       stop=args.stop or (), seed=args.seed)
    rows = [{"prompt": p, "adapter": n, "text": r.text, "finish_reason": r.finish_reason}
            for p, n, r in zip(prompts, names, results)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(f"[{row['adapter'] or 'base'}] {row['prompt']}{row['text']}")
    return 0


# ---------------------------------------------------------------------------- predict
def cmd_predict(args) -> int:
    from softprompt import load
    from softprompt.training.predict import predict_file

    adapters = parse_adapter_specs(args.adapter)
    verbalizer = None
    if args.verbalizer is not None:
        from softprompt.training.config import parse_verbalizer

        verbalizer = parse_verbalizer(args.verbalizer)
    if args.batch_size < 1:
        raise SoftPromptError(f"--batch-size: expected an integer of at least 1, got {args.batch_size}")
    model = load(args.model)
    path = predict_file(model, adapters, args.data, args.output, id_column=args.id_column,
                        label_name=args.label_name, template=args.template, verbalizer=verbalizer,
                        probabilities=args.probabilities,
                        batch_size=args.batch_size, data_format=args.data_format, encoding=args.encoding)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------- inspect / models
def cmd_inspect(args) -> int:
    from softprompt.adapters.inspect import format_inspection, inspect_adapter

    model = None
    if args.model:
        from softprompt import load

        model = load(args.model)
    info = inspect_adapter(args.path, model, top_k=args.top_k)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_inspection(info))
    return 0


def cmd_push(args) -> int:
    from softprompt.adapters.hub import push_adapter

    url = push_adapter(args.path, args.repo_id, private=args.private, token=args.token, commit_message=args.message)
    print(f"pushed {args.path} to {args.repo_id}: {url}")
    return 0


def cmd_models(args) -> int:
    from softprompt.models.builtin import list_builtin

    models = list_builtin()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        state = "cached" if m["cached"] else "not cached (fetched from PyPI on first use)"
        print(f"{m['name']:<14} {state:<44} {m['description']}")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from softprompt import __version__

    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Train, evaluate and serve soft prompts (prompt tuning, prefix tuning, P-tuning) on frozen models.",
        epilog="Run 'softprompt demo' first, then 'softprompt COMMAND --help' for worked examples.",
    )
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from softprompt.cli.train import add_eval_arguments, add_train_arguments, cmd_eval, cmd_train

    p = _parser(sub, "train", "Train one or several adapters on one frozen base model.")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train, takes_extra=True)

    p = _parser(sub, "eval", "Evaluate adapters (and the zero-shot base model) on held-out data.")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval, takes_extra=True)

    p = _parser(sub, "predict", "Predict labels for unlabelled data with an adapter or an ensemble of adapters.")
    p.add_argument("--model", required=True, help="Base model: built-in name, local directory or hub id.")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="Adapter (repeatable: several are an ensemble; none: the zero-shot base model).")
    p.add_argument("--data", required=True, help="Data file (CSV, TSV, JSONL, parquet, phrasebank).")
    p.add_argument("--output", required=True, help="CSV file to write (written atomically).")
    p.add_argument("--verbalizer", metavar="RAW=TEXT,...",
                   help="Raw label -> label text, as '1=complaint,2=no complaint' or a YAML mapping (keeps "
                        "leading spaces); default: as trained.")
    p.add_argument("--id-column", help="Column copied to the output to identify rows (default: row numbers).")
    p.add_argument("--label-name", default="Label", help="Header of the predicted-label column (default Label).")
    p.add_argument("--template", help="Prompt template with {column} fields (default: as trained).")
    p.add_argument("--probabilities", action="store_true", help="Also write p_<label> columns.")
    p.add_argument("--format", dest="data_format", help="Data format when the extension does not tell.")
    p.add_argument("--encoding", help="Text encoding of the data file (default UTF-8).")
    p.add_argument("--batch-size", type=int, default=16, help="Rows per batch.")
    p.set_defaults(func=cmd_predict)

    p = _parser(sub, "generate", "Generate text with one or more adapters in one mixed batch.")
    p.add_argument("--model", required=True, help="Base model: built-in name, local directory or hub id.")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH", help="Adapter to load (repeatable).")
    p.add_argument("--base", action="store_true", help="Also generate with the bare base model.")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate per prompt (default 32).")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples.")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass when sampling.")
    p.add_argument("--stop", action="append", help="Stop string (repeatable).")
    p.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.set_defaults(func=cmd_generate)

    p = _parser(sub, "inspect", "Show an adapter's method, base model, size and nearest vocabulary tokens.")
    p.add_argument("path", help="Adapter directory or hub id.")
    p.add_argument("--model", help="Base model to compare virtual tokens with its vocabulary.")
    p.add_argument("--top-k", type=int, default=3, help="Nearest tokens shown per virtual token.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=cmd_inspect)

    p = _parser(sub, "push", "Upload an adapter to the Hugging Face Hub (PEFT's layout and a model card).")
    p.add_argument("path", help="Adapter directory.")
    p.add_argument("repo_id", help="Hub repo to create or update: 'owner/name'.")
    p.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps its setting).")
    p.add_argument("--token", help="Hub token (default: the one `hf auth login` stored, or $HF_TOKEN).")
    p.add_argument("--message", help="Commit message (default: 'Upload <folder> with softprompt').")
    p.set_defaults(func=cmd_push)

    p = _parser(sub, "models", "List the built-in model names and whether each is cached.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=cmd_models)

    from softprompt.cli.serve import add_serve_arguments, cmd_serve

    p = _parser(sub, "serve", "Serve the base model and adapters over an OpenAI-compatible HTTP API.")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from softprompt.demo import add_demo_arguments, cmd_demo

    p = _parser(sub, "demo", "Train and try a soft prompt on a real model, offline, in a few minutes.")
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _deepspeed_logs_to_stderr(record: logging.LogRecord) -> bool:
    """A filter for DeepSpeed's logger, which writes to the stdout it finds when imported (transformers and
    accelerate import it on some paths when it is installed): its warnings would corrupt `--json` output
    and anything piped from stdout, so they go to stderr instead."""
    print(f"[DeepSpeed] {record.levelname}: {record.getMessage()}", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.getLogger("DeepSpeed").addFilter(_deepspeed_logs_to_stderr)  # before anything imports it
    try:
        return int((args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)) or 0)
    except SoftPromptError as exc:
        print(f"softprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a TrainingInterrupted says where the latest state was saved
        print(f"softprompt {args.command}: interrupted{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
