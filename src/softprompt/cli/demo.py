"""``softprompt demo``: the command line of `softprompt.demo.run_demo`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from softprompt.demo import run_demo
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option

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


@dataclass
class DemoOptions:
    """The options of ``softprompt demo``."""

    model: str = option("smollm2-135m", "Base model (default smollm2-135m).")
    output: str = option("runs/demo", "Where the adapter is written (default runs/demo).")
    train_size: int = option(160, "Training tweets (default 160, balanced).")
    test_size: int = option(200, "Held-out tweets (default 200, balanced).")
    epochs: int = option(2, "Training epochs (default 2).")
    lr: float = option(3e-2, "Learning rate (default 3e-2).")
    num_virtual_tokens: int = option(8, "Virtual tokens (default 8).")
    seed: int = option(0, "Seed for the split and training (default 0).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, DemoOptions)


def run(args: argparse.Namespace) -> int:
    run_demo(
        args.model,
        args.output,
        train_size=args.train_size,
        test_size=args.test_size,
        epochs=args.epochs,
        lr=args.lr,
        num_virtual_tokens=args.num_virtual_tokens,
        seed=args.seed,
    )
    return 0
