"""Generation options: greedy default, sampling, stop strings, eos, limits."""

import pytest

from softprompt import SoftPromptError
from softprompt.engine.generation import GenerationConfig, generate_batch
from softprompt.engine.tokens import encode_texts

from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    m.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    return m


def test_greedy_is_deterministic_and_respects_max_new_tokens(model):
    ids, mask = encode_texts(model.tokenizer, ["hello", "good morning"])
    first = generate_batch(model, ids, mask, "a", GenerationConfig(max_new_tokens=5))
    second = generate_batch(model, ids, mask, "a", GenerationConfig(max_new_tokens=5))
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert all(len(g.token_ids) <= 5 for g in first)
    assert all(g.finish_reason in ("length", "stop") for g in first)


def test_sampling_is_seeded_and_differs_from_greedy(model):
    opts = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    a = model.generate(["hello"] * 4, adapters="a", **opts)
    b = model.generate(["hello"] * 4, adapters="a", **opts)
    greedy = model.generate(["hello"] * 4, adapters="a", max_new_tokens=12)
    assert a == b
    assert a != greedy
    assert len(set(a)) > 1  # rows sample independently


@pytest.mark.parametrize("temperature", [2.2e-311, 1e-30, 1e-7])
def test_a_vanishing_temperature_samples_the_greedy_tokens(model, temperature):
    greedy = model.generate(["hello", "good morning"], adapters="a", max_new_tokens=6)
    sampled = model.generate(
        ["hello", "good morning"], adapters="a", max_new_tokens=6, do_sample=True, temperature=temperature, seed=0
    )
    assert sampled == greedy


def test_adapter_names_with_a_trailing_newline_are_refused(model):
    with pytest.raises(SoftPromptError, match="adapter name"):
        model.add_adapter("nl\n", method="prompt_tuning", num_virtual_tokens=2)


def test_stop_string_cuts_the_text_and_ends_the_row(model):
    full = model.generate(["hello"], adapters="a", max_new_tokens=10, return_details=True)[0]
    assert len(full.text) >= 3
    stop = full.text[2:4]
    cut = model.generate(["hello"], adapters="a", max_new_tokens=10, stop=[stop], return_details=True)[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_eos_token_ends_generation(model):
    ids, mask = encode_texts(model.tokenizer, ["hello"])
    greedy = generate_batch(model, ids, mask, "a", GenerationConfig(max_new_tokens=4))[0]
    first = greedy.token_ids[0]
    old = model.tokenizer.eos_token_id
    model.base.generation_config.eos_token_id = first
    try:
        out = generate_batch(model, ids, mask, "a", GenerationConfig(max_new_tokens=4))[0]
    finally:
        model.base.generation_config.eos_token_id = old
    assert out.token_ids == [] and out.finish_reason == "stop"


def test_streaming_callback_sees_every_token(model):
    ids, mask = encode_texts(model.tokenizer, ["hi", "there"])
    seen = {0: [], 1: []}
    out = generate_batch(
        model,
        ids,
        mask,
        ["a", None],
        GenerationConfig(max_new_tokens=6),
        on_token=lambda row, tok: seen[row].append(tok),
    )
    assert [seen[0], seen[1]] == [out[0].token_ids, out[1].token_ids]


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_bad_generation_options_name_the_option(model, bad, field):
    with pytest.raises(SoftPromptError, match=field):
        model.generate(["x"], adapters="a", **bad)


def test_empty_input_is_a_clear_error(model):
    with pytest.raises(SoftPromptError, match="no tokens"):
        model.generate([""], adapters="a")
