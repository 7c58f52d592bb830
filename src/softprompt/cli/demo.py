"""``softprompt demo``: the command line of `softprompt.demo.run_demo`."""

from __future__ import annotations

import argparse

from softprompt.demo import run_demo

NAME = "demo"
HELP = "Train and try a soft prompt on a real model, offline, in a few minutes."
EXAMPLES = """
    Trains a soft prompt on smollm2-135m for tweet sentiment (human-rated tweets from the
    vaderSentiment 3.3.2 source distribution, fetched from PyPI and cached), prints zero-shot versus
    tuned accuracy on held-out tweets, saves the adapter and generates with it.

    examples:
      softprompt demo
      softprompt demo --output runs/demo --epochs 2
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="Base model (default smollm2-135m).")
    parser.add_argument("--output", default="runs/demo", help="Where the adapter is written (default runs/demo).")
    parser.add_argument("--train-size", type=int, default=160, help="Training tweets (default 160, balanced).")
    parser.add_argument("--test-size", type=int, default=200, help="Held-out tweets (default 200, balanced).")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs (default 2).")
    parser.add_argument("--lr", type=float, default=3e-2, help="Learning rate (default 3e-2).")
    parser.add_argument("--num-virtual-tokens", type=int, default=8, help="Virtual tokens (default 8).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the split and training.")


def run(args: argparse.Namespace) -> int:
    run_demo(args.model, args.output, train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
             lr=args.lr, num_virtual_tokens=args.num_virtual_tokens, seed=args.seed)
    return 0
