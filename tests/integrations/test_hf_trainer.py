"""Training a softprompt adapter through transformers' Trainer and TRL's SFTTrainer, on a tiny random Llama:
the loss falls, the saved adapter loads in PEFT and in softprompt, checkpoints resume exactly, and
load_best_model_at_end (with early stopping) restores the best adapter."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from softprompt import SoftPromptError, SoftPromptModel
from softprompt.integrations.hf import SaveAdapterCallback, TrainableAdapter

from tiny import save_tiny_checkpoint, tiny_base, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [("Q: is it? A:", " yes"), ("Q: really? A:", " no"), ("Q: sure? A:", " yes"), ("Q: why? A:", " no")]
N_TOKENS = 4
# (trainer, method): the plain Trainer with a reparameterised method (its MLP must survive checkpoints), TRL
# with a key/value prefix (TRL's fused LM head reads the hidden states after it).
KINDS = [("trainer", "p_tuning"), ("sft", "prefix_tuning")]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def base_model():
    """A tiny Llama with large weights: random near-zero weights give near-uniform outputs no prompt can move."""
    base = tiny_base("llama")
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(25)
    return base


def new_model(method: str) -> SoftPromptModel:
    model = SoftPromptModel(base_model(), tiny_tokenizer(), name_or_path="tiny-llama")
    extra = {"encoder_hidden_size": 16} if method == "p_tuning" else {}
    model.add_adapter("a", method=method, num_virtual_tokens=N_TOKENS, seed=0, **extra)
    return model


def tokenized(tokenizer) -> Dataset:
    rows = []
    for prompt, completion in PAIRS * 2:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return Dataset.from_list(rows)


def make_trainer(kind: str, model: SoftPromptModel, out: Path, callbacks=(), **options):
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=0.1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        save_strategy="steps",
    )
    settings.update(options)
    trainable = TrainableAdapter(model, "a")
    callbacks = [SaveAdapterCallback(), *callbacks]
    if kind == "trainer":
        data = tokenized(model.tokenizer)
        return Trainer(
            model=trainable,
            args=TrainingArguments(**settings),
            train_dataset=data,
            eval_dataset=data,
            data_collator=DataCollatorForSeq2Seq(model.tokenizer, label_pad_token_id=-100),
            callbacks=callbacks,
        )
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS * 2])
    return SFTTrainer(
        model=trainable,
        args=SFTConfig(**settings, gradient_checkpointing=False),
        train_dataset=data,
        eval_dataset=data,
        processing_class=model.tokenizer,
        callbacks=callbacks,
    )


def adapter_state(model: SoftPromptModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_adapter("a").state_dict().items()}


def assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


IDS = torch.tensor([[20, 30, 40, 50, 60], [21, 31, 41, 51, 61]])


@pytest.mark.parametrize("kind,method", KINDS)
def test_loss_falls_and_the_adapter_loads_in_peft_and_softprompt(kind, method, tmp_path):
    model = new_model(method)
    trainer = make_trainer(kind, model, tmp_path / "run", max_steps=8, save_steps=4)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before - 0.5

    trainer.model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    model.eval()
    with torch.no_grad():
        ours = model(IDS, adapters="a").logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model.base), tmp_path / "adapter").eval()
        peft_logits = peft_model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
        peft_logits = peft_logits if method == "prefix_tuning" else peft_logits[:, N_TOKENS:]
        torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=1e-4)

        fresh = SoftPromptModel(base_model(), tiny_tokenizer(), name_or_path="tiny-llama")
        fresh.load_adapter(str(tmp_path / "adapter"), name="a")
        torch.testing.assert_close(fresh(IDS, adapters="a").logits, ours)
        # Every checkpoint holds PEFT's files too, and loads.
        fresh.load_adapter(str(tmp_path / "run" / "checkpoint-4"), name="mid")
        assert fresh(IDS, adapters="mid").logits.shape == ours.shape
        # from_pretrained keeps the training state: the reparameterisation trains on from where it was.
        again = TrainableAdapter.from_pretrained(fresh, tmp_path / "adapter", name="b")
        assert_same_state(again.state_dict(), trainer.model.state_dict())


@pytest.mark.parametrize("kind,method", KINDS)
def test_a_checkpoint_resumes_to_the_same_adapter(kind, method, tmp_path):
    straight = new_model(method)
    make_trainer(kind, straight, tmp_path / "straight", max_steps=4, save_steps=2).train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").stat().st_size < 256 * 1024  # the adapter only, never the base

    resumed = new_model(method)
    make_trainer(kind, resumed, tmp_path / "resumed", max_steps=4, save_steps=2).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert_same_state(adapter_state(resumed), adapter_state(straight))


@pytest.mark.parametrize("kind,method", KINDS)
def test_best_adapter_is_reloaded_at_the_end_and_early_stopping_stops(kind, method, tmp_path):
    # "Best" is the highest eval loss here, so the best checkpoint is the first one and training, whose loss
    # falls, gets worse at once: early stopping ends it after one more evaluation.
    model = new_model(method)
    trainer = make_trainer(
        kind,
        model,
        tmp_path / "run",
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
        max_steps=6,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-1"
    first = load_file(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    assert_same_state(trainer.model.state_dict(), first)
    assert not torch.equal(
        first["adapter." + next(iter(adapter_state(model)))], last["adapter." + next(iter(adapter_state(model)))]
    )


def test_what_cannot_work_says_so(tmp_path):
    # Packed / padding-free rows share one sequence, but every row needs its own prompt.
    with pytest.raises(SoftPromptError, match="padding-free or packed"):
        make_trainer("sft", new_model("prompt_tuning"), tmp_path / "packed", max_steps=1, packing=True).train()


def test_gradient_checkpointing_in_the_training_arguments_checkpoints_the_engine_with_the_same_result(tmp_path):
    plain, checkpointed = new_model("prefix_tuning"), new_model("prefix_tuning")
    make_trainer("trainer", plain, tmp_path / "plain", max_steps=2).train()
    make_trainer("trainer", checkpointed, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True).train()
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    initial = adapter_state(new_model("prefix_tuning"))
    for key, value in adapter_state(plain).items():
        torch.testing.assert_close(adapter_state(checkpointed)[key], value, atol=1e-5, rtol=0)
        assert (value - initial[key]).abs().max() > 1e-3  # the two steps moved the adapter


@pytest.mark.parametrize("script", ["train_with_hf_trainer.py", "train_with_trl.py"])
def test_examples_run_on_a_local_checkpoint(script, tmp_path):
    checkpoint = save_tiny_checkpoint("llama", tmp_path / "tiny")
    out = tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--model",
            checkpoint,
            "--output",
            str(out),
            "--max-steps",
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    model = SoftPromptModel(tiny_base("llama"), tiny_tokenizer())
    model.load_adapter(str(out / "adapter"), name="sentiment")
    assert model.get_adapter("sentiment").num_virtual_tokens == 8
