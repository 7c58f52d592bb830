"""Response pieces the completion routes share: token usage and server-sent event streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from softprompt.server.jobs import Job
from softprompt.server.schemas import APIError, Usage


def usage(prompt_tokens: int, completion_tokens: int = 0) -> Usage:
    """OpenAI's token counts of one request."""
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def sse(value: Any) -> str:
    """One server-sent event carrying ``value`` as compact JSON."""
    return f"data: {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_response(
    job: Job | None,
    chunk: Callable[[int, str], dict],
    final_chunk: Callable[[int, str], dict],
    first_chunks: list[dict],
    prompt_tokens: int,
    include_usage: bool,
    base: dict,
) -> StreamingResponse:
    """Server-sent events: ``first_chunks``, then the job's deltas and finishes (no job: nothing to
    generate, ``first_chunks`` say it all), usage when asked, and ``[DONE]``."""
    rows = job.rows if job is not None else 0
    queue = job.events if job is not None else None
    assert rows == 0 or queue is not None  # a job created with stream=True has its event queue

    async def events() -> AsyncIterator[str]:
        finished, completion_tokens = 0, 0
        try:
            for first in first_chunks:
                yield sse(first)
            while queue is not None and finished < rows:
                event = await queue.get()
                if event[0] == "delta":
                    yield sse(chunk(event[1], event[2]))
                elif event[0] == "finish":
                    finished += 1
                    completion_tokens += len(event[2].token_ids)
                    yield sse(final_chunk(event[1], event[2].finish_reason))
                elif event[0] == "error":
                    error = event[1] if isinstance(event[1], APIError) else APIError(500, "internal error")
                    yield sse(error.body())
                    break
            if include_usage and finished == rows:
                yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens).model_dump()})
            yield "data: [DONE]\n\n"
        finally:
            if job is not None and not job.future.done():
                job.cancel()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
