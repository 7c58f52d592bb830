"""The training loop on tiny random models: learning, frozen base, files, resume, multi-adapter, early stopping."""

import json

import pytest
import torch
from safetensors.torch import load_file

from softprompt.cli import main
from softprompt.data import Example
from softprompt.errors import ConfigError
from softprompt.training.batches import Encoded, encode_example, epoch_groups
from softprompt.training.config import load_config
from softprompt.training.loop import train

from tiny import save_tiny_checkpoint, tiny_model
from toy_data import Interrupt, records, toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ a learnable task


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    data = write_csv(tmp / "toy.csv", toy_rows(64))
    config = load_config(
        None,
        {
            "data": data,
            "label_column": "label",
            "method": "prefix_tuning",
            "init": "random",
            "num_virtual_tokens": 4,
            "lr": 1.0,
            "lr_schedule": "constant",
            "epochs": 8,
            "batch_size": 8,
            "val_fraction": 0.25,
            "eval_every": 2,
            "log_every": 1,
            "output": str(tmp / "out"),
            "seed": 0,
        },
    )
    # init random: lr 1.0 and the step count are tuned to PEFT's N(0, 1) start on this random-weight model.
    model = tiny_model("bloom")
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    model.add_adapter("probe", method="prompt_tuning", num_virtual_tokens=2, seed=0)  # not in the job
    probe_before = model.adapters["probe"].embedding.detach().clone()
    result = train(config, model=model, progress=False)
    return config, model, result, base_before, probe_before


def test_loss_goes_down_and_held_out_accuracy_beats_zero_shot(toy_run):
    _, _, result, _, _ = toy_run
    train_losses = [r["loss"] for r in records(result.output) if r["type"] == "train"]
    assert len(train_losses) == result.steps == 8 * 6  # 48 training rows, batches of 8, 8 epochs
    first, last = sum(train_losses[:6]) / 6, sum(train_losses[-6:]) / 6
    assert last < first - 0.2
    best, zero_shot = result.adapters["default"].best, result.adapters["default"].zero_shot
    assert best["n"] == zero_shot["n"] == 16  # 25% of 64 rows held out
    assert best["accuracy"] >= 0.8
    assert best["accuracy"] > zero_shot["accuracy"] + 0.2
    assert best["val_loss"] < zero_shot["val_loss"]


def test_only_adapter_parameters_change(toy_run):
    _, model, _, base_before, probe_before = toy_run
    after = model.base.state_dict()
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)
    assert torch.equal(model.adapters["probe"].embedding, probe_before)  # another adapter on the model: untouched
    assert not torch.equal(
        model.adapters["default"].materialized(),
        tiny_model("bloom")
        .add_adapter("x", method="prefix_tuning", num_virtual_tokens=4, init="random", seed=0)
        .materialized(),
    )  # it moved


