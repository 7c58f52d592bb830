"""Engine behaviour: mixed batches, shared prompt caches, padding, label-only logits, training updates."""

import logging
import warnings

import pytest
import torch

from softprompt.engine.families import CacheArg
from softprompt.engine.tokens import pad_batch

from tiny import CAUSAL, FAMILIES, tiny_model

ROWS = [[20, 30, 40, 50, 60, 70, 80], [21, 31, 41], [22, 32, 42, 52, 62], [23, 33, 43, 53]]
NAMES = ["pt", "prefix", "ptune", None]


def with_adapters(family):
    model = tiny_model(family)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, init_text="classify", seed=1)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=7, seed=2)
    model.add_adapter("ptune", method="p_tuning", num_virtual_tokens=2, seed=3)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_rows_equal_rows_alone(family, side):
    model = with_adapters(family)
    ids, mask = pad_batch(ROWS, pad=0, side=side)
    decoder = torch.tensor([[0, 5, 6]] * len(ROWS)) if family == "t5" else None
    with torch.no_grad():
        together = model(ids, mask, adapters=NAMES, decoder_input_ids=decoder).logits
        for i, (row, name) in enumerate(zip(ROWS, NAMES)):
            alone = model(
                torch.tensor([row]), adapters=name, decoder_input_ids=None if decoder is None else decoder[:1]
            ).logits[0]
            got = together[i] if family == "t5" else together[i][mask[i] == 1]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_generation_equals_rows_alone(family):
    model = with_adapters(family)
    texts = ["hello there", "a", "soft prompts", "xyz!"]
    together = model.generate(texts, adapters=NAMES, max_new_tokens=6)
    alone = [model.generate([t], adapters=[n], max_new_tokens=6)[0] for t, n in zip(texts, NAMES)]
    assert together == alone


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("name", ["pt", "prefix", "ptune"])
def test_one_adapter_batch_broadcasts_its_prefix_and_matches_the_general_path(family, name):
    """A batch where every row names one adapter shares its prefix by broadcasting (no per-row copy);
    it must give the same logits, loss and gradients as the padded path a mixed batch takes."""
    model = with_adapters(family)
    ids, mask = pad_batch(ROWS, pad=0, side="left")
    labels = ids.masked_fill(mask == 0, -100)
    shared = model._batch_prefix([name] * len(ROWS))
    assert all(k.stride(0) == 0 and v.stride(0) == 0 for k, v in shared.layers)
    results = []
    for extra in ([], [None]):  # a bare row forces the general (padded, stacked) path
        model.zero_grad()
        rows_ids = torch.cat([ids, torch.full((len(extra), ids.shape[1]), 5)]) if extra else ids
        rows_mask = torch.cat([mask, torch.ones(len(extra), ids.shape[1], dtype=mask.dtype)]) if extra else mask
        rows_labels = torch.cat([labels, torch.full((len(extra), ids.shape[1]), -100)]) if extra else labels
        names = [name] * len(ROWS) + extra
        out = model(rows_ids, rows_mask, adapters=names, labels=rows_labels)
        out.loss.backward()
        with torch.no_grad():
            logits = model(rows_ids, rows_mask, adapters=names).logits[: len(ROWS)][mask == 1]
        results.append((logits, out.loss.detach(), [p.grad.clone() for p in model.adapters[name].parameters()]))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", CAUSAL)
def test_prompt_keys_values_are_computed_once_and_reused(family):
    model = with_adapters(family)
    calls = []
    hook = model.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs.get("inputs_embeds") is not None), with_kwargs=True
    )
    with torch.no_grad():
        first = model.generate(["one", "two"], adapters=["pt", "ptune"], max_new_tokens=3)
        prompt_runs = sum(calls)
        calls.clear()
        second = model.generate(["one", "two"], adapters=["pt", "ptune"], max_new_tokens=3)
    hook.remove()
    assert prompt_runs == 2  # one run per input-method adapter, not per row or step
    assert sum(calls) == 0  # the second call reuses the cached key/values
    assert first == second
    model._prompt_kv_cache.clear()  # uncached result equals the cached one
    assert model.generate(["one", "two"], adapters=["pt", "ptune"], max_new_tokens=3) == first


