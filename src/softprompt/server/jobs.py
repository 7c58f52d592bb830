"""What a request asks of the model thread: its decoding options (`Sampling`) and the `Job` it waits on.

Jobs are created on the event loop and queued with `Batcher.submit`; the model thread decodes their rows
and hands events back through `Job.deliver`, one wake-up of the event loop per step.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from softprompt.engine.decode import Sampler, make_sampler
from softprompt.engine.generation import Generation


@dataclass
class Sampling:
    """Decoding options of one request (already validated)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def sampler(self) -> Sampler | None:
        """A new sampler for one row, None when it decodes greedily (temperature 0, or top_p 0: nothing left
        to sample from). Without a ``seed`` the row draws one of its own."""
        if self.top_p <= 0:
            return None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return make_sampler(self.temperature, self.top_p, self.top_k, seed)


class Job:
    """One request: generation rows (one per prompt) or a classification, created on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, adapter: str | None, prompts: list[list[int]],
                 sampling: Sampling | None = None, stream: bool = False,
                 labels: list[list[int]] | None = None, label_names: list[str] | None = None,
                 normalize: str = "sum"):
        self.loop = loop
        self.adapter = adapter
        self.prompts = prompts
        self.sampling = sampling
        self.stream = stream
        self.labels = labels
        self.label_names = label_names
        self.normalize = normalize
        self.kind = "classify" if labels is not None else "generate"
        self.future: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.cancelled = False  # set from the event loop; read by the model thread
        self.enqueued = time.monotonic()
        self.results: dict[int, Generation] = {}  # by choice, as rows finish: written by the model thread only

    @property
    def rows(self) -> int:
        return len(self.prompts)

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
            elif event[0] == "error":
                if not self.future.done():
                    self.future.set_exception(event[1])
                    self.future.exception()  # retrieved: a job nobody awaits any more must not warn
            if self.events is not None:
                self.events.put_nowait(event)
