"""The engine: SoftPromptModel, decoding, scoring, attention, model-family quirks."""
