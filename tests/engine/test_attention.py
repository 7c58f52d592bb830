"""Grouped attention for short masked calls: equal to SDPA, taken only where it should be."""

import pytest
import torch
import torch.nn.functional as F

from softprompt import SoftPromptModel
from softprompt.engine import attention
from softprompt.engine.tokens import pad_batch

from tiny import CAUSAL, tiny_base, tiny_model, tiny_tokenizer


def sdpa_reference(q, k, v, mask, scaling=None):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scaling
    )


def random_qkv(batch=3, heads=6, kv_heads=2, queries=5, keys=9, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, queries, dim, generator=g),
        torch.randn(batch, kv_heads, keys, dim, generator=g),
        torch.randn(batch, kv_heads, keys, dim, generator=g),
        g,
    )


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_grouped_attention_equals_sdpa_with_bool_masks_including_rows_that_see_nothing(kv_heads, scaling):
    q, k, v, g = random_qkv(kv_heads=kv_heads)
    mask = torch.rand(3, 1, 5, 9, generator=g) > 0.4
    mask[1, 0, 2] = False  # a query that may attend to nothing (a padding position): SDPA gives zeros
    expected = sdpa_reference(q, k, v, mask, scaling)
    got = attention.grouped_attention(q, k, v, mask, scaling)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not got.isnan().any() and got[1, :, 2].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_decoding_is_as_close_to_float32_as_sdpa_is(dtype):
    """Grouped products in 16-bit keep float32 scores: their error against a float32 reference stays within
    1.3x SDPA's own 16-bit error (16-bit scores measured 1.7x)."""
    q, k, v, g = random_qkv(batch=16, heads=9, kv_heads=3, queries=1, keys=128, dim=64, seed=3)
    q = q * 3  # logits of ~10, where rounding 16-bit scores would show
    mask = torch.rand(16, 1, 1, 128, generator=g) > 0.3
    mask[..., 0] = True
    reference = sdpa_reference(q, k, v, mask)
    low = [t.to(dtype) for t in (q, k, v)]
    assert attention.uses_grouped_path(*low, mask)
    got = attention.grouped_attention(*low, mask)
    assert got.dtype == dtype
    ours = (got.float() - reference).abs().max()
    theirs = (sdpa_reference(*low, mask).float() - reference).abs().max()
    assert ours <= 1.3 * theirs, (ours, theirs)


def test_grouped_attention_equals_sdpa_with_additive_float_masks_broadcast_over_the_batch():
    q, k, v, g = random_qkv()
    mask = torch.zeros(1, 1, 5, 9).masked_fill(
        torch.rand(1, 1, 5, 9, generator=g) > 0.5, torch.finfo(torch.float32).min
    )
    torch.testing.assert_close(
        attention.grouped_attention(q, k, v, mask), sdpa_reference(q, k, v, mask), atol=1e-6, rtol=1e-5
    )


