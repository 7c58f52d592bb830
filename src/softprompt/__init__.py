"""softprompt: train, evaluate and serve soft prompts on frozen language models.

    import softprompt
    model = softprompt.load("smollm2-135m")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=8, init_text="Classify the tweet:")
    model.generate(["text 1", "text 2"], adapters=["a", None], max_new_tokens=10)
"""

__version__ = "0.1.0"

from softprompt.errors import AdapterMismatchError, ConfigError, DataError, SoftPromptError  # noqa: E402
from softprompt.models.loading import load  # noqa: E402
from softprompt.methods import METHODS, PrefixTuningConfig, PromptTuningConfig, PTuningConfig  # noqa: E402
from softprompt.engine.model import SoftPromptModel, SoftPromptOutput  # noqa: E402
from softprompt.engine.scoring import LabelScores  # noqa: E402
from softprompt.adapters.training_format import TrainingFormat, format_inputs  # noqa: E402

__all__ = [
    "__version__", "load", "SoftPromptModel", "SoftPromptOutput", "LabelScores", "METHODS", "TrainingFormat", "format_inputs",
    "PromptTuningConfig", "PrefixTuningConfig", "PTuningConfig",
    "SoftPromptError", "AdapterMismatchError", "ConfigError", "DataError",
]
