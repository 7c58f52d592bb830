"""Parity with PEFT on tiny random models: logits, losses, greedy generations and files, both ways."""

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

from peft_parity import (
    INPUT,
    MASK,
    assert_greedy_matches_peft,
    decoder_ids,
    halve_prompt,
    labels_for,
    ours_over,
    peft_forward,
    peft_from,
    peft_pair,
)

from tiny import FAMILIES, tiny_base

METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning"]
N_TOKENS = 5


def peft_config(method: str, seq2seq: bool):
    task = TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=N_TOKENS)
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=N_TOKENS)
    return PromptEncoderConfig(task_type=task, num_virtual_tokens=N_TOKENS, encoder_hidden_size=16)


def make_pair(family: str, method: str, tmp_path):
    """A PEFT model with a fresh adapter, and ours with that adapter loaded from PEFT's files."""
    seq2seq = family == "t5"
    peft_model, ours = peft_pair(tiny_base(family), family, peft_config(method, seq2seq), tmp_path, "a", halve_prompt)
    return peft_model, ours, seq2seq


def peft_logits(peft_model, method, family):
    logits = peft_forward(peft_model, family).logits
    return logits if family == "t5" or method == "prefix_tuning" else logits[:, N_TOKENS:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_logits_and_loss_match_peft(family, method, tmp_path):
    peft_model, ours, _ = make_pair(family, method, tmp_path)
    expected = peft_logits(peft_model, method, family)
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="a", decoder_input_ids=decoder_ids(family)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    labels = labels_for(family)
    peft_loss = peft_forward(peft_model, family, labels=labels).loss
    with torch.no_grad():
        our_loss = ours(INPUT, MASK, adapters="a", labels=labels).loss
    torch.testing.assert_close(our_loss, peft_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_matches_greedy_decoding_of_peft_forward(family, method, tmp_path):
    peft_model, ours, _ = make_pair(family, method, tmp_path)
    assert_greedy_matches_peft(peft_model, ours, "a", family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_our_files_load_in_peft(family, method, tmp_path):
    base = tiny_base(family)
    ours = ours_over(base, family)
    extra = {"prefix_projection": True} if method == "prefix_tuning" else {}
    ours.add_adapter("mine", method=method, num_virtual_tokens=N_TOKENS, seed=3, **extra)
    ours.save_adapter("mine", tmp_path / "mine")
    peft_model = peft_from(base, tmp_path / "mine")
    expected = peft_logits(peft_model, method, family)
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="mine", decoder_input_ids=decoder_ids(family)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_text_initialised_adapter_loads_in_peft(tmp_path):
    base = tiny_base("llama")
    ours = ours_over(base, "llama")
    ours.add_adapter("t", method="prompt_tuning", num_virtual_tokens=N_TOKENS, init_text="Classify the tweet:")
    ours.save_adapter("t", tmp_path / "t")
    expected = peft_logits(peft_from(base, tmp_path / "t"), "prompt_tuning", "llama")
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="t").logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
