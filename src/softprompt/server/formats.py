"""``response_format``: the request's format as a compiled grammar for its rows, or the 400 that says why not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from softprompt.engine.constraints import Grammar, GrammarError, GrammarUnavailable, JsonGrammars
from softprompt.server.schemas import ResponseFormat, invalid

SCHEMA_PARAM = "response_format.json_schema.schema"


class ResponseFormats:
    """Compiles each request's ``response_format`` for the served tokenizer (llguidance is needed only once a
    request asks for JSON; a server without it serves everything else)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Iterable[int]):
        self._grammars = JsonGrammars(tokenizer, vocab_size, eos)

    async def grammar(self, fmt: ResponseFormat | None) -> Grammar | None:
        """The grammar every row of the request decodes under; None for text. Compiled on a worker thread
        (the first request also indexes the tokenizer). Raises a 400 naming the schema and the reason."""
        if fmt is None or fmt.type == "text":
            return None
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None  # json_object: any object
        try:
            return await asyncio.to_thread(self._grammars.compile, schema)
        except GrammarUnavailable as exc:
            raise invalid(f"response_format: {exc}", param="response_format") from None
        except GrammarError as exc:
            raise invalid(f"{SCHEMA_PARAM}: {exc}", param=SCHEMA_PARAM) from None
