"""Adapter files: round trips, training state, and one clear error for every broken input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt import AdapterMismatchError, SoftPromptError
from softprompt.adapters.peft_format import load_adapter, read_training_state

from tiny import tiny_model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("gpt2")
    model.add_adapter("a", method="prefix_tuning", num_virtual_tokens=4, prefix_projection=True, seed=0)
    model.save_adapter(
        "a", tmp_path / "a", training_state={"optimizer.step": torch.tensor(7)}, training_meta={"step": 7}
    )
    return model, tmp_path / "a"


def test_round_trip_gives_identical_outputs_and_small_files(saved):
    model, path = saved
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "softprompt.json",
        "training_state.json",
        "training_state.safetensors",
    ]
    assert (path / "adapter_model.safetensors").stat().st_size < 64 * 1024
    other = tiny_model("gpt2")
    other.load_adapter(str(path), name="b")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(other(ids, adapters="b").logits, model(ids, adapters="a").logits)


def test_training_state_restores_reparameterisation_and_extras(saved):
    model, path = saved
    other = tiny_model("gpt2")
    plain = load_adapter(other, path, name="plain")
    resumed = load_adapter(other, path, name="resumed", resume=True)
    assert not hasattr(plain, "transform")  # materialised table for inference
    original = model.adapters["a"].state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, original[key])
    tensors, meta = read_training_state(path)
    assert int(tensors["optimizer.step"]) == 7 and meta == {"step": 7}


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_table_without_reparameterisation_is_stored_once_and_still_resumes(method, tmp_path):
    model = tiny_model("gpt2")
    model.add_adapter("a", method=method, num_virtual_tokens=4, seed=0)
    with torch.no_grad():
        next(model.adapters["a"].parameters()).add_(0.25)  # trained weights, not a re-creatable start
    model.save_adapter("a", tmp_path / "a", training_state={"optimizer.step": torch.tensor(3)})
    tensors, _ = read_training_state(tmp_path / "a")
    assert not [k for k in load_file(tmp_path / "a" / "training_state.safetensors") if k.startswith("adapter.")]
    assert int(tensors["optimizer.step"]) == 3
    resumed = load_adapter(tiny_model("gpt2"), tmp_path / "a", name="r", resume=True)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, model.adapters["a"].state_dict()[key], rtol=0, atol=0)
    assert all(p.requires_grad for p in resumed.parameters())


def test_saving_keeps_other_files_in_the_directory(saved):
    model, path = saved
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    model.save_adapter("a", path)
    assert (path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_adapter_for_another_base_model_names_the_mismatch(saved, tmp_path):
    _, path = saved
    from transformers import GPT2Config, GPT2LMHeadModel

    from softprompt import SoftPromptModel

    from tiny import tiny_base, tiny_tokenizer

    wider = SoftPromptModel(
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=259)), tiny_tokenizer()
    )
    with pytest.raises(
        AdapterMismatchError, match=r"adapter_config.json: .*token width \(token_dim\) 32, this model has 48"
    ):
        wider.load_adapter(str(path))
    deeper = SoftPromptModel(
        GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=259)), tiny_tokenizer()
    )
    with pytest.raises(AdapterMismatchError, match=r"layers \(num_layers\) 2, this model has 3"):
        deeper.load_adapter(str(path))
    t5 = SoftPromptModel(tiny_base("t5"), tiny_tokenizer())
    with pytest.raises(AdapterMismatchError, match="task_type CAUSAL_LM, this model has SEQ_2_SEQ_LM"):
        t5.load_adapter(str(path))
    # the error names the base model the adapter records, so the user knows which --model it needs
    named = tmp_path / "named"
    shutil.copytree(path, named)
    meta = json.loads((named / "softprompt.json").read_text())
    (named / "softprompt.json").write_text(json.dumps({**meta, "base_model": "smollm2-135m"}))
    with pytest.raises(AdapterMismatchError, match=r"this model has 3 \(it was trained on smollm2-135m\)$"):
        deeper.load_adapter(str(named))


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: _edit_config(p, peft_type="LORA"), "unknown method peft_type='LORA'"),
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json: missing"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "adapter_config.json: not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda p: _edit_config(p, tokenizer_kwargs={"trust_remote_code": True}), "trust_remote_code"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(
                (p / "adapter_model.safetensors").read_bytes()[:40]
            ),
            "checksum does not match",
        ),
        (
            lambda p: (
                (p / "softprompt.json").unlink(),
                (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:40]),
            ),
            "truncated or corrupt",
        ),
        (
            lambda p: (
                (p / "softprompt.json").unlink(),
                save_file({"other": torch.zeros(2)}, str(p / "adapter_model.safetensors")),
            ),
            "no 'prompt_embeddings' tensor",
        ),
        (
            lambda p: (
                (p / "softprompt.json").unlink(),
                save_file({"prompt_embeddings": torch.zeros(3, 5)}, str(p / "adapter_model.safetensors")),
            ),
            "prompt_embeddings shape",
        ),
    ],
)
def test_broken_adapter_files_give_one_clear_error(saved, breakage, message):
    _, path = saved
    breakage(path)
    with pytest.raises(SoftPromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model("gpt2").load_adapter(str(path))


def test_pickled_weights_are_refused_without_loading(saved):
    _, path = saved
    (path / "adapter_model.safetensors").unlink()
    (path / "softprompt.json").unlink()
    marker = path / "executed"
    # A pickle that would create a file if it were ever unpickled.
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(SoftPromptError, match="pickled weights are never loaded"):
        tiny_model("gpt2").load_adapter(str(path))
    assert not marker.exists()


def test_missing_directory_and_file_instead_of_directory(tmp_path):
    with pytest.raises(SoftPromptError, match="no such adapter directory"):
        tiny_model("gpt2").load_adapter(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SoftPromptError, match="got a file"):
        tiny_model("gpt2").load_adapter(str(tmp_path / "file"))


def test_p_tuning_lstm_dropout_never_leaks_into_the_saved_table():
    model = tiny_model("gpt2")
    adapter = model.add_adapter(
        "p",
        method="p_tuning",
        num_virtual_tokens=4,
        encoder_type="lstm",
        encoder_num_layers=2,
        encoder_dropout=0.5,
        seed=0,
    )
    adapter.train()
    first, second = adapter.materialized(), adapter.materialized()
    torch.testing.assert_close(first, second)
    assert adapter.training  # the mode is restored
    adapter.eval()
    torch.testing.assert_close(adapter.materialized(), first)