def test_prompt_cache_is_invalidated_when_the_adapter_changes():
    model = with_adapters("llama")
    with torch.no_grad():
        before = model._prompt_kv("pt")[0][0][0].clone()
        model.adapters["pt"].embedding.mul_(-3.0)  # an in-place update, as an optimizer step does
        after = model._prompt_kv("pt")[0][0][0].clone()
        model._prompt_kv_cache.clear()
        fresh = model._prompt_kv("pt")[0][0][0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


def test_prompt_cache_sees_a_fused_optimizer_step():
    # Fused AdamW (transformers' Trainer default) updates parameters without bumping their version counter.
    model = with_adapters("llama")
    params = list(model.adapters["ptune"].parameters())
    with torch.no_grad():
        before = model(torch.tensor([ROWS[0]]), adapters="ptune").logits
    for p in params:
        p.grad = torch.ones_like(p)
    versions = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    assert [p._version for p in params] == versions  # the case this guards against
    with torch.no_grad():
        after = model(torch.tensor([ROWS[0]]), adapters="ptune").logits
        model._prompt_kv_cache.clear()
        fresh = model(torch.tensor([ROWS[0]]), adapters="ptune").logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


@pytest.mark.parametrize("family", CAUSAL)
def test_left_padding_never_separates_prompt_and_text(family):
    """PEFT issue 1093: left padding must not change what a row sees (positions and neighbours)."""
    model = with_adapters(family)
    row = [20, 30, 40]
    padded, mask = pad_batch([row, [1] * 9], pad=0, side="left")
    with torch.no_grad():
        alone = model(torch.tensor([row]), adapters="pt").logits[0]
        batch = model(padded, mask, adapters=["pt", "pt"]).logits[0][mask[0] == 1]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", CAUSAL)
def test_training_forward_projects_only_label_positions(family):
    model = with_adapters(family)
    shapes = []
    head = model.base.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    ids, mask = pad_batch(ROWS, pad=0, side="right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # loss on the tail of each row only
    out = model(ids, mask, adapters=NAMES, labels=labels)
    hook.remove()
    expected_tokens = int((labels != -100).sum())
    assert shapes == [(expected_tokens, model.shape.hidden_size)]
    assert out.logits is None and out.label_logits.shape == (expected_tokens, model.shape.vocab_size)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_mixed_batch_training_updates_each_adapter_only_from_its_rows(family):
    model = with_adapters(family)
    model.add_adapter("unused", method="prompt_tuning", num_virtual_tokens=3)
    ids, mask = pad_batch(ROWS, pad=0, side="right")
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    out = model(ids, mask, adapters=NAMES, labels=labels)
    out.loss.backward()
    grads = {n: [p.grad.clone() for p in model.adapters[n].parameters()] for n in ["pt", "prefix"]}
    assert all(p.grad is None for p in model.adapters["unused"].parameters())
    total = out.label_logits.shape[0]  # tokens that carried loss in the mixed batch
    for i, name in [(0, "pt"), (1, "prefix")]:
        model.zero_grad()
        own = model(ids[i : i + 1], mask[i : i + 1], adapters=[name], labels=labels[i : i + 1])
        (own.loss * own.label_logits.shape[0] / total).backward()
        for mixed, alone in zip(grads[name], model.adapters[name].parameters()):
            torch.testing.assert_close(mixed, alone.grad, atol=1e-6, rtol=1e-4)


def test_base_model_is_frozen_and_stays_in_eval_mode():
    model = with_adapters("gpt2")
    model.train()
    assert not model.base.training
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for n in model.adapters for p in model.adapters[n].parameters())


def test_unknown_adapter_and_bad_names_are_clear_errors():
    from softprompt import SoftPromptError

    model = with_adapters("gpt2")
    with pytest.raises(SoftPromptError, match="unknown adapter 'nope'"):
        model.generate(["x"], adapters=["nope"])
    with pytest.raises(SoftPromptError, match="adapter name"):
        model.add_adapter("../evil")
    with pytest.raises(SoftPromptError, match="already in use"):
        model.add_adapter("pt")
    with pytest.raises(SoftPromptError, match="unknown method 'lora'"):
        model.add_adapter("z", method="lora")
    with pytest.raises(SoftPromptError, match="unknown method 'promt-tuning' \\(did you mean 'prompt_tuning'\\?\\)"):
        model.add_adapter("z", method="promt-tuning")
    # one range check (the method config's), worded as the training config's flags are
    with pytest.raises(SoftPromptError, match="num_virtual_tokens: expected an integer between 1 and 4096, got 0"):
        model.add_adapter("z", num_virtual_tokens=0)
    with pytest.raises(SoftPromptError, match="unknown field"):
        model.add_adapter("z", num_virtual_token=3)
    with pytest.raises(SoftPromptError, match="one name per row"):
        model.generate(["x", "y"], adapters=["pt"])


def _saved_bf16_weight_copies(model, labels_row=(5, 6, 7)) -> int:
    """How many bf16 tensors shaped like the first MLP weight autograd keeps for one training step."""
    weight = model.base.model.layers[0].mlp.gate_proj.weight
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    ids = torch.tensor([[20, 30, 40, 50, 60, 70, 80, 90, 100]])
    labels = torch.full_like(ids, -100)
    labels[0, -len(labels_row) :] = torch.tensor(labels_row)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, adapters="pt", labels=labels).loss
    loss.backward()
    return sum(1 for dtype, numel in saved if dtype == torch.bfloat16 and numel == weight.numel())


