"""Bridges to other training libraries (transformers' Trainer, TRL)."""
