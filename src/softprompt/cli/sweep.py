"""``softprompt sweep``: choose a recipe's settings by nested cross-validation (`softprompt.training.sweep_run`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option
from softprompt.training.sweep_run import sweep

NAME = "sweep"
HELP = "Choose template, label words, method, length, lr ... by nested cross-validation; report a held-out estimate."
EXAMPLES = """
    A sweep file is a recipe plus 'space:' (each key a list of choices; a key holding a list of mappings
    sets several options together) and 'sweep:' (outer_folds, inner_folds, samples, seed, ensemble,
    metric, selection, test_data, test_split, test_fraction, compare). With validation rows (validation_data,
    or selection: validation on a val_fraction split) the choice is made on them alone; test rows (test_data;
    test_split, a split of a hub test_data or else of the recipe's hub data, e.g. 'test', never its training
    or validation split; or test_fraction of --data held out first) are scored once, for the final choice.
    compare: a space key such as method, each of whose values also gets its own nested estimate. Settings
    that share the base model and job-wide options train as ONE multi-adapter job; a space of several base
    models holds one of them in memory at a time. ensemble: k also tries the average of the top k settings,
    which may differ in base model, template and label words (each member then loads its own base model in
    turn to predict). Writes leaderboard.csv/.md/.png, sweep_report.json, chosen.yaml (a recipe for
    'softprompt train'; for an ensemble across base models, each member's recipe under 'members:') and
    final/ (the choice trained on all labelled rows). Rerunning the same command skips every (fold, setting)
    already in <output>/results/.

    examples:
      softprompt sweep recipes/sweeps/raft_twitter_complaints.yaml
          (5 outer x 3 inner folds over 2 templates x 2 lrs x 2 lengths on the 50 labelled tweets)
      softprompt sweep recipes/sweeps/raft_twitter_complaints.yaml --output runs/raft-sweep \\
          --predict ../shared/data/raft_twitter_complaints/test_unlabeled.csv --id-column ID \\
          --predict-output results/raft_twitter_complaints_predictions.csv
          (also labels the unlabelled test tweets with the final choice)
      softprompt sweep recipes/sweeps/financial_phrasebank.yaml
          (one labelled file: 10% held out as test, chosen on a validation split of the rest)
      softprompt train runs/raft-sweep/chosen.yaml        # retrain the chosen recipe on its own
      softprompt sweep recipes/sweeps/raft_cpt_vs_prompt_tuning.yaml
          (CPT against prompt tuning: a nested estimate for each method, 'compare: method')

    a minimal sweep file:
      recipe: recipes/offline/raft_twitter_complaints.yaml
      epochs: 5
      space:
        lr: [1.0e-2, 3.0e-2]
        num_virtual_tokens: [8, 20]
      sweep: {outer_folds: 5, inner_folds: 3, ensemble: 2, seed: 0}
    """


@dataclass
class SweepOptions:
    """The options of ``softprompt sweep``."""

    config: str = option("", "Sweep file (YAML): a recipe, 'space:' and 'sweep:'.", positional=True)
    output: str | None = option(None, "Output directory (default: the recipe's output).")
    predict: str | None = option(None, "Unlabelled data file the final choice labels.", metavar="FILE")
    id_column: str | None = option(None, "Column of --predict copied to the predictions (default: row numbers).")
    predict_output: str | None = option(None, "CSV the predictions go to (default <output>/predictions.csv).")
    quiet: bool = option(False, "No progress bar.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, SweepOptions)


def run(args: argparse.Namespace) -> int:
    result = sweep(
        args.config,
        output=args.output,
        predict=args.predict,
        id_column=args.id_column,
        predict_output=args.predict_output,
        progress=not args.quiet,
    )
    print(result.format(), end="")
    print(f"leaderboard: {result.output / 'leaderboard.md'}")
    if result.predictions:
        print(f"predictions: {result.predictions}")
    return 0
