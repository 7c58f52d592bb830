"""What the model thread runs between decode steps: classification jobs and prompt scoring.

Neither takes a decode slot. Classification (`/v1/classify`) ranks candidate labels in batches grouped by
identical label sets (`softprompt.engine.scoring.score_ids`); prompt scoring (``echo`` with ``logprobs``)
scores every prompt token (`softprompt.engine.token_logprobs.prompt_logprobs`) in batches of at most
`SCORE_LOGITS` logits. Rows of every adapter share each batch.
"""

from __future__ import annotations

from softprompt.engine.scoring import score_ids
from softprompt.engine.token_logprobs import TokenLogprob, prompt_logprobs
from softprompt.engine.tokens import pad_batch
from softprompt.server.jobs import Job

# Most logits (rows x positions x vocabulary) one prompt-scoring pass holds: 2**27 float32 values = 512 MiB.
SCORE_LOGITS = 2**27


def classify_jobs(model, jobs: list[Job], *, pad: int, max_rows: int, metrics=None) -> dict[Job, list | Exception]:
    """Per job: the score of every label for each of its texts (``[text][label]``), or the exception that
    failed its batch (one failing label set does not fail the others)."""
    by_labels: dict[tuple, list[Job]] = {}
    for job in jobs:
        assert job.labels is not None  # a classification job carries its candidate labels
        key = (tuple(tuple(c) for c in job.labels), job.normalize)
        by_labels.setdefault(key, []).append(job)
    outcomes: dict[Job, list | Exception] = {}
    for (candidates, normalize), group in by_labels.items():
        rows = [(job, i, ids) for job in group for i, ids in enumerate(job.prompts)]
        totals: dict[tuple[Job, int], list[float]] = {}
        try:
            for start in range(0, len(rows), max_rows):
                chunk = rows[start : start + max_rows]
                ids, mask = pad_batch([r[2] for r in chunk], pad, side="left")
                scores = score_ids(
                    model, ids, mask, [r[0].adapter for r in chunk], [list(c) for c in candidates], normalize=normalize
                ).cpu()
                if metrics:
                    metrics.batch_size.labels(phase="classify").observe(len(chunk))
                for (job, i, _), row in zip(chunk, scores):
                    totals[(job, i)] = row.tolist()
        except Exception as exc:
            outcomes.update((job, exc) for job in group)
            continue
        outcomes.update((job, [totals[(job, i)] for i in range(job.rows)]) for job in group)
    return outcomes


def score_prompts(model, jobs: list[Job], *, max_rows: int, metrics=None) -> None:
    """Fill each job's `Job.prompt_scores` (its ``logprobs`` alternatives per token); raises on failure."""
    rows = [(job, ids) for job in jobs for ids in job.prompts]
    top = max(job.logprobs or 0 for job in jobs)
    vocab = model.base.get_input_embeddings().num_embeddings
    scores: list[list[TokenLogprob]] = []
    start = 0
    while start < len(rows):
        end, longest = start, 0
        while end < len(rows) and end - start < max_rows:
            longest = max(longest, len(rows[end][1]))
            if end > start and (end + 1 - start) * longest * vocab > SCORE_LOGITS:
                break
            end += 1
        chunk = rows[start:end]
        scores += prompt_logprobs(model, [r[1] for r in chunk], [r[0].adapter for r in chunk], top)
        if metrics:
            metrics.batch_size.labels(phase="score").observe(len(chunk))
        start = end
    at = 0
    for job in jobs:
        keep = job.logprobs or 0
        job.prompt_scores = [
            [TokenLogprob(t.token, t.logprob, t.top[:keep]) for t in row] for row in scores[at : at + len(job.prompts)]
        ]
        at += len(job.prompts)
