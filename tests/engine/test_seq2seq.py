"""The encoder-decoder training forward projects only the labelled decoder positions: the same loss, label logits
and gradients as projecting every position (the model's own forward) and picking the labelled ones after."""

import dataclasses

import pytest
import torch

from softprompt import SoftPromptModel
from softprompt.engine.tokens import pad_batch

from tiny import VOCAB, tiny_base, tiny_tokenizer

METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning", "cartridge"]
ROWS = [[20, 30, 40, 50, 60, 70, 80], [21, 31, 41], [22, 32, 42, 52, 62], [23, 33, 43, 53], [24, 34, 44, 54, 64]]


def t5(tied: bool) -> SoftPromptModel:
    model = SoftPromptModel(tiny_base("t5", tie_word_embeddings=tied), tiny_tokenizer())
    for i, method in enumerate(METHODS):
        model.add_adapter(method, method=method, num_virtual_tokens=3 + i, seed=i)
    return model.train()


def batch():
    ids, mask = pad_batch(ROWS, pad=0, side="left")
    labels = torch.randint(3, VOCAB, (len(ROWS), 6), generator=torch.Generator().manual_seed(0))
    labels[1, 4:] = -100  # rows of different target lengths
    labels[3, 2:] = -100
    return ids, mask, labels


def loss_logits_grads(model, names):
    model.zero_grad(set_to_none=True)
    ids, mask, labels = batch()
    out = model(ids, mask, adapters=names, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.adapters.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.label_logits.detach(), grads


@pytest.mark.parametrize("tied", [True, False])
def test_bare_rows_equal_the_models_own_loss_and_logits(tied):
    """T5 rescales the decoder's output by d_model ** -0.5 before a tied head only: both configs agree."""
    model = t5(tied)
    ids, mask, labels = batch()
    with torch.no_grad():
        ours = model(ids, mask, labels=labels)
        theirs = model.base(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.label_logits, theirs.logits[labels != -100], atol=1e-6, rtol=0)
    assert ours.label_logits.shape == (int((labels != -100).sum()), VOCAB)
    full = model(ids, mask, decoder_input_ids=model.base.prepare_decoder_input_ids_from_labels(labels=labels))
    torch.testing.assert_close(full.logits, theirs.logits, atol=1e-6, rtol=0)  # without labels: every position


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_every_method_has_the_loss_and_gradients_of_the_full_logits(tied, checkpointed):
    model = t5(tied)
    model.gradient_checkpointing = checkpointed
    names = [*METHODS, None]
    picked = loss_logits_grads(model, names)
    model.quirks = dataclasses.replace(model.quirks, decoder_output_scaled=False)  # the model's own forward
    full = loss_logits_grads(model, names)
    torch.testing.assert_close(picked[0], full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(picked[1], full[1], atol=1e-6, rtol=0)
    assert picked[2].keys() == full[2].keys() and {n.split(".")[0] for n in picked[2]} == set(METHODS)
    for name in full[2]:
        torch.testing.assert_close(picked[2][name], full[2][name], atol=1e-6, rtol=1e-5, msg=name)
