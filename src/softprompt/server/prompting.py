"""Turning request bodies into token ids: completion prompts, chat messages, classification inputs.

Chat: when the base tokenizer has a chat template, messages are rendered with
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` and tokenised
without adding special tokens again (the template writes them). Without a template the documented
fallback is one line per message, ``Role: content``, then ``Assistant:`` on the last line::

    System: You are terse.
    User: Hello
    Assistant:

tokenised like a completion prompt (the tokenizer's usual special tokens added). Completion prompts are
tokenised exactly as `SoftPromptModel.generate` does, so the server returns what offline generation does.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLE_NAMES = {"system": "System", "developer": "Developer", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def fallback_chat_text(messages: Sequence[dict]) -> str:
    """The chat prompt used when the tokenizer has no chat template."""
    lines = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a chat conversation, ready for the assistant's reply."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(fallback_chat_text(messages))["input_ids"])


def encode(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per text, as `tokens.encode_texts` computes them (without padding or truncation)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
