"""Prefix tuning started from real activations (``init: text`` / ``sample_vocab``), beyond PEFT's random start."""

import pytest
import torch

from softprompt.engine.activations import text_kv
from softprompt.errors import ConfigError
from softprompt.methods.prefix_tuning import layer_rows

from tiny import CAUSAL, tiny_model

TEXT = "classify the sentiment"
ROWS = torch.tensor([[20, 30, 40, 50, 60], [21, 31, 41, 51, 61]])


@pytest.mark.parametrize("family", CAUSAL)
def test_prefix_from_text_acts_exactly_as_prompt_tuning_from_the_same_text(family):
    """Its keys/values are what the frozen model computes for the text, so every text position sees
    the same context as behind a prompt-tuned prompt started from that text."""
    model = tiny_model(family)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=6, init_text=TEXT)
    model.add_adapter("prompt", method="prompt_tuning", num_virtual_tokens=6, init_text=TEXT)
    model.add_adapter("random", method="prefix_tuning", num_virtual_tokens=6, seed=0)
    with torch.no_grad():
        prefix = model(ROWS, adapters="prefix").logits
        prompt = model(ROWS, adapters="prompt").logits
        random = model(ROWS, adapters="random").logits
    torch.testing.assert_close(prefix, prompt, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(prefix, random, atol=1e-3)


def test_prefix_from_text_on_an_encoder_decoder_holds_the_decoder_activations():
    model = tiny_model("t5")
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=5, init_text=TEXT)
    ids = (model._tokenize_plain(TEXT) * 5)[:5]
    expected = text_kv(model.base, model.quirks, model.cache_arg, ids)
    got = model.adapters["prefix"].kv_prefix()
    rows = layer_rows(model.shape)
    # PEFT's seq2seq layout makes some layers share rows; each shared row holds its last layer's activations.
    owners = {row: layer for layer, row in enumerate(rows)}
    for layer in owners.values():
        torch.testing.assert_close(got[layer][0], expected[layer][0])
        torch.testing.assert_close(got[layer][1], expected[layer][1])
    with torch.no_grad():
        out = model(ROWS, adapters="prefix", decoder_input_ids=ROWS[:, :3]).logits
    assert torch.isfinite(out).all()


def test_sample_vocab_start_is_seeded_and_trains():
    model = tiny_model("llama")
    model.add_adapter("a", method="prefix_tuning", num_virtual_tokens=4, init="sample_vocab", seed=7)
    model.add_adapter("b", method="prefix_tuning", num_virtual_tokens=4, init="sample_vocab", seed=7)
    model.add_adapter("c", method="prefix_tuning", num_virtual_tokens=4, init="sample_vocab", seed=8)
    table = {n: model.adapters[n].materialized() for n in "abc"}
    torch.testing.assert_close(table["a"], table["b"])
    assert not torch.allclose(table["a"], table["c"])
    # Real activations are far from PEFT's N(0, 1) start: the values here have a small spread.
    start = table["a"].clone()
    out = model(ROWS, adapters="a", labels=ROWS)
    out.loss.backward()
    torch.optim.SGD(model.adapters["a"].parameters(), lr=0.1).step()
    assert not torch.allclose(model.adapters["a"].materialized(), start)


def test_activation_start_refuses_the_projection_mlp():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="init: 'text' needs prefix_projection: false"):
        model.add_adapter("p", method="prefix_tuning", init="text", init_text=TEXT, prefix_projection=True)


def test_default_start_is_real_activations_unless_the_projection_mlp_is_used():
    model = tiny_model("llama")
    assert model.add_adapter("plain", method="prefix_tuning").config.init == "sample_vocab"
    assert model.add_adapter("texted", method="prefix_tuning", init_text=TEXT).config.init == "text"
    assert (
        model.add_adapter("mlp", method="prefix_tuning", init_text=TEXT, prefix_projection=True).config.init == "random"
    )