def test_only_short_masked_fp32_inference_calls_and_wide_decoding_take_the_grouped_path():
    q, k, v, _ = random_qkv(queries=5, keys=9)
    mask = torch.ones(3, 1, 5, 9, dtype=torch.bool)
    assert attention.uses_grouped_path(q, k, v, mask)
    long_q = torch.randn(3, 6, attention.GROUPED_MAX_QUERIES + 1, 8)
    refused = {
        "no mask (causal prefill)": (q, k, v, None, {}),
        "one query (decoding) over few keys": (q[:, :, :1], k, v, mask[:, :, :1], {}),
        "more queries than the crossover": (long_q, k, v, torch.ones(3, 1, long_q.shape[2], 9, dtype=torch.bool), {}),
        "bf16 text (not decoding)": (q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, {}),
        "dropout": (q, k, v, mask, {"dropout": 0.1}),
        "soft-capped": (q, k, v, mask, {"softcap": 50.0}),
        "position bias": (q, k, v, mask, {"position_bias": torch.zeros(1, 6, 5, 9)}),
        "gradients": (q, k.clone().requires_grad_(), v, mask, {}),
    }
    for why, (qq, kk, vv, mm, extra) in refused.items():
        assert not attention.uses_grouped_path(qq, kk, vv, mm, **extra), why
    with torch.no_grad():  # under no_grad a tensor that requires grad is fine: nothing is recorded
        assert attention.uses_grouped_path(q, k.clone().requires_grad_(), v, mask)
    for dtype, keys in attention.GROUPED_MIN_DECODE_KEYS.items():  # decoding: from a number of keys over all rows
        for rows, takes in ((1, False), (4, True)):
            qq, kk, vv, _ = random_qkv(batch=rows, queries=1, keys=keys // 2)
            args = (qq.to(dtype), kk.to(dtype), vv.to(dtype), torch.ones(rows, 1, 1, keys // 2, dtype=torch.bool))
            assert attention.uses_grouped_path(*args) is takes, (dtype, rows)
    big = torch.randn(64, 6, 64, 8)
    big_keys = torch.randn(64, 2, 256, 8)
    assert attention.GROUPED_MAX_SCORES < 64 * 6 * 64 * 256
    assert not attention.uses_grouped_path(big, big_keys, big_keys, torch.ones(64, 1, 64, 256, dtype=torch.bool))


@pytest.mark.parametrize(
    "family, installed", [("llama", True), ("gemma3", True), ("gpt2", True), ("t5", True), ("bloom", False)]
)
def test_install_routes_interface_models_and_leaves_the_rest(family, installed):
    model = tiny_model(family)
    assert model.grouped_attention is installed
    impl = model.base.config._attn_implementation
    assert (impl == attention.IMPLEMENTATION) is installed
    assert SoftPromptModel(model.base, tiny_tokenizer()).grouped_attention is installed  # same base again
    eager = tiny_base("llama")
    eager.set_attn_implementation("eager")
    assert SoftPromptModel(eager, tiny_tokenizer()).grouped_attention is False
    assert eager.config._attn_implementation == "eager"


@pytest.fixture
def grouped_calls(monkeypatch):
    calls = []
    real = attention.grouped_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "grouped_attention", spy)
    return calls


@pytest.mark.parametrize("family", [f for f in CAUSAL if f != "bloom"])
def test_prefixed_forward_and_generation_equal_transformers_sdpa(family, grouped_calls):
    """The same model, adapters and batch (mixed adapters, a bare row, left padding) give the same logits
    and greedy tokens with the grouped path as with transformers' SDPA, and the grouped path really ran."""
    model = tiny_model(family)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, init_text="classify", seed=1)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=7, seed=2)
    ids, mask = pad_batch([[20, 30, 40, 50, 60], [21, 31], [22, 32, 42]], pad=0, side="left")
    names = ["pt", "prefix", None]
    texts = ["hello there", "ab", "soft prompts"]
    with torch.no_grad():
        grouped = model(ids, mask, adapters=names).logits
        tokens = model.generate(texts, adapters=names, max_new_tokens=5)
        assert grouped_calls, "the prefixed forward should take the grouped path"
        model.base.set_attn_implementation("sdpa")
        grouped_calls.clear()
        reference = model(ids, mask, adapters=names).logits
        assert model.generate(texts, adapters=names, max_new_tokens=5) == tokens
    assert not grouped_calls
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-4)


def test_training_and_the_bare_causal_forward_keep_sdpa(grouped_calls):
    model = tiny_model("llama")
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    ids = torch.tensor([[20, 30, 40, 50, 60], [21, 31, 41, 51, 61]])
    loss = model(ids, adapters="pt", labels=ids).loss
    loss.backward()
    assert model.adapters["pt"].embedding.grad.abs().sum() > 0
    assert not grouped_calls, "training (gradients through the prefix) must keep SDPA's kernel"
    with torch.no_grad():
        model.base(input_ids=ids)  # no padding, no prefix: transformers drops the mask, SDPA's causal path
    assert not grouped_calls


def test_t5_is_routed_but_its_position_biased_calls_stay_on_sdpa(grouped_calls):
    """T5 uses the attention interface (so `install` routes it), but every call carries a position bias."""
    model = tiny_model("t5")
    assert model.grouped_attention
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=4, seed=1)
    ids, mask = pad_batch([[5, 6, 7], [5, 6, 7, 8]], pad=0, side="left")
    with torch.no_grad():
        model(ids, mask, adapters=["prefix", None], decoder_input_ids=torch.tensor([[0, 5, 6]] * 2))
        model.generate(["ab", "cde"], adapters=["prefix", None], max_new_tokens=3)
    assert not grouped_calls
