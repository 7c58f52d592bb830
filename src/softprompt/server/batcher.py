"""The request batcher: one model thread, continuous batching across adapters.

Every model call runs on one thread (`Batcher._run`); the asyncio side only appends jobs to a bounded
queue and awaits futures, so it never blocks on the model. Scheme (continuous batching):

* **Waves.** The model thread loops over *steps*. At each step it first runs queued control commands
  (adapter registration and eviction, submitted by the registry), then admits waiting jobs in arrival
  order while the running rows stay within ``max_batch_size``, prefills the admitted rows in one mixed
  batch (`SoftPromptModel.prefill`, one adapter per row, any mix of methods), merges them into the running
  batch, and decodes one token for every running row (`SoftPromptModel.advance`).
* **Joining and leaving.** Rows that finish (end of sequence, a stop string, max_tokens, or a client that
  went away) leave at once through `DecodeState.select`; new rows join at the next step. Joining merges
  key/value caches (`DecodeState.merge`): the shorter cache is left-padded with masked zeros, which changes
  nothing because every row carries its own position ids and attention mask (the same mechanism that lets
  one batch mix prompt lengths). Leading columns that no remaining row attends to are trimmed.
  With ``decode`` "static" or "compiled" (`SoftPromptModel.decode`) the running batch is a slot pool instead
  (`softprompt.engine.static_decode`, the path `generate` takes): admitted rows are copied into free slots,
  and a finished row frees its slot without moving the others.
* **Fallback.** Caches that cannot be merged this way (sliding-window layers, encoder-decoder models)
  run as separate groups, each advanced once per step: still continuous (new rows start without
  waiting), just not one matrix multiply.
* **Batch window.** When the thread is idle, the first request waits up to ``batch_window_ms`` for
  others (or until ``max_batch_size`` rows are waiting), so requests arriving together share a prefill.
* **Large requests.** A job with more rows than free slots (many prompts, or ``n`` choices each) joins in
  parts as slots free up, first come first served, so a request may be larger than ``max_batch_size``.
* **Classification** jobs (`/v1/classify`) take no decode slot: they are scored between steps in
  batches grouped by identical label sets (`scoring.score_ids`). So are prompt-scoring jobs (``echo`` with
  ``max_tokens`` 0); see `softprompt.server.scoring`.

Tokens are picked and rows ended by the rules `generate` uses (`softprompt.engine.decode`): greedy rows
are the argmax of the same logits `generate` sees; sampled rows each own a generator seeded from the
request's ``seed`` (plus the choice's index when ``n`` > 1), so a seeded request returns what
``model.generate([prompt], do_sample=True, seed=seed, ...)`` returns, whatever else shares its batch.
Log-probabilities (``logprobs``) are those of the same logits, before temperature and top-p/top-k.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from softprompt.engine import static_decode
from softprompt.engine.decode import Continuation, RunningBatch, StopRule, feed_next, next_tokens
from softprompt.engine.generation import Generation
from softprompt.engine.model import SoftPromptModel
from softprompt.engine.token_logprobs import TokenLogprob, pick
from softprompt.engine.tokens import eos_ids, pad_batch, pad_id
from softprompt.errors import SoftPromptError
from softprompt.server.jobs import Job
from softprompt.server.metrics import Metrics
from softprompt.server.schemas import APIError
from softprompt.server.scoring import classify_jobs, score_prompts
from softprompt.server.settings import ServerSettings

log = logging.getLogger("softprompt.server")


def _client_gone() -> APIError:
    return APIError(499, "the client closed the connection", code="client_closed")


class _Row(Continuation):
    """A sequence being decoded (model thread only): its tokens and text, and how far it has been streamed."""

    __slots__ = ("job", "choice", "prompt", "rule", "sampler", "constraint", "emitted", "logprobs")

    def __init__(self, job: Job, row: int, rule: StopRule):
        super().__init__()
        self.job = job
        self.choice = row  # choices are numbered prompt by prompt: prompt i, copy j is choice i * n + j
        self.prompt = job.prompts[row // job.n]
        self.rule = rule
        assert job.sampling is not None  # a generation job carries its decoding options
        self.sampler = job.sampling.sampler(row % job.n)
        grammar = job.sampling.grammar
        self.constraint = grammar.matcher() if grammar is not None else None  # response_format: its own state
        self.emitted = 0  # characters already streamed
        self.logprobs: list[TokenLogprob] | None = [] if job.logprobs is not None else None


class _Group:
    """Rows sharing one decode state: a `DecodeState`, or a slot pool's `static_decode.SlotState`."""

    def __init__(self, state: RunningBatch, rows: list[_Row]):
        self.state = state
        self.rows = rows
        self.mergeable = state.mergeable


