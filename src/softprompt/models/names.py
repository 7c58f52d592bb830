"""Built-in model names and the hub ids they stand for (used in PEFT's ``base_model_name_or_path``)."""

from __future__ import annotations

BUILTIN_HUB_IDS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}


def hub_id_for(name_or_path: str | None) -> str | None:
    """The hub id PEFT should record for a base model: built-in names map to their hub repo."""
    if name_or_path is None:
        return None
    return BUILTIN_HUB_IDS.get(name_or_path, name_or_path)
