"""Training jobs: configuration, the loop, evaluation, cross-validation, prediction, distribution.

The names below are the package's public surface (research code and users import them from here)."""

from softprompt.data.heldout import fingerprint, read_train_fingerprints
from softprompt.training.batches import collate, encode_examples, epoch_groups
from softprompt.training.config import TrainConfig, load_config, parse_verbalizer
from softprompt.training.cross_validate import CrossValidationReport, cross_validate
from softprompt.training.ensemble import (
    EnsembleMember,
    EnsembleProbabilities,
    ensemble_probabilities,
    predict_ensemble_file,
)
from softprompt.training.evaluate import adapter_settings, evaluate, example_loss, prompt_budget
from softprompt.training.jobs import prepare_job
from softprompt.training.loop import train, train_jobs
from softprompt.training.metrics import classification_report
from softprompt.training.predict import label_probabilities, predict_file
from softprompt.training.sweep_run import SweepResult, sweep

__all__ = [
    "CrossValidationReport",
    "EnsembleMember",
    "EnsembleProbabilities",
    "SweepResult",
    "TrainConfig",
    "adapter_settings",
    "classification_report",
    "collate",
    "cross_validate",
    "encode_examples",
    "ensemble_probabilities",
    "epoch_groups",
    "evaluate",
    "example_loss",
    "fingerprint",
    "label_probabilities",
    "load_config",
    "parse_verbalizer",
    "predict_ensemble_file",
    "predict_file",
    "prepare_job",
    "prompt_budget",
    "read_train_fingerprints",
    "sweep",
    "train",
    "train_jobs",
]