def test_files_written(toy_run):
    config, model, result, _, _ = toy_run
    out = result.output
    best = out / "default"
    for name in ("adapter_config.json", "adapter_model.safetensors", "softprompt.json", "training_state.json"):
        assert (best / name).is_file(), name
        assert (best / "checkpoints" / "last" / name).is_file(), name
    assert json.loads((best / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    for png in (out / "loss_curve.png", best / "loss_curve.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = load_config(out / "config.yaml")
    assert reloaded.lr == 1.0 and reloaded.model == "tiny-bloom" and reloaded.data == config.data
    evals = [r for r in records(out) if r["type"] == "eval"]
    assert [(r["model"], r["epoch"]) for r in evals] == [
        ("base", 0),
        ("adapter", 2),
        ("adapter", 4),
        ("adapter", 6),
        ("adapter", 8),
    ]
    # the saved best adapter is the one with the best validation accuracy, and the model now holds it
    meta = json.loads((best / "training_state.json").read_text())
    assert meta["metrics"]["accuracy"] == max(r["accuracy"] for r in evals if r["model"] == "adapter")
    saved = load_file(best / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(model.adapters["default"].materialized(), saved)


# -------------------------------------------------------------------------------------------- resume


def resume_config(tmp_path, output, **extra):
    a = write_csv(tmp_path / "a.csv", toy_rows(20, seed=1))
    b = write_csv(tmp_path / "b.csv", toy_rows(16, seed=2, labels=("yes", "no")))
    return load_config(
        None,
        {
            "data": a,
            "label_column": "label",
            "method": "p_tuning",
            "encoder_type": "lstm",
            "encoder_dropout": 0.3,
            "encoder_hidden_size": 8,
            "num_virtual_tokens": 3,
            "epochs": 3,
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 0.05,
            "warmup_ratio": 0.2,
            "lr_schedule": "cosine",
            "weight_decay": 0.01,
            "val_fraction": 0.25,
            "log_every": 1,
            "output": str(output),
            "seed": 3,
            "adapters": [{"name": "ptune"}, {"name": "pt", "data": b, "method": "prompt_tuning", "lr": 0.1}],
            **extra,
        },
    )


def test_resume_after_interruption_is_bit_identical(tmp_path):
    full = train(resume_config(tmp_path, tmp_path / "full"), model=tiny_model("llama"), progress=False)
    assert full.steps == 3 * 4  # 15 + 12 training rows: 7 batches of 4, 4 optimizer steps of 2 batches per epoch

    def crash_at(step):
        def on_step(info):
            if info.step == step:
                raise Interrupt

        return on_step

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):  # the latest state is saved every 2 steps: step 7 is lost and redone
        train(
            resume_config(tmp_path, out, save_every=2), model=tiny_model("llama"), on_step=crash_at(7), progress=False
        )
    last = json.loads((out / "pt" / "checkpoints" / "last" / "training_state.json").read_text())
    assert (last["state"]["step"], last["state"]["epoch"], last["state"]["group"]) == (6, 1, 2)  # mid-epoch
    with pytest.raises(Interrupt):  # interrupted again, after resuming
        train(
            resume_config(tmp_path, out, save_every=2, resume=True),
            model=tiny_model("llama"),
            on_step=crash_at(11),
            progress=False,
        )
    resumed = train(resume_config(tmp_path, out, resume=True), model=tiny_model("llama"), progress=False)
    assert resumed.steps == full.steps
    for name in ("ptune", "pt"):
        for sub in ("", "checkpoints/last/"):
            a = load_file(tmp_path / "full" / name / f"{sub}training_state.safetensors")
            b = load_file(out / name / f"{sub}training_state.safetensors")
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (name, sub)
        assert (tmp_path / "full" / name / "adapter_model.safetensors").read_bytes() == (
            out / name / "adapter_model.safetensors"
        ).read_bytes()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records(out)) == strip(records(tmp_path / "full"))


def test_resume_with_another_config_names_the_flag(tmp_path):
    config = resume_config(tmp_path, tmp_path / "out", epochs=1, adapters=[])
    train(config, model=tiny_model("gpt2"), progress=False)
    changed = resume_config(tmp_path, tmp_path / "out", epochs=1, adapters=[], lr=0.2, resume=True)
    with pytest.raises(ConfigError, match="--lr"):
        train(changed, model=tiny_model("gpt2"), progress=False)
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train(
            resume_config(tmp_path, tmp_path / "empty", adapters=[], resume=True),
            model=tiny_model("gpt2"),
            progress=False,
        )


# -------------------------------------------------------------------------------------- multi-adapter


def test_two_adapters_each_learn_only_from_their_own_rows(tmp_path):
    texts = [row["text"] for row in toy_rows(40, seed=5)]
    yes = write_csv(tmp_path / "yes.csv", [{"text": t, "label": "Y"} for t in texts])
    no = write_csv(tmp_path / "no.csv", [{"text": t, "label": "N"} for t in texts])  # same texts, other answer
    config = load_config(
        None,
        {
            "label_column": "label",
            "verbalizer": {"Y": "Y", "N": "N"},
            "epochs": 3,
            "batch_size": 8,
            "val_fraction": 0.2,
            "lr_schedule": "constant",
            "log_every": 1,
            "output": str(tmp_path / "out"),
            "method": "prefix_tuning",
            "num_virtual_tokens": 4,
            "adapters": [{"name": "say-yes", "data": yes, "lr": 1.0}, {"name": "say-no", "data": no, "lr": 0.5}],
        },
    )
    model = tiny_model("bloom")
    result = train(config, model=model, progress=False)
    zero_shot = [result.adapters[n].zero_shot["accuracy"] for n in ("say-yes", "say-no")]
    assert sum(zero_shot) == 1.0  # same validation texts: the bare model is right for one adapter or the other
    assert result.adapters["say-yes"].best["accuracy"] == 1.0
    assert result.adapters["say-no"].best["accuracy"] == 1.0
    held_out = ["xyzzy", "abcab", "zzzzz"]
    assert [s.label for s in model.score(held_out, labels=["Y", "N"], adapters="say-yes")] == ["Y"] * 3
    assert [s.label for s in model.score(held_out, labels=["Y", "N"], adapters="say-no")] == ["N"] * 3
    lrs = [r["lr"] for r in records(result.output) if r["type"] == "train"]
    assert lrs[0] == {"say-yes": 1.0, "say-no": 0.5}  # one param group per adapter, each with its own lr
    for name in ("say-yes", "say-no"):
        assert (result.output / name / "adapter_model.safetensors").is_file()


def test_epoch_batches_mix_adapters_in_a_seeded_order():
    items = [Encoded([i], [i], "a" if i < 10 else "b") for i in range(20)]
    groups = epoch_groups(items, epoch=0, seed=0, batch_size=4, grad_accum=2)
    assert [len(g) for g in groups] == [2, 2, 1]  # 5 batches of 4, 2 per optimizer step
    batches = [b for g in groups for b in g]
    assert sorted(it.input_ids[0] for b in batches for it in b) == list(range(20))
    assert any(len({it.adapter for it in b}) == 2 for b in batches)  # rows of both adapters share a batch
    again = epoch_groups(items, epoch=0, seed=0, batch_size=4, grad_accum=2)
    other = epoch_groups(items, epoch=1, seed=0, batch_size=4, grad_accum=2)
    order = lambda gs: [it.input_ids[0] for g in gs for b in g for it in b]  # noqa: E731
    assert order(again) == order(groups) and order(other) != order(groups)


# -------------------------------------------------------------------------------------- early stopping


def test_early_stopping_triggers(tmp_path):
    rows = toy_rows(24, seed=7)
    data = write_csv(tmp_path / "train.csv", rows)
    flipped = [{"text": r["text"], "label": "B" if r["label"] == "A" else "A"} for r in toy_rows(8, seed=8)]
    val = write_csv(tmp_path / "val.csv", flipped)  # the opposite rule: validation gets worse as training goes
    config = load_config(
        None,
        {
            "data": data,
            "validation_data": val,
            "label_column": "label",
            "method": "prefix_tuning",
            "num_virtual_tokens": 4,
            "lr": 0.3,
            "lr_schedule": "constant",
            "epochs": 20,
            "batch_size": 8,
            "early_stopping_patience": 2,
            "output": str(tmp_path / "out"),
            "eval_zero_shot": False,
        },
    )
    result = train(config, model=tiny_model("gpt2"), progress=False)
    assert result.adapters["default"].stopped_early
    assert result.epochs < 20
    stops = [r for r in records(result.output) if r["type"] == "early_stop"]
    assert len(stops) == 1 and stops[0]["epoch"] == result.epochs
    evals = [r for r in records(result.output) if r["type"] == "eval"]
    best_epoch = result.adapters["default"].best["epoch"]
    assert len([r for r in evals if r["epoch"] > best_epoch]) == 2  # exactly `patience` evaluations after the best


# ------------------------------------------------------------------------------ other tasks and models


def test_language_modelling_without_labels(tmp_path):
    rows = [{"text": "the cat sat on the mat " * 2}] * 1 + [{"text": f"the cat sat on mat {i}"} for i in range(15)]
    data = write_csv(tmp_path / "lm.csv", rows)
    config = load_config(
        None,
        {
            "data": data,
            "epochs": 4,
            "batch_size": 4,
            "lr": 0.3,
            "lr_schedule": "constant",
            "val_fraction": 0.25,
            "output": str(tmp_path / "out"),
            "num_virtual_tokens": 4,
            "method": "prefix_tuning",
        },
    )
    result = train(config, model=tiny_model("bloom"), progress=False)
    best, zero_shot = result.adapters["default"].best, result.adapters["default"].zero_shot
    assert "accuracy" not in best
    assert best["perplexity"] < zero_shot["perplexity"]


def test_seq2seq_and_bf16(tmp_path):
    data = write_csv(tmp_path / "toy.csv", toy_rows(16))
    config = load_config(
        None,
        {
            "data": data,
            "label_column": "label",
            "epochs": 2,
            "batch_size": 4,
            "bf16": True,
            "val_fraction": 0.25,
            "output": str(tmp_path / "out"),
            "log_every": 1,
        },
    )
    result = train(config, model=tiny_model("t5"), progress=False)
    losses = [r["loss"] for r in records(result.output) if r["type"] == "train"]
    assert len(losses) == 6 and all(0 < loss < 20 for loss in losses)
    assert (result.output / "default" / "adapter_model.safetensors").is_file()
    assert json.loads((result.output / "default" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_example_encoding():
    tok = tiny_model("gpt2").tokenizer
    ids, labels = encode_example(tok, Example("ab: ", "yes", {}), seq2seq=False, max_length=64)
    label = tok("yes", add_special_tokens=False)["input_ids"]
    prompt = tok("ab: ")["input_ids"]
    assert ids == prompt + label + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + label + [tok.eos_token_id]
    ids, labels = encode_example(tok, Example("abcdefgh", "yes", {}), seq2seq=False, max_length=6)
    assert len(ids) == 6 and tok.decode(ids[:2]) == "gh"  # long prompts keep their end, the label stays whole
    ids, labels = encode_example(tok, Example("ab: ", "yes", {}), seq2seq=True, max_length=64)
    assert ids == prompt and labels == label + [tok.eos_token_id]
    ids, labels = encode_example(tok, Example("hello", None, {}), seq2seq=False, max_length=64)
    assert ids == labels == tok("hello")["input_ids"] + [tok.eos_token_id]
    with pytest.raises(ConfigError, match="--label-column"):
        encode_example(tok, Example("hello", None, {}), seq2seq=True, max_length=64)


def test_bfloat16_base_weights_train_float32_adapters(tmp_path):
    """--dtype bfloat16: the frozen weights are stored in bfloat16; the adapter, its gradients, optimizer state and
    the loss stay float32, and the saved adapter is float32."""
    checkpoint = save_tiny_checkpoint("llama", tmp_path / "base")
    data = write_csv(tmp_path / "toy.csv", toy_rows(24))
    config = load_config(
        None,
        {
            "model": checkpoint,
            "data": data,
            "label_column": "label",
            "dtype": "bfloat16",
            "epochs": 1,
            "batch_size": 4,
            "log_every": 1,
            "output": str(tmp_path / "out"),
            "eval_zero_shot": False,
        },
    )
    result = train(config, progress=False)
    model = result.model
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.get_adapter("default").parameters()} == {torch.float32}
    losses = [r["loss"] for r in records(tmp_path / "out") if r.get("type") == "train"]
    assert losses and all(loss == loss for loss in losses)  # finite, not NaN
    saved = load_file(str(tmp_path / "out" / "default" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    with pytest.raises(ConfigError, match="--dtype: expected one of float32, bfloat16, float16"):
        load_config(None, {"model": checkpoint, "data": data, "dtype": "int4"}).validate()
    # eval and predict take the same flag for the frozen base.
    adapter = str(tmp_path / "out" / "default")
    assert (
        main(["eval", "--model", checkpoint, "--adapter", adapter, "--data", data, "--dtype", "bfloat16", "--json"])
        == 0
    )
    predictions = tmp_path / "predictions.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                checkpoint,
                "--adapter",
                adapter,
                "--data",
                data,
                "--dtype",
                "bfloat16",
                "--output",
                str(predictions),
            ]
        )
        == 0
    )
    assert len(predictions.read_text().splitlines()) == 25  # a header and one line per row