def test_bf16_training_keeps_one_cast_of_the_frozen_weights():
    """Under autocast the prompt pass runs in fp32, so autograd keeps the bf16 weight casts of the
    text pass only (one per use), not a second set for the prompt's few tokens."""
    model = tiny_model("llama")
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    # gate_proj and up_proj share a shape; down_proj is its transpose-sized twin: 3 uses per layer.
    per_text_pass = 3 * len(model.base.model.layers)
    assert _saved_bf16_weight_copies(model) == per_text_pass
    grads = [p.grad for p in model.get_adapter("pt").parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_cache_keyword_is_read_from_the_forward_signature():
    def new_forward(input_ids, cache=None, use_cache=None): ...
    def old_forward(input_ids, past_key_values=None, use_cache=None): ...

    assert CacheArg.of(new_forward).kwargs(1) == {"cache": 1}
    assert CacheArg.of(old_forward).kwargs(1) == {"past_key_values": 1}
    model = tiny_model("llama")
    out = model.backbone(input_ids=torch.tensor([[5, 6]]), use_cache=True, **model.cache_arg.kwargs(None))
    assert model.cache_arg.read(out) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_no_deprecated_transformers_api_in_forward_generate_and_score(family, monkeypatch):
    """transformers renames keywords with a FutureWarning (5.25: `past_key_values` -> `cache`, removed in 5.40)
    and old output fields with a logged deprecation; the engine must use whichever name the installed release
    has, so none of either appears in anything softprompt runs."""
    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *args, **kw: logged.append(str(msg)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model = with_adapters(family)
        model.add_adapter(
            "prefix_text", method="prefix_tuning", num_virtual_tokens=3, init="text", init_text="hi", seed=4
        )
        names = ["pt", "prefix", "ptune", "prefix_text"]
        ids, mask = pad_batch(ROWS, pad=0, side="left")
        labels = ids.masked_fill(mask == 0, -100)
        decoder = torch.tensor([[0, 5, 6]] * len(ROWS)) if family == "t5" else None
        with torch.no_grad():
            model(ids, mask, adapters=names, decoder_input_ids=decoder)
        model(ids, mask, adapters=names, labels=labels).loss.backward()
        model.generate(["hello", "a", "soft", "xyz"], adapters=names, max_new_tokens=3)
        model.generate(["hello", "a"], adapters=["pt", None], max_new_tokens=3, do_sample=True, top_p=0.9, seed=0)
        model.score(["hello", "a"], labels=["yes", "no"], adapters=["prefix", "ptune"])
    assert not [m for m in logged if "deprecat" in m.lower()]
