"""Exporting input-method adapters as prompt embeddings (vLLM's prompt-embeddings input): file format and meaning."""

import base64
import io

import pytest
import torch
from safetensors import safe_open

from softprompt import SoftPromptError
from softprompt.adapters.export import (
    FORMAT,
    build_prompt_embeds,
    encode_for_vllm,
    export_prompt_embeddings,
    prompt_embeddings,
    read_metadata,
)

from serving import lively_model
from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    m = lively_model("gpt2")
    m.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=0)
    m.add_adapter("ptune", method="p_tuning", num_virtual_tokens=5, seed=1)
    m.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=3, seed=2)
    return m


@pytest.mark.parametrize("name, n, method", [("pt", 4, "prompt_tuning"), ("ptune", 5, "p_tuning")])
def test_safetensors_file_holds_prompt_embeds_and_metadata(model, tmp_path, name, n, method):
    model.save_adapter(name, tmp_path / name)
    expected = model.adapters[name].input_embeddings().detach().float()
    from_model = export_prompt_embeddings(model, tmp_path / "a.safetensors", name)
    from_dir = export_prompt_embeddings(tmp_path / name, tmp_path / "b.safetensors")
    for path in (from_model, from_dir):
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()) == ["prompt_embeds"]
            table = f.get_tensor("prompt_embeds")
        assert table.shape == (n, 32) and table.dtype == torch.float32
        assert torch.allclose(table, expected, atol=1e-6)
        meta = read_metadata(path)
        assert meta["format"] == FORMAT and meta["method"] == method
        assert (meta["num_virtual_tokens"], meta["hidden_size"], meta["dtype"]) == (str(n), "32", "float32")


def test_pt_file_and_dtype(model, tmp_path):
    path = export_prompt_embeddings(model, tmp_path / "pt.pt", "pt", dtype="bfloat16")
    table = torch.load(path, weights_only=True)
    assert table.dtype == torch.bfloat16 and table.shape == (4, 32)
    assert torch.allclose(table.float(), model.adapters["pt"].input_embeddings().detach(), atol=1e-2)
    with pytest.raises(SoftPromptError, match="dtype"):
        export_prompt_embeddings(model, tmp_path / "x.pt", "pt", dtype="int8")
    with pytest.raises(SoftPromptError, match=".safetensors or .pt"):
        export_prompt_embeddings(model, tmp_path / "x.bin", "pt")


def test_prefix_tuning_cannot_be_exported(model, tmp_path):
    with pytest.raises(SoftPromptError, match="prefix-tuning.*input embeddings"):
        export_prompt_embeddings(model, tmp_path / "p.safetensors", "prefix")
    model.save_adapter("prefix", tmp_path / "prefix")
    with pytest.raises(SoftPromptError, match="prefix-tuning"):
        export_prompt_embeddings(tmp_path / "prefix", tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_encoder_decoder_files_export_the_first_copy_of_the_rows(tmp_path):
    t5 = tiny_model("t5")
    t5.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    t5.save_adapter("pt", tmp_path / "pt")  # PEFT keeps [2n, hidden] for encoder-decoder models
    table, info = prompt_embeddings(tmp_path / "pt")
    assert table.shape == (3, 32) and info["method"] == "prompt_tuning"
    assert torch.allclose(table, t5.adapters["pt"].input_embeddings().detach())


@pytest.mark.parametrize("name", ["pt", "ptune"])
def test_prompt_embeds_reproduce_the_served_next_token_logits(model, name):
    """What an engine computes from the exported embeddings equals what softprompt computes for the adapter."""
    text = "The exported prompt"
    embeds = build_prompt_embeds(model, name, text)
    ids = model.tokenizer(text)["input_ids"]
    n = model.adapters[name].num_virtual_tokens
    assert embeds.shape == (n + len(ids), 32)
    with torch.no_grad():
        plain = model.base(inputs_embeds=embeds[None]).logits[0, -1]
        served = model.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [name]).logits[0]
    assert torch.allclose(plain, served, atol=1e-4)
    payload = encode_for_vllm(embeds)
    assert torch.equal(torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True), embeds)
