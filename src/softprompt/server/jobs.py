"""What a request asks of the model thread: its decoding options (`Sampling`) and the `Job` it waits on.

Jobs are created on the event loop and queued with `Batcher.submit`; the model thread decodes their rows
and hands events back through `Job.deliver`, one wake-up of the event loop per step.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from softprompt.engine.constraints import Grammar
from softprompt.engine.decode import Sampler, make_sampler
from softprompt.engine.generation import Generation
from softprompt.engine.token_logprobs import TokenLogprob


@dataclass
class Sampling:
    """Decoding options of one request (already validated)."""

    max_new_tokens: int  # 0: score the prompt only (echo), generate nothing
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    grammar: Grammar | None = None  # response_format: every row decodes under its own matcher of it

    def sampler(self, choice: int = 0) -> Sampler | None:
        """A new sampler for one row, None when it decodes greedily (temperature 0, or top_p 0: nothing left
        to sample from). Choice ``choice`` of a prompt (``n`` > 1) draws from ``seed + choice``, so each choice
        is reproducible on its own (choice 0 is the n=1 request); without a ``seed`` the row draws one of its own."""
        if self.top_p <= 0:
            return None
        seed = self.seed + choice if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return make_sampler(self.temperature, self.top_p, self.top_k, seed)


class Job:
    """One request, created on the event loop: generation rows (``n`` per prompt), prompt scoring only
    (``max_new_tokens`` 0), or a classification.

    ``logprobs``: how many alternatives to report per token (None: no log-probabilities); generated tokens then
    get theirs in `token_logprobs`. ``score_prompt``: also score every prompt token (`prompt_scores`), as
    OpenAI's ``echo`` with ``logprobs`` does.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        adapter: str | None,
        prompts: list[list[int]],
        sampling: Sampling | None = None,
        stream: bool = False,
        n: int = 1,
        logprobs: int | None = None,
        score_prompt: bool = False,
        labels: list[list[int]] | None = None,
        label_names: list[str] | None = None,
        normalize: str = "sum",
    ):
        self.loop = loop
        self.adapter = adapter
        self.prompts = prompts
        self.sampling = sampling
        self.stream = stream
        self.n = n
        self.logprobs = logprobs
        self.score_prompt = score_prompt
        self.labels = labels
        self.label_names = label_names
        self.normalize = normalize
        if labels is not None:
            self.kind = "classify"
        elif sampling is not None and sampling.max_new_tokens == 0:
            self.kind = "score"
        else:
            self.kind = "generate"
        self.admitted = 0  # generation rows already handed to the model (a job may join in parts)
        self.future: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.cancelled = False  # set from the event loop; read by the model thread
        self.enqueued = time.monotonic()
        # Written by the model thread only, before it resolves the job:
        self.results: dict[int, Generation] = {}  # by choice, as rows finish
        self.token_logprobs: dict[int, list[TokenLogprob]] = {}  # by choice: every token drawn, end of sequence too
        self.prompt_scores: list[list[TokenLogprob]] | None = None  # per prompt: its tokens after the first

    @property
    def rows(self) -> int:
        """Model rows: one per prompt and choice (one per prompt when no token is generated)."""
        return len(self.prompts) * (self.n if self.kind == "generate" else 1)

    def cancel(self) -> None:
        """The client went away: the model thread drops the job's rows at its next step."""
        self.cancelled = True

    def deliver(self, events: list[tuple]) -> None:
        """Hand the model thread's events to the request (on the event loop): ``("done", results)`` and
        ``("error", exc)`` resolve `future`; a streaming job also gets every event, ``("delta", choice, text)``
        and ``("finish", choice, generation)`` included, on `events`."""
        for event in events:
            if event[0] == "done":
                if not self.future.done():
                    self.future.set_result(event[1])
            elif event[0] == "error" and not self.future.done():
                self.future.set_exception(event[1])
                self.future.exception()  # retrieved: a job nobody awaits any more must not warn
            if self.events is not None:
                self.events.put_nowait(event)
