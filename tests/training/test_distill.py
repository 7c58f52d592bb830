"""--objective distill: a cartridge learns to predict like the frozen model reading a document (self-study)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import Gemma3ForCausalLM

from softprompt import SoftPromptModel
from softprompt.cli.app import main
from softprompt.data import Example
from softprompt.data.selfstudy import self_study_rows
from softprompt.training.batches import collate, encode_examples
from softprompt.training.config import load_config
from softprompt.training.distill import DistillLoss, add_teacher, document_text, kl_loss
from softprompt.training.loop import train

from serving import lively_model
from tiny import save_tiny_checkpoint, tiny_base, tiny_tokenizer
from toy_data import toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; the cores are shared

DOCUMENT = "The river Quell runs north from the Amber hills to Port Lannis. Its ferry costs three coins.\n"


def batch(model, texts):
    items = encode_examples(model, [Example(t, None, {}) for t in texts], "student", 64)
    return collate(items, 0)


def test_kl_is_zero_when_the_cartridge_is_the_document_s_own_keys_and_values():
    model = lively_model("llama")
    teacher = add_teacher(model, "student", DOCUMENT, max_length=64)
    tokens = model.get_adapter(teacher.adapter).config.num_virtual_tokens
    objective = DistillLoss({"student": teacher})
    ids, mask, labels, names = batch(model, ["Question: where? Answer: north", "How much is the ferry?"])
    # A cartridge started from the whole document is the teacher's prefix: same logits, KL exactly 0.
    model.add_adapter(
        "student", method="cartridge", num_virtual_tokens=tokens, init_text=document_text(model, DOCUMENT)
    )
    out = objective(model, ids, mask, names, labels)
    assert out.label_logits.shape[0] == int((labels != -100).sum()) - 2  # a kv prefix does not predict token 0
    assert abs(out.loss.item()) < 1e-6
    # A shorter cartridge (the document's first tokens, the paper's start) differs from the teacher.
    model.remove_adapter("student")
    model.add_adapter("student", method="cartridge", num_virtual_tokens=8, init_text=DOCUMENT)
    assert objective(model, ids, mask, names, labels).loss.item() > 1e-3


def test_kl_loss_is_the_mean_over_tokens_of_kl_teacher_to_student():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    p = teacher.softmax(-1)
    want = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(kl_loss(student, teacher), want, atol=1e-6)


def test_self_study_rows_are_seeded_and_reproducible():
    model = lively_model("llama")
    teacher = add_teacher(model, "c", DOCUMENT, max_length=64)
    make = lambda seed: self_study_rows(model, DOCUMENT, teacher, queries=4, chunk_tokens=24, seed=seed)  # noqa: E731
    first = make(0)
    assert len(first) == 4 and first == make(0)
    assert [r["question"] for r in first] != [r["question"] for r in make(1)]
    assert all(r["text"] == f"Question: {r['question']}\nAnswer:{r['answer']}" for r in first)
    assert len({r["question"] for r in first}) == 4  # no duplicate leaks from training into held-out rows


def test_distill_trains_the_cartridge_and_saves_its_self_study_rows(tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    values = {
        "objective": "distill",
        "context": str(tmp_path / "doc.txt"),
        "method": "cartridge",
        "num_virtual_tokens": 6,
        "synthetic_queries": 8,
        "chunk_tokens": 32,
        "epochs": 3,
        "batch_size": 4,
        "lr": 0.05,
        "max_length": 48,
        "val_fraction": 0.25,
        "log_every": 1,
        "output": str(tmp_path / "run"),
    }
    model = lively_model("llama")
    losses: list[float] = []
    result = train(load_config(None, values), model=model, on_step=lambda s: losses.append(s.loss), progress=False)
    assert losses[-1] < losses[0]
    assert list(model.adapters) == ["default"]  # the teacher is gone once training ends
    saved = tmp_path / "run" / "selfstudy" / "default.jsonl"
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 8 and result.adapters["default"].best["n"] == 2
    # A rerun reads the saved rows back instead of writing new ones (and they are what it trains on).
    saved.write_text("".join(json.dumps({**r, "text": r["text"] + " again"}) + "\n" for r in rows))
    again = train(
        load_config(None, {**values, "output": str(tmp_path / "run"), "resume": False}),
        model=lively_model("llama"),
        progress=False,
    )
    assert again.adapters["default"].best is not None
    assert all(r["text"].endswith(" again") for r in map(json.loads, saved.read_text().splitlines()))


@pytest.mark.parametrize(
    "document, extra, expected",
    [
        ("  \n", {}, "is empty"),
        ("x" * 300, {}, "context window of 256 tokens"),
        (DOCUMENT, {"--method": "prompt_tuning"}, "--objective: distill trains key/value methods"),
        (DOCUMENT, {"--objective": "lm", "--data": "TOY"}, "--context: is only read with --objective distill"),
        (None, {}, "--context"),
        (DOCUMENT, {"--kfold": "3"}, "--kfold: cross-validation trains with --objective lm"),
    ],
)
def test_bad_distill_input_is_one_line(document, extra, expected, tmp_path, capsys):
    path = save_tiny_checkpoint("llama", tmp_path / "model")
    args = {"--model": path, "--objective": "distill", "--method": "cartridge", "--output": str(tmp_path / "run")}
    if document is not None:
        (tmp_path / "doc.txt").write_text(document)
        args["--context"] = str(tmp_path / "doc.txt")
    args.update(extra)
    if args.get("--data") == "TOY":
        args["--data"] = write_csv(tmp_path / "toy.csv", toy_rows(8))
    capsys.readouterr()
    assert main(["train", *(w for pair in args.items() for w in pair)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(err) == 1 and expected in err[0], err


def sliding_model(window: int) -> SoftPromptModel:
    """A tiny Gemma 3 (its tokenizer adding a beginning-of-sequence token, as Gemma's does) whose first layer
    keeps a sliding window of ``window`` tokens and whose second attends globally."""
    config = copy.deepcopy(tiny_base("gemma3").config)
    config.sliding_window, config.layer_types = window, ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    return SoftPromptModel(Gemma3ForCausalLM(config), tiny_tokenizer(bos=True), name_or_path="tiny-gemma3-sliding")


def test_a_sliding_window_teacher_rereads_the_document_and_gives_the_cached_teacher_s_loss():
    # Both apply (the 40-token window holds the document): re-reading it per row is the cached prefix's loss.
    model = sliding_model(40)
    document = "The river Quell runs north."
    cached = add_teacher(model, "student", document, max_length=32)
    reread = add_teacher(model, "student", document, max_length=32, reread=True)
    assert cached.adapter == "student-teacher" and reread.adapter is None and len(cached.ids) < 40
    model.add_adapter("student", method="cartridge", num_virtual_tokens=4, init_text="ferry coins")
    ids, mask, labels, names = batch(model, ["Question: where? Answer: north", "How much is it, the ferry?"])
    a = DistillLoss({"student": cached})(model, ids, mask, names, labels)
    b = DistillLoss({"student": reread})(model, ids, mask, names, labels)
    assert a.loss.item() > 1e-3 and abs(a.loss.item() - b.loss.item()) < 1e-5
    assert torch.allclose(a.label_logits, b.label_logits)
    # A document longer than the window: the cache cannot hold it, so the teacher re-reads it, and it sees
    # the whole document (its first tokens change the answer) where the cached prefix would have lost them.
    short = sliding_model(12)
    assert add_teacher(short, "s", "y" * 30, max_length=32).adapter is None and list(short.adapters) == []
    first, other = (add_teacher(short, "s", f"{w} " + "y" * 30, max_length=32) for w in ("ab", "cd"))
    short.add_adapter("student", method="cartridge", num_virtual_tokens=4, init="random")
    out = [DistillLoss({"student": t})(short, ids, mask, names, labels).loss.item() for t in (first, other)]
    assert abs(out[0] - out[1]) > 1e-6


def test_distill_trains_a_cartridge_on_a_sliding_window_model_with_self_study(tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)  # longer than the 16-token window
    values = {
        "objective": "distill",
        "context": str(tmp_path / "doc.txt"),
        "method": "cartridge",
        "num_virtual_tokens": 6,
        "synthetic_queries": 6,
        "chunk_tokens": 32,
        "epochs": 2,
        "batch_size": 3,
        "lr": 0.05,
        "max_length": 48,
        "val_fraction": 0.34,
        "log_every": 1,
        "output": str(tmp_path / "run"),
    }
    model = sliding_model(16)
    losses: list[float] = []
    train(load_config(None, values), model=model, on_step=lambda s: losses.append(s.loss), progress=False)
    assert losses[-1] < losses[0] and list(model.adapters) == ["default"]
    rows = (tmp_path / "run" / "selfstudy" / "default.jsonl").read_text().splitlines()
    assert len(rows) == 6
