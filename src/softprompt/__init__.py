"""softprompt: train, evaluate and serve soft prompts on frozen language models.

import softprompt
model = softprompt.load("smollm2-135m")
model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=8, init_text="Classify the tweet:")
model.generate(["text 1", "text 2"], adapters=["a", None], max_new_tokens=10)
"""

__version__ = "0.1.0"

# First (pyproject's isort force-to-top): quiets bitsandbytes' import-time log lines before PEFT or accelerate
# import it.
import softprompt.models.precision  # noqa: F401
from softprompt.adapters.training_format import TrainingFormat, format_inputs
from softprompt.engine.model import SoftPromptModel, SoftPromptOutput
from softprompt.engine.scoring import LabelScores
from softprompt.errors import AdapterMismatchError, ConfigError, DataError, SoftPromptError
from softprompt.methods import METHODS, PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from softprompt.models.loading import load
from softprompt.models.memory import MemoryEstimate, estimate_memory
from softprompt.training.ensemble import (
    EnsembleMember,
    EnsembleProbabilities,
    ensemble_probabilities,
    predict_ensemble_file,
)
from softprompt.training.sweep_run import sweep

__all__ = [
    "METHODS",
    "AdapterMismatchError",
    "ConfigError",
    "DataError",
    "EnsembleMember",
    "EnsembleProbabilities",
    "LabelScores",
    "MemoryEstimate",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SoftPromptError",
    "SoftPromptModel",
    "SoftPromptOutput",
    "TrainingFormat",
    "__version__",
    "ensemble_probabilities",
    "estimate_memory",
    "format_inputs",
    "load",
    "predict_ensemble_file",
    "sweep",
]
