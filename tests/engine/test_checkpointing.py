"""Gradient checkpointing of the frozen base's blocks: the same gradients, far fewer saved activations."""

import gc

import pytest
import torch
from transformers.cache_utils import CacheLayerMixin

from softprompt import SoftPromptError
from softprompt.engine.families import FamilyQuirks, gated_families
from softprompt.engine.tokens import pad_batch

from tiny import FAMILIES, tiny_model

METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning", "cartridge"]
ROWS = [[20, 30, 40, 50, 60, 70, 80], [21, 31, 41], [22, 32, 42, 52, 62], [23, 33, 43, 53], [24, 34, 44, 54, 64]]


def with_every_method(family):
    model = tiny_model(family)
    for i, method in enumerate(METHODS):  # different lengths: mixed batches pad the prefixes
        model.add_adapter(method, method=method, num_virtual_tokens=3 + i, seed=i)
    model.train()
    return model


def loss_and_grads(model, names, checkpointed):
    model.gradient_checkpointing = checkpointed
    model.zero_grad(set_to_none=True)
    ids, mask = pad_batch(ROWS[: len(names)], pad=0, side="left")
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, adapters=names, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.adapters.named_parameters() if p.grad is not None}


def assert_same(model, names):
    loss, grads = loss_and_grads(model, names, checkpointed=False)
    loss_ck, grads_ck = loss_and_grads(model, names, checkpointed=True)
    assert grads.keys() == grads_ck.keys() and grads
    torch.testing.assert_close(loss_ck, loss, atol=1e-5, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert max(g.abs().max() for g in grads.values()) > 1e-4  # the gradients compared are not all ~0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_has_the_same_gradients_checkpointed(family):
    model = with_every_method(family)
    assert_same(model, [*METHODS, None])  # a mixed batch: padded prefixes, one prompt pass per adapter
    trained = {name.split(".")[0] for name in loss_and_grads(model, [*METHODS, None], True)[1]}
    assert trained == set(METHODS)  # each adapter's own prompt pass (or prefix) was back-propagated through
    for method in METHODS:  # one adapter for the whole batch: its prefix broadcast to every row
        assert_same(model, [method] * 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_multitask_and_gated_adapters_have_the_same_gradients_checkpointed(family):
    """The methods added after the first four: each task of a multitask adapter (its own prompt pass) and, on
    the families that take them, adaption prompts (their gated term added inside checkpointed blocks)."""
    model = tiny_model(family)
    model.add_adapter("mpt", method="multitask_prompt_tuning", num_virtual_tokens=3, num_tasks=3, seed=1)
    names = ["mpt:0", "mpt:2", None]
    if family in gated_families():
        model.add_adapter("gated", method="adaption_prompt", num_virtual_tokens=4, adapter_layers=2, seed=2)
        with torch.no_grad():  # open the zero-initialised gates so the prompts get gradients too
            for name, p in model.get_adapter("gated").named_parameters():
                if "gate" in name:
                    p.fill_(0.5)
        names.append("gated")
    model.train()
    assert_same(model, names)
    trained = {name.split(".")[0] for name in loss_and_grads(model, names, True)[1]}
    assert trained == {n.split(":")[0] for n in names if n}


def saved_bytes(model, checkpointed) -> int:
    """Bytes autograd keeps outside checkpointed blocks for one training forward (checkpoint's own hooks
    take over inside the blocks, and what they keep is each block's input only)."""
    model.gradient_checkpointing = checkpointed
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    ids = torch.randint(3, 200, (4, 64))
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, adapters="prompt_tuning", labels=labels).loss
    loss.backward()
    return total


def test_checkpointing_keeps_far_fewer_activations_and_leaves_the_blocks_as_they_were():
    model = with_every_method("llama")
    blocks = list(model.base.model.layers)
    assert saved_bytes(model, checkpointed=True) < 0.3 * saved_bytes(model, checkpointed=False)
    # the blocks' switches were set for the forward only: the base is in eval mode, no flag left behind
    assert not any(b.training or "gradient_checkpointing" in vars(b) for b in blocks)
    assert not model.base.training


def test_generation_and_scoring_are_unchanged_and_an_unknown_family_is_refused():
    model = with_every_method("gemma3")
    texts = ["hello there", "soft prompts"]
    plain = (
        model.generate(texts, adapters="prefix_tuning", max_new_tokens=5),
        model.score(texts, labels=["yes", "no"], adapters="p_tuning"),
    )
    model.gradient_checkpointing = True
    assert (
        model.generate(texts, adapters="prefix_tuning", max_new_tokens=5),
        model.score(texts, labels=["yes", "no"], adapters="p_tuning"),
    ) == plain
    model.quirks = FamilyQuirks()  # what a family missing from the table gets
    with pytest.raises(SoftPromptError, match=r"^--gradient-checkpointing: model type 'gemma3_text' is not supported"):
        model.gradient_checkpointing = True


def _text_caches(length: int) -> list:
    """Cache layers alive now (not meta copies) holding at least ``length`` keys: a text's keys/values."""
    gc.collect()
    return [
        layer
        for layer in gc.get_objects()
        if isinstance(layer, CacheLayerMixin)
        and isinstance(getattr(layer, "keys", None), torch.Tensor)
        and layer.keys.device.type != "meta"
        and layer.keys.shape[-2] >= length
    ]


def test_a_checkpointed_training_pass_keeps_no_keys_values_of_the_text():
    """Each block leaves the cache as it found it, and the checkpoints recompute against copies holding only the
    block's own layer as it was before (the prefix): the layers' keys/values of the whole text are alive neither at
    the end of the forward (a plain pass's autograd keeps them; a checkpointed one has no use for them) nor
    through the backward."""
    model = with_every_method("llama")
    model.gradient_checkpointing = True
    ids, mask = pad_batch(ROWS[:4], pad=0, side="left")
    at_the_end_of_the_blocks = []
    hook = model.base.model.norm.register_forward_hook(
        lambda *_: at_the_end_of_the_blocks.append(len(_text_caches(ids.shape[1])))
    )
    loss = model(ids, mask, adapters=METHODS, labels=ids.masked_fill(mask == 0, -100)).loss
    hook.remove()
    assert at_the_end_of_the_blocks and max(at_the_end_of_the_blocks) == 0  # each pass: its prompts, the text
    assert not _text_caches(ids.shape[1])
    loss.backward()
    assert all(p.grad is not None for p in model.adapters.parameters() if p.requires_grad)


def test_a_checkpointed_t5_training_pass_keeps_no_keys_values_of_the_text():
    """The encoder-decoder pass drops them too: at the end of the decoder's blocks no self-attention layer holds the
    targets' keys/values and no cross-attention layer the encoder's, while the decoder prefixes (prefix tuning,
    cartridge), which live in that same cache, still get their gradients (equal to the unchecked ones)."""
    model = with_every_method("t5")
    model.gradient_checkpointing = True
    ids, mask = pad_batch(ROWS[:4], pad=0, side="left")
    targets = torch.randint(3, 200, (4, 9))
    shortest = min(ids.shape[1], targets.shape[1])  # every prefix is shorter (3-6 virtual tokens)
    assert shortest > 6
    at_the_end_of_the_blocks = []
    hook = model.base.decoder.final_layer_norm.register_forward_hook(
        lambda *_: at_the_end_of_the_blocks.append(len(_text_caches(shortest)))
    )
    out = model(ids, mask, adapters=METHODS, labels=targets)
    hook.remove()
    assert at_the_end_of_the_blocks == [0]
    out.loss.backward()
    assert not _text_caches(shortest)
    grads = {n.split(".")[0] for n, p in model.adapters.named_parameters() if p.grad is not None}
    assert grads == set(METHODS)  # the decoder prefixes were read from the cache and back-propagated through
