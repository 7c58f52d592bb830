"""Self-study data (Eyuboglu et al., 2025): questions about a document, written by the frozen model itself.

A cartridge is trained to make the model *without* the document predict like the model *reading* it, on
queries about the document. Without given queries (``--data``), the frozen model writes them: for each
query a seeded draw picks a chunk of the document (``chunk_tokens`` tokens) and a seed prompt ("Ask a
question about this passage."), the bare model samples a question after chunk + seed prompt, and the
teacher (the model with the whole document in its context) answers it greedily.
Each row's ``text`` is ``"Question: <q>\\nAnswer:<a>"``, the string both teacher and student are
trained on. The rows are a pure function of (model, document, seed, counts), are saved as JSONL beside the
run, and a saved file with the same document hash, seed and count is read back instead of regenerated.

``model`` and the teacher are duck-typed (a `SoftPromptModel`: ``tokenizer`` and ``generate``; a
`softprompt.training.distill.Teacher`), so this module sits below the engine.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_text

SEED_PROMPTS = (
    "Ask a question about this passage.",
    "Write a question that a reader could answer only after reading this passage.",
    "Ask about a specific detail (a name, number, step or claim) in this passage.",
    "Ask a question about how the ideas in this passage fit together.",
)
QUESTION_TOKENS = 40  # a question is one line; the bare model samples at most this many tokens
ANSWER_TOKENS = 64  # the teacher's greedy answer
QUESTION_TEMPERATURE = 0.8
MAX_ROUNDS = 8  # rounds of question sampling before giving up on empty questions
MAX_CONTEXT_BYTES = 16 * 1024**2


def read_context(path: str, where: str = "--context") -> str:
    """The text of a ``--context`` file; a missing, unreadable, non-UTF-8 or empty file is one `ConfigError`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where} {path}: {'is not a regular file' if file.exists() else 'no such file'}")
    if file.stat().st_size > MAX_CONTEXT_BYTES:
        raise ConfigError(f"{where} {path}: is {file.stat().st_size:,} bytes; at most {MAX_CONTEXT_BYTES:,}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} {path}: not a readable UTF-8 text file ({exc})") from None
    if not text.strip():
        raise ConfigError(f"{where} {path}: is empty; expected the document's text")
    return text


def document_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def chunk_texts(tokenizer, document: str, chunk_tokens: int) -> list[str]:
    """The document cut into consecutive pieces of ``chunk_tokens`` tokens (the last may be shorter)."""
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[s : s + chunk_tokens]) for s in range(0, len(ids), chunk_tokens)]


def answer_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def self_study_rows(
    model, document: str, teacher: Any, *, queries: int, chunk_tokens: int, seed: int, batch_size: int = 8
) -> list[dict[str, str]]:
    """``queries`` rows ``{text, question, answer, chunk, seed_prompt, document, seed, queries}`` (see the module
    docstring); ``teacher`` is the model reading the whole document (`softprompt.training.distill.Teacher`: its
    ``adapter``, and ``prompt(model, text)``, the prompt that adapter answers)."""
    chunks = chunk_texts(model.tokenizer, document, chunk_tokens)
    rng = random.Random(seed)
    questions: list[tuple[int, int, str]] = []  # (chunk, seed prompt, question)
    seen: set[str] = set()
    for round_ in range(MAX_ROUNDS):
        draws = [
            (rng.randrange(len(chunks)), rng.randrange(len(SEED_PROMPTS))) for _ in range(queries - len(questions))
        ]
        prompts = [f"{chunks[c]}\n\n{SEED_PROMPTS[p]}\nQuestion:" for c, p in draws]
        texts = _generate(
            model,
            prompts,
            None,
            batch_size,
            max_new_tokens=QUESTION_TOKENS,
            do_sample=True,
            temperature=QUESTION_TEMPERATURE,
            seed=seed * 1_000_003 + round_,
            stop=["\n"],
        )
        for (c, p), text in zip(draws, texts):
            question = text.strip()
            if question and question not in seen:  # duplicates would leak between training and held-out rows
                seen.add(question)
                questions.append((c, p, question))
        if len(questions) >= queries:
            break
    if len(questions) < 2:
        raise ConfigError(f"self-study: the model wrote no usable questions about the document in {MAX_ROUNDS} rounds")
    answers = _generate(
        model,
        [teacher.prompt(model, answer_prompt(q)) for _, _, q in questions],
        teacher.adapter,
        batch_size,
        max_new_tokens=ANSWER_TOKENS,
        stop=["\n"],
    )
    digest = document_hash(document)
    return [
        {
            "text": answer_prompt(q) + a,
            "question": q,
            "answer": a,
            "chunk": str(c),
            "seed_prompt": SEED_PROMPTS[p],
            "document": digest,
            "seed": str(seed),
            "queries": str(queries),
        }
        for (c, p, q), a in zip(questions, answers)
    ]


def _generate(
    model, prompts: Sequence[str], adapter: str | None, batch_size: int, seed: int | None = None, **options
) -> list[str]:
    """Generate in batches; a sampling ``seed`` is advanced per batch so batches draw different samples."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        seeded = {} if seed is None else {"seed": seed + start}
        out += model.generate(list(prompts[start : start + batch_size]), adapters=adapter, **seeded, **options)
    return out


def write_rows(path: str | Path, rows: Sequence[dict[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def saved_rows(path: str | Path, document: str, seed: int, queries: int) -> list[dict[str, str]] | None:
    """The rows of an earlier run's file when it was made for this document, seed and count, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    made = {"document": document_hash(document), "seed": str(seed), "queries": str(queries)}
    same = all(isinstance(r, dict) and all(r.get(k) == v for k, v in made.items()) for r in rows)
    return rows if rows and same else None


__all__ = [
    "SEED_PROMPTS",
    "answer_prompt",
    "chunk_texts",
    "document_hash",
    "read_context",
    "saved_rows",
    "self_study_rows",
    "write_rows",
]