# ---------------------------------------------------------------------------- the batcher
class Batcher:
    """Owns the model thread. `submit` jobs from the event loop; `call` runs a function on the model thread."""

    def __init__(self, model: SoftPromptModel, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = model.tokenizer
        self.eos = frozenset(eos_ids(model.tokenizer, model.base)) if model.tokenizer is not None else frozenset()
        self.pad = pad_id(model.tokenizer) if model.tokenizer is not None else 0
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._pending_rows = 0
        self._commands: list[tuple[Callable[[], Any], asyncio.Future | None, asyncio.AbstractEventLoop | None]] = []
        self._groups: list[_Group] = []
        self._running_rows = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: dict[Job, list[tuple]] = {}
        # How admitted batches joined the running ones: merged into one cache, or run as a separate group.
        self.stats = {"merged": 0, "separate": 0}

    # -------------------------------------------------------------- event-loop side
    def start_thread(self) -> None:
        """Start the model thread (again, after `stop_thread`)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="softprompt-model", daemon=True)
            self._thread.start()

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop the model thread: what is queued or running fails with a 503."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running_rows(self) -> int:
        return self._running_rows

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 when the queue is full or the server is stopping."""
        with self._cv:
            if not self.alive:
                raise APIError(
                    503,
                    "the server is shutting down; retry on another replica",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                )
            if len(self._pending) >= self.settings.max_queue:
                if self.metrics:
                    self.metrics.rejected.labels(reason="queue_full").inc()
                raise APIError(
                    503,
                    f"the request queue is full ({self.settings.max_queue} waiting); retry shortly",
                    code="queue_full",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                )
            self._pending.append(job)
            self._pending_rows += job.rows
            self._set_queue_gauge()
            self._cv.notify_all()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._post(fn, future, loop)
        return await future

    def post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the model thread between steps, without waiting (ordered with `call`)."""
        self._post(fn, None, None)

    def _post(self, fn, future, loop) -> None:
        with self._cv:
            if self._thread is None:  # not started (bootstrap, tests): run inline
                self._run_command(fn, future, loop)
                return
            if self._stopping or not self._thread.is_alive():
                if future is not None:
                    future.set_exception(APIError(503, "the server is shutting down"))
                return
            self._commands.append((fn, future, loop))
            self._cv.notify_all()

    # -------------------------------------------------------------- model thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:
                if not self._iteration():
                    break
            except Exception:  # a bug must not kill the server: fail what was running and go on
                log.exception("model thread: unexpected error; failing the running batch")
                for group in self._groups:
                    for row in group.rows:
                        self._fail(row.job, APIError(500, "internal error while generating; see the server log"))
                self._groups = []
                self._running_rows = 0
                self._flush()
        self._shutdown()

    def _iteration(self) -> bool:
        settings = self.settings
        with self._cv:
            while not (self._stopping or self._pending or self._commands or self._groups):
                self._cv.wait()
            if self._stopping:
                return False
            if not self._groups and self._pending and settings.batch_window_ms > 0:
                deadline = self._pending[0].enqueued + settings.batch_window_ms / 1000
                while (
                    not self._stopping
                    and not self._commands
                    and self._pending_rows < settings.max_batch_size
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._cv.wait(left)
            commands, self._commands = self._commands, []
        for fn, future, loop in commands:
            self._run_command(fn, future, loop)
        generate, classify, score = self._admit()
        if classify:
            self._classify(classify)
        if score:
            self._score(score)
        if generate:
            self._prefill(generate)
        if self._groups:
            self._step()
        self._flush()
        return True

    def _run_command(self, fn, future, loop) -> None:
        try:
            result = fn()
        except BaseException as exc:
            if future is not None:
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                log.exception("model thread command failed")
            return
        if future is not None:
            loop.call_soon_threadsafe(_set_result, future, result)

    def _admit(self) -> tuple[list[tuple[Job, int, int]], list[Job], list[Job]]:
        """Take waiting jobs: generation rows as ``(job, first row, end row)`` up to the free slots, and the
        classification and prompt-scoring jobs (which take no slot)."""
        generate: list[tuple[Job, int, int]] = []
        classify: list[Job] = []
        score: list[Job] = []
        free = self.settings.max_batch_size - self._running_rows
        with self._cv:
            while self._pending:
                job = self._pending[0]
                if job.cancelled or job.kind != "generate":
                    self._pending.popleft()
                    self._pending_rows -= job.rows - job.admitted
                    if job.cancelled:
                        self._fail(job, _client_gone())
                    else:
                        (classify if job.kind == "classify" else score).append(job)
                    continue
                take = min(free, job.rows - job.admitted)
                if take <= 0:
                    break  # first come, first served: later generation jobs wait behind it
                generate.append((job, job.admitted, job.admitted + take))
                job.admitted += take
                self._pending_rows -= take
                free -= take
                if job.admitted == job.rows:
                    self._pending.popleft()
            self._set_queue_gauge()
        return generate, classify, score

    def _set_queue_gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))

    # -------------------------------------------------------------- between decode steps
    def _classify(self, jobs: list[Job]) -> None:
        for job, outcome in classify_jobs(
            self.model, jobs, pad=self.pad, max_rows=self.settings.max_batch_size, metrics=self.metrics
        ).items():
            self._send(job, ("error", _as_api_error(outcome)) if isinstance(outcome, Exception) else ("done", outcome))

    def _score_prompts(self, jobs: list[Job]) -> None:
        score_prompts(self.model, jobs, max_rows=self.settings.max_batch_size, metrics=self.metrics)

    def _score(self, jobs: list[Job]) -> None:
        """Prompt-scoring jobs (``max_tokens`` 0): no token is generated."""
        try:
            self._score_prompts(jobs)
        except Exception as exc:
            for job in jobs:
                self._fail(job, _as_api_error(exc))
            return
        for job in jobs:
            self._send(job, ("done", []))

    # -------------------------------------------------------------- generation
    def _prefill(self, parts: list[tuple[Job, int, int]]) -> None:
        jobs = [job for job, _, _ in parts]
        rows = [_Row(job, i, self._stop_rule(job)) for job, start, end in parts for i in range(start, end)]
        try:
            first_parts = [job for job, start, _ in parts if start == 0 and job.score_prompt]
            if first_parts:
                self._score_prompts(first_parts)
            ids, mask = pad_batch([r.prompt for r in rows], self.pad, side="left")
            state = self.model.prefill(ids, mask, [r.job.adapter for r in rows])
        except Exception as exc:
            for job in jobs:
                self._fail(job, _as_api_error(exc))
                job.cancel()  # rows of it still waiting to join are dropped
            return
        if self.metrics:
            self.metrics.batch_size.labels(phase="prefill").observe(len(rows))
        self._running_rows += len(rows)
        # A running slot pool (`static_decode`, model.decode "static"/"compiled") takes the rows it can hold first.
        targets = [g for g in self._groups if g.state.accepts(state)]
        targets.sort(key=lambda g: not isinstance(g.state, static_decode.SlotState))
        if targets:
            targets[0].state.merge(state)
            targets[0].rows.extend(rows)
            self.stats["merged"] += 1
        else:
            reserve = max(r.rule.max_new_tokens for r in rows)
            self._groups.append(_Group(static_decode.start(self.model, state, reserve), rows))
            self.stats["separate"] += bool(self._groups[:-1])

    def _step(self) -> None:
        rows_in_step = sum(len(g.rows) for g in self._groups)
        if self.metrics:
            self.metrics.batch_size.labels(phase="decode").observe(rows_in_step)
            self.metrics.running_rows.set(rows_in_step)
        survivors = []
        for group in self._groups:
            try:
                if self._step_group(group):
                    survivors.append(group)
            except Exception as exc:
                log.exception("model thread: decoding step failed")
                for row in group.rows:
                    self._fail(row.job, _as_api_error(exc))
                self._running_rows -= len(group.rows)
        self._groups = survivors
        if self.metrics and not self._groups:
            self.metrics.running_rows.set(0)

    def _stop_rule(self, job: Job) -> StopRule:
        assert job.sampling is not None  # a generation job carries its decoding options
        return StopRule(self.tokenizer, self.eos, job.sampling.max_new_tokens, tuple(job.sampling.stop))

    def _step_group(self, group: _Group) -> bool:
        state = group.state
        # Greedy rows are picked together; a constrained row's grammar masks its logits (sampled rows: below).
        greedy = next_tokens(state.logits, None, [r.constraint if r.sampler is None else None for r in group.rows])
        keep: list[int] = []
        generated = 0
        for slot, row in enumerate(group.rows):
            if row.job.cancelled:
                row.finish = "cancelled"
                self._fail(row.job, _client_gone())  # resolves the job, which unpins its adapter
                continue
            # A sampled row draws alone, with its own generator: its tokens do not depend on its batch.
            token = int(
                greedy[slot]
                if row.sampler is None
                else next_tokens(state.logits[slot : slot + 1], row.sampler, [row.constraint])[0]
            )
            if row.constraint is not None:
                row.constraint.advance(token)
            if row.logprobs is not None and row.job.logprobs is not None:  # both set, or neither
                row.logprobs += pick(state.logits[slot : slot + 1], [token], row.job.logprobs)
            generated += self._add_token(row, token)
            if row.finish is None:
                keep.append(slot)
        if self.metrics and generated:
            self.metrics.tokens.labels(kind="completion").inc(generated)
        self._running_rows -= len(group.rows) - len(keep)
        if not keep:
            return False
        group.rows = [group.rows[k] for k in keep]
        tokens = torch.tensor([row.tokens[-1] for row in group.rows], dtype=torch.long)
        feed_next(self.model, state, keep, tokens, trim=group.mergeable)
        return True

    def _add_token(self, row: _Row, token: int) -> bool:
        """Add one token to a row (`StopRule`, as `generate` does) and emit what is due; whether it was kept."""
        job = row.job
        kept = row.rule.add(row, token, track_text=job.stream)
        if row.finish is not None:
            self._finish_row(row)
        elif job.stream:
            end = len(row.text)
            while end > row.emitted and row.text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
            end -= row.rule.held_back(row.text[:end])
            if end > row.emitted:
                self._send(job, ("delta", row.choice, row.text[row.emitted : end]))
                row.emitted = end
        return kept

    def _finish_row(self, row: _Row) -> None:
        job = row.job
        result = Generation(row.text, list(row.tokens), row.finish_reason, len(row.prompt))
        if job.stream and len(row.text) > row.emitted:
            self._send(job, ("delta", row.choice, row.text[row.emitted :]))
            row.emitted = len(row.text)
        job.results[row.choice] = result
        if row.logprobs is not None:
            job.token_logprobs[row.choice] = row.logprobs
        if job.stream:
            self._send(job, ("finish", row.choice, result))
        if len(job.results) == job.rows:
            self._send(job, ("done", [job.results[i] for i in range(job.rows)]))

    # -------------------------------------------------------------- delivery
    def _send(self, job: Job, event: tuple) -> None:
        self._outbox.setdefault(job, []).append(event)

    def _fail(self, job: Job, exc: Exception) -> None:
        self._send(job, ("error", exc))

    def _flush(self) -> None:
        """Hand this step's events to the event loop(s): one wake-up per loop per step."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, events in outbox.items():
            by_loop.setdefault(job.loop, []).append((job, events))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_deliver_all, items)

    def _shutdown(self) -> None:
        def error():
            return APIError(
                503,
                "the server is shutting down; retry on another replica",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
            commands, self._commands = self._commands, []
        for job in pending:
            self._fail(job, error())
        for group in self._groups:
            for row in group.rows:
                self._fail(row.job, error())
        self._groups = []
        for _, future, loop in commands:
            if future is not None and loop is not None:  # both set, or neither
                loop.call_soon_threadsafe(_set_exception, future, error())
        self._flush()


def _deliver_all(items) -> None:
    for job, events in items:
        job.deliver(events)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SoftPromptError):
        return APIError(400, str(exc))
    log.error("model thread: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, "internal error while running the model; see the server log")
