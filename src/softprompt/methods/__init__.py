"""Soft-prompt methods: one file each, one registry here."""

from __future__ import annotations

from softprompt.errors import ConfigError
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.methods.p_tuning import PTuning, PTuningConfig
from softprompt.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptTuning, PromptTuningConfig

METHODS: dict[str, type[SoftPromptMethod]] = {
    "prompt_tuning": PromptTuning,
    "prefix_tuning": PrefixTuning,
    "p_tuning": PTuning,
}
PEFT_TYPES: dict[str, str] = {cls.config_class.peft_type: name for name, cls in METHODS.items()}


def method_class(name: str, *, source: str = "method") -> type[SoftPromptMethod]:
    """The method class for a name; accepts dashes (``prompt-tuning``) as the CLI spells them."""
    key = str(name).replace("-", "_").lower()
    if key not in METHODS:
        raise ConfigError(f"{source}: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[key]


__all__ = [
    "METHODS", "PEFT_TYPES", "MethodConfig", "SoftPromptMethod", "method_class",
    "PromptTuning", "PromptTuningConfig", "PrefixTuning", "PrefixTuningConfig", "PTuning", "PTuningConfig",
]
