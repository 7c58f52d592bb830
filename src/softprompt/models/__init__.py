"""Base models: loading by name, path or hub id; the offline built-in models."""
