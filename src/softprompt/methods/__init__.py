"""Soft-prompt methods: one file each, one registry here.

Each method's options are the fields of its config class (declared once, with their help text);
`METHOD_OPTIONS` is derived from them, for the training config and the command line.
"""

from __future__ import annotations

from dataclasses import fields
from typing import overload

from softprompt.errors import ConfigError
from softprompt.methods.adaption_prompt import AdaptionPrompt, AdaptionPromptConfig
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.methods.cartridge import Cartridge, CartridgeConfig
from softprompt.methods.cpt import CPT, CPTConfig
from softprompt.methods.multitask_prompt_tuning import MultitaskPromptTuning, MultitaskPromptTuningConfig
from softprompt.methods.p_tuning import PTuning, PTuningConfig
from softprompt.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from softprompt.options import did_you_mean

METHODS: dict[str, type[SoftPromptMethod]] = {
    "prompt_tuning": PromptTuning,
    "prefix_tuning": PrefixTuning,
    "p_tuning": PTuning,
    "cartridge": Cartridge,
    "adaption_prompt": AdaptionPrompt,
    "multitask_prompt_tuning": MultitaskPromptTuning,
    "cpt": CPT,
}
PEFT_TYPES: dict[str, str] = {cls.config_class.peft_type: name for name, cls in METHODS.items()}


def _options_and_methods() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, cls in METHODS.items():
        for f in fields(cls.config_class):
            out[f.name] = (*out.get(f.name, ()), name)
    return out


#: Every method option (a field of some method's config class) -> the methods that take it, in METHODS order.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = _options_and_methods()


@overload
def normalize_method(name: str) -> str: ...
@overload
def normalize_method(name: object) -> object: ...
def normalize_method(name: object) -> object:
    """``prompt-tuning`` / ``Prompt_Tuning`` -> ``prompt_tuning`` (a registry key when it names a method);
    anything that is not a string comes back unchanged."""
    return name.strip().replace("-", "_").lower() if isinstance(name, str) else name


def suggest_method(name: object) -> str:
    """`` (did you mean 'p_tuning'?)`` for a misspelt method name, or an empty string."""
    return did_you_mean(normalize_method(name), METHODS) if isinstance(name, str) else ""


def method_class(name: str, *, source: str = "method") -> type[SoftPromptMethod]:
    """The method class for a name; accepts dashes (``prompt-tuning``) as the CLI spells them."""
    key = normalize_method(name)
    if key not in METHODS:
        raise ConfigError(
            f"{source}: unknown method {name!r}{suggest_method(name)}; expected one of {', '.join(METHODS)}"
        )
    return METHODS[key]


__all__ = [
    "CPT",
    "METHODS",
    "METHOD_OPTIONS",
    "PEFT_TYPES",
    "AdaptionPrompt",
    "AdaptionPromptConfig",
    "CPTConfig",
    "Cartridge",
    "CartridgeConfig",
    "MethodConfig",
    "MultitaskPromptTuning",
    "MultitaskPromptTuningConfig",
    "PTuning",
    "PTuningConfig",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PromptTuning",
    "PromptTuningConfig",
    "SoftPromptMethod",
    "method_class",
    "normalize_method",
    "suggest_method",
]
