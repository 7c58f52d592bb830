"""Cartridges trained by self-study vs the whole document in context (issue 25), public API only.

One long document, one frozen model. Self-study writes questions about chunks of the document (the bare
model) and answers them with the model reading the whole document (the teacher); the last ``--heldout``
of them are never trained on. Cartridges of each ``--sizes`` are trained with ``--objective distill`` on the
rest, then every condition is scored on the held-out answers:

* (a) the bare model (question only), (b) the whole document in context, (c) each cartridge, and its
  untrained start (the keys/values of the document's first tokens);
* perplexity of the held-out answers (the teacher's own greedy answers, so (b) is the ceiling by
  construction) and of the whole question + answer text;
* inference cost per request: prefill time of one held-out question (batch 1, median of ``--reps``; for
  (b) the document and the question are prefilled together, as a request that carries the document does)
  and its key/value memory (prefix + question tokens, in the model's dtype).

    nice -n 10 python -m research.selfstudy --model smollm2-135m --sizes 64 256 1024

writes ``runs/selfstudy/<model>/`` (rows, adapters) and ``research/results/selfstudy-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import softprompt
from research.paths import RESULTS, own_output
from softprompt.data import Example
from softprompt.data.selfstudy import answer_prompt, read_context, saved_rows, self_study_rows, write_rows
from softprompt.engine.tokens import encode_texts
from softprompt.errors import SoftPromptError
from softprompt.training.config import load_config
from softprompt.training.distill import Teacher, add_teacher, document_text
from softprompt.training.evaluate import example_loss
from softprompt.training.loop import train
from softprompt.training.metrics import perplexity

# A prompt-tuning project's README (951 smollm2 tokens). The 3,186- and 4,808-token guides beside it are the
# better test; on 2 shared, oversubscribed cores their runs did not finish in the time a session had.
DOCUMENT = Path("/work/shared/seeds/004_52f9bb9b8a9f2258.txt")
MAX_LENGTH = 192  # longest question + answer, in tokens


def kv_bytes_per_token(model) -> int:
    shape = model.shape
    return shape.num_layers * 2 * shape.prefix_heads * shape.head_dim * model.dtype.itemsize


def prefill_seconds(model, text: str, adapter: str | None, reps: int) -> float:
    ids, mask = encode_texts(model.tokenizer, [text], side="left")
    model.prefill(ids, mask, [adapter])  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.prefill(ids, mask, [adapter])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def perplexities(model, rows: list[dict], adapter: str | None, batch_size: int, reader: Teacher | None = None) -> dict:
    """Held-out answer and question + answer perplexities with ``adapter``, or (``reader``, a teacher that re-reads
    the document) with the document written before each row, scoring the row's tokens only."""
    if reader is not None and reader.adapter is None:
        answers = [Example(reader.prompt(model, answer_prompt(r["question"])), r["answer"], r) for r in rows]
        whole = [Example(reader.prompt(model, ""), r["text"], r) for r in rows]
        max_length = len(reader.ids) + MAX_LENGTH
    else:
        answers = [Example(answer_prompt(r["question"]), r["answer"], r) for r in rows]
        whole = [Example(r["text"], None, r) for r in rows]
        max_length = MAX_LENGTH
    out = {}
    for key, examples in (("answer", answers), ("qa", whole)):
        total, tokens = example_loss(model, examples, adapter, batch_size=batch_size, max_length=max_length)
        out[f"{key}_perplexity"] = perplexity(total, tokens)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--document", default=str(DOCUMENT))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--queries", type=int, default=16, help="self-study questions trained on")
    parser.add_argument("--heldout", type=int, default=8, help="self-study questions held out")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 on a shared machine (2 threads on 2 oversubscribed cores ran 15x slower)",
    )
    parser.add_argument("--output", default="runs/selfstudy")
    parser.add_argument("--results", default=None, help="default: research/results/selfstudy-<model>.json")
    args = parser.parse_args(argv)
    out = own_output(Path(args.output) / args.model, "--output", "research.selfstudy")
    results = own_output(args.results or RESULTS / f"selfstudy-{args.model}.json", "--results", "research.selfstudy")
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = softprompt.load(args.model)
    document = read_context(args.document)
    doc_tokens = len(model.tokenizer(document_text(model, document), add_special_tokens=False)["input_ids"])
    teacher = add_teacher(model, "document", document, max_length=MAX_LENGTH)

    rows_path = out / "rows.jsonl"
    total = args.queries + args.heldout
    started = time.time()
    rows = saved_rows(rows_path, document, 0, total)
    if rows is None:
        rows = self_study_rows(
            model, document, teacher, queries=total, chunk_tokens=args.chunk_tokens, seed=0, batch_size=8
        )
        write_rows(rows_path, rows)
    generation_s = time.time() - started
    train_rows, heldout = rows[: -args.heldout], rows[-args.heldout :]
    write_rows(out / "train.jsonl", train_rows)
    write_rows(out / "heldout.jsonl", heldout)
    print(f"{len(train_rows)} training rows, {len(heldout)} held out ({generation_s:.0f} s to write)", flush=True)

    per_token = kv_bytes_per_token(model)
    question = answer_prompt(heldout[0]["question"])
    question_tokens = len(model.tokenizer(question)["input_ids"])
    conditions: dict[str, dict] = {}
    report = {
        "model": args.model,
        "document": args.document,
        "document_tokens": doc_tokens,
        "train_rows": len(train_rows),
        "heldout_rows": len(heldout),
        "epochs": args.epochs,
        "lr": args.lr,
        "self_study_s": generation_s,
        "question_tokens": question_tokens,
        "threads": args.threads,
        "conditions": conditions,
    }

    def record(name: str, row: dict) -> None:
        """Keep a condition's numbers and write the report so far (a run cut short keeps what it measured)."""
        conditions[name] = {**row, "kv_mib": (row["prefix_tokens"] + question_tokens) * per_token / 2**20}
        print(name, json.dumps(conditions[name]), flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=2) + "\n")

    record(
        "bare",
        {
            "prefix_tokens": 0,
            "prefill_s": prefill_seconds(model, question, None, args.reps),
            **perplexities(model, heldout, None, args.batch_size),
        },
    )
    record(
        "document",
        {
            "prefix_tokens": doc_tokens,
            "prefill_s": prefill_seconds(model, document_text(model, document) + question, None, args.reps),
            **perplexities(model, heldout, teacher.adapter, args.batch_size, teacher),
        },
    )
    for size in args.sizes:
        # The untrained start (the document's first tokens' keys/values): what training adds beyond it.
        start = f"start-{size}"
        init: dict = {}
        try:
            model.add_adapter(
                start, method="cartridge", num_virtual_tokens=size, init_text=document_text(model, document)
            )
        except SoftPromptError as exc:  # longer than a sliding-window layer keeps: no keys/values to start from
            print(f"{start}: {exc}; the cartridge starts random", flush=True)
            init = {"init": "random"}
        else:
            record(start, {"prefix_tokens": size, **perplexities(model, heldout, start, args.batch_size)})
            model.remove_adapter(start)
        name = f"cartridge-{size}"
        config = load_config(
            None,
            {
                "model": args.model,
                "name": name,
                "objective": "distill",
                "context": args.document,
                "data": str(out / "train.jsonl"),
                "validation_data": str(out / "heldout.jsonl"),
                "method": "cartridge",
                "num_virtual_tokens": size,
                "num_frozen_tokens": 1,
                **init,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "max_length": MAX_LENGTH,
                "eval_zero_shot": False,
                "output": str(out / name),
                "seed": 0,
            },
        )
        started = time.time()
        train(config, model=model)
        seconds = time.time() - started
        record(
            name,
            {
                "prefix_tokens": size,
                "train_s": seconds,
                "prefill_s": prefill_seconds(model, question, name, args.reps),
                **perplexities(model, heldout, name, args.batch_size),
            },
        )
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "| condition | prefix tokens | answer ppl | Q+A ppl | prefill ms | KV MiB / request | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["conditions"].items():
        train_s = f"{row['train_s']:.0f}" if "train_s" in row else ""
        prefill = f"{row['prefill_s'] * 1000:.0f}" if "prefill_s" in row else ""
        lines.append(
            f"| {name} | {row['prefix_tokens']} | {row['answer_perplexity']:.2f} | {row['qa_perplexity']:.2f} | "
            f"{prefill} | {row['kv_mib']:.1f} | {train_s} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
