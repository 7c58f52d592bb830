"""Adapter files: PEFT's layout, the Hugging Face Hub, prompt-embedding export, inspection."""
