"""Label scoring: one batched pass equals scoring each (row, label) by a full forward."""

import pytest
import torch

from tiny import FAMILIES, tiny_model


def full_forward_logprob(model, text, label, adapter):
    tok = model.tokenizer
    ids = tok(text)["input_ids"]
    lab = tok(label, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        if model.shape.is_encoder_decoder:
            labels = torch.tensor([lab])
            out = model(torch.tensor([ids]), adapters=adapter, labels=labels)
            return -out.loss.item() * len(lab)
        seq = torch.tensor([ids + lab])
        labels = torch.tensor([[-100] * len(ids) + lab])
        out = model(seq, adapters=adapter, labels=labels)
        return -out.loss.item() * len(lab)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_full_forward_per_label(family):
    model = tiny_model(family)
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    model.add_adapter("b", method="prefix_tuning", num_virtual_tokens=2, seed=1)
    texts = ["the tweet", "a much longer input text", "x"]
    labels = ["complaint", "no complaint", "ok"]
    adapters = ["a", "b", None]
    results = model.score(texts, labels=labels, adapters=adapters)
    for text, adapter, result in zip(texts, adapters, results):
        for label in labels:
            assert result.scores[label] == pytest.approx(full_forward_logprob(model, text, label, adapter), abs=1e-4)
        assert result.label == max(result.scores, key=result.scores.get)
        assert sum(result.probabilities().values()) == pytest.approx(1.0)


def test_mean_normalisation_divides_by_label_length():
    model = tiny_model("gpt2")
    total = model.score(["abc"], labels=["yes", "nope"])[0].scores
    mean = model.score(["abc"], labels=["yes", "nope"], normalize="mean")[0].scores
    assert mean["yes"] == pytest.approx(total["yes"] / 3, abs=1e-5)
    assert mean["nope"] == pytest.approx(total["nope"] / 4, abs=1e-5)


def test_scoring_reuses_the_input_state_in_one_pass():
    model = tiny_model("gpt2")
    calls = []
    hook = model.backbone.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    model.score(["one", "two", "three"], labels=["alpha", "beta", "gamma", "delta"])
    hook.remove()
    assert len(calls) == 2  # one prefill for all rows, one pass for all candidates


def test_bad_label_sets_are_clear_errors():
    from softprompt import SoftPromptError

    model = tiny_model("gpt2")
    with pytest.raises(SoftPromptError, match="at least one"):
        model.score(["x"], labels=[])
    with pytest.raises(SoftPromptError, match="distinct"):
        model.score(["x"], labels=["a", "a"])
