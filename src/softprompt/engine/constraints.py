"""Grammar-constrained decoding: JSON (any object, or one matching a JSON schema) through llguidance.

`JsonGrammars` turns a JSON schema into a compiled `Grammar` once per request (and says why a schema is
refused); each decoded row then owns a `GrammarMatcher`, which `softprompt.engine.decode.next_tokens` asks
to mask the row's logits before it picks a token, and which is told every token picked (`advance`). Rows
without a matcher are untouched, so a batch can mix constrained and free rows, and rows of any adapters.

When the grammar accepts, the matcher also allows the end-of-sequence tokens; once the grammar is complete
it allows nothing else, so the row ends there. llguidance was chosen by measuring (docs/serving.md): it
compiles a small schema in 1-2 ms and masks a 49k vocabulary in about 0.1 ms per token, with no dependency.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

INSTALL = "pip install 'llguidance==1.9.1'"
# Compact JSON: without this a grammar allows unbounded whitespace between tokens, which a weak model fills.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema the grammar library cannot compile; the message says why."""


class GrammarUnavailable(RuntimeError):
    """llguidance is not installed; the message is one line with the command that installs it."""


def _llguidance():
    # Imported on first use: an optional dependency, needed only by requests that ask for a response format.
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        raise GrammarUnavailable(f"constrained decoding needs llguidance: {INSTALL}") from None
    return llguidance


class Grammar:
    """A compiled grammar for one tokenizer; `matcher` gives each row its own state."""

    def __init__(self, tokenizer_info: Any, grammar: str):
        self._info = tokenizer_info
        self._grammar = grammar

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(_llguidance().LLMatcher(self._info, self._grammar))


class GrammarMatcher:
    """One row's position in its grammar: masks that row's logits and follows the tokens it picks."""

    __slots__ = ("_matcher", "_bitmask")

    def __init__(self, matcher: Any):
        self._matcher = matcher
        self._bitmask: torch.Tensor | None = None

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [vocab] of every token the grammar does not allow next to -inf, in place (in an
        error state only end-of-sequence stays allowed, so the row ends)."""
        lt = _llguidance().torch
        if self._bitmask is None:
            self._bitmask = lt.allocate_token_bitmask(1, logits.shape[-1])
        lt.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        lt.apply_token_bitmask_inplace(logits.view(1, -1), self._bitmask.to(logits.device, non_blocking=True))

    def advance(self, token: int) -> None:
        """The row picked ``token`` (one its mask allowed)."""
        self._matcher.consume_token(token)

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a complete match of the grammar."""
        return self._matcher.is_accepting()


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer. Building the tokenizer's index takes a moment (0.4 s for a
    49k vocabulary), so it is built once, on first use, and shared by every grammar (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Iterable[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos)
        self._info: Any = None
        self._lock = threading.Lock()

    def _tokenizer_info(self) -> Any:
        with self._lock:
            if self._info is None:
                try:
                    self._info = _llguidance().hf.from_tokenizer(
                        self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos or None
                    )
                except GrammarUnavailable:
                    raise
                except Exception as exc:  # a slow tokenizer, or one llguidance cannot read
                    raise GrammarUnavailable(
                        f"constrained decoding needs a fast tokenizer that llguidance "
                        f"can read ({type(exc).__name__}: {exc})"
                    ) from None
            return self._info

    def compile(self, schema: dict[str, Any] | None) -> Grammar:
        """The grammar of JSON values matching ``schema`` (None: any JSON object). Raises `GrammarError` naming
        the first problem of a schema that is invalid or uses what llguidance does not implement."""
        llg = _llguidance()
        info = self._tokenizer_info()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                {"type": "object"} if schema is None else schema, defaults=_JSON_OPTIONS
            )
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, info)
        except Exception as exc:  # the library's own message is the reason
            raise GrammarError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
        if is_error:
            raise GrammarError(" ".join(messages[0].split()) if messages else "the schema cannot be compiled")
        return Grammar(info, grammar)
