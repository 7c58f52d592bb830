"""Masked attention for short texts on CPU: grouped matrix products where they beat SDPA's kernel.

A soft prompt puts n cached keys in front of the text, so every text query needs an explicit mask
(SDPA's ``is_causal`` aligns its triangle to the top left, wrong once keys outnumber queries). With a
mask, PyTorch's CPU flash kernel visits every key for every block of queries (the causal bare model
skips the upper triangle), and transformers first copies each key/value head once per query head
that shares it (``repeat_kv``). For a short text, two batched matrix products per group of query
heads sharing a key/value head do the same arithmetic faster: ``python -m research.attention`` times
both on smollm2-135m's shapes (8 rows, 64 text tokens, 20 prefix keys: 0.6-0.85x the masked
kernel's time). From about 128 queries on the kernel wins, so only calls with at most
``GROUPED_MAX_QUERIES`` queries take this path. Decoding (one query per row) takes it where the keys over all rows
pass a threshold per dtype (``GROUPED_MIN_DECODE_KEYS``): the kernel is 5-7x slower in bfloat16 for a batch.

Everything else goes to transformers' own SDPA function unchanged: calls with no mask (the bare
model's causal prefill, unpadded single-row decoding), gradients (training keeps the kernel's memory-lean
backward), other devices and dtypes, dropout, soft-capped or position-biased attention, and score
matrices above ``GROUPED_MAX_SCORES`` elements. Results equal SDPA's to float rounding
(``tests/engine/test_attention.py``).

Either way, a batch with gated prompts (adaption prompts) passes them as the keyword
`softprompt.engine.gated.KWARG`, and their gated attention term is added to the output here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

from softprompt.engine.gated import GatedBatch

IMPLEMENTATION = "softprompt_sdpa"
# Crossover measured with `python -m research.attention --sweep` (2 threads, AVX-512, 9/3 heads, 20 prefix
# keys): grouped products took 0.5-0.8x the masked kernel's time for 4-8 rows of 16-64 queries and
# 0.8-1.0x for one row; 0.75-1.75x at 128 queries and 1.7-2.2x at 256.
GROUPED_MAX_QUERIES = 64
# The grouped path materialises the [batch, heads, queries, keys] scores and a mask bias of the same
# size; cap each at 16 MiB of fp32.
GROUPED_MAX_SCORES = 1 << 22
# Decoding (one query per row): from how many keys over all rows grouped products win, by dtype. PyTorch's CPU
# kernel is slow in 16-bit: for 16 rows of 128-256 keys it takes 1.1-2.1 ms a call where grouped products with float32
# scores take 0.24-0.35 ms (0.17-0.22x); in float32 it wins up to 16 rows of 128 keys and loses from 64 rows
# (0.4-0.6x). Measured with `python -m research.attention --decode` (2 threads, AVX-512, 9/3 heads).
GROUPED_MIN_DECODE_KEYS = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 4096}


def uses_grouped_path(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    **kwargs,
) -> bool:
    """Whether `attention` computes this call with grouped matrix products (else transformers' SDPA)."""
    batch, heads, queries, _ = query.shape
    if queries == 1:
        shape_wins = batch * key.shape[2] >= GROUPED_MIN_DECODE_KEYS.get(query.dtype, 1 << 62)
    else:  # short texts, float32 only (16-bit prefill: not measured to win)
        shape_wins = queries <= GROUPED_MAX_QUERIES and query.dtype == torch.float32
    return (
        attention_mask is not None
        and attention_mask.dim() == 4
        and shape_wins
        and batch * heads * queries * key.shape[2] <= GROUPED_MAX_SCORES
        and query.device.type == "cpu"
        and query.dtype == key.dtype == value.dtype
        and not dropout
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and kwargs.get("s_aux") is None
        and heads % key.shape[1] == 0
    )


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, with the query heads that share a key/value head in one product.

    query ``[batch, heads, q, d]``; key/value ``[batch, kv_heads, k, d]``; mask ``[batch or 1, 1, q, k]``
    (bool: True attends; float: added to the scores). Returns ``[batch, heads, q, d]`` in the query's dtype. Scores
    and softmax are float32 whatever the inputs (16-bit scores would round logits of ~10 to 0.03, twice SDPA's
    error, which accumulates in float32 as well). A query that may attend to nothing gets zeros, as SDPA gives it.
    """
    batch, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    mask = mask[:, :, :, :keys]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=query.device).masked_fill_(~mask, float("-inf"))
    else:
        bias = mask.float()
    # Query head h uses key/value head h // group (transformers' repeat_kv order), so the heads of one group
    # are consecutive and a reshape stacks their queries for one product with that group's keys; the mask
    # rides in as baddbmm's bias, scaling as its alpha (one pass over the scores instead of three).
    bias = bias[:, :, None].expand(batch, kv_heads, group, queries, keys)
    bias = bias.reshape(batch * kv_heads, group * queries, keys)
    scores = torch.baddbmm(
        bias,
        query.reshape(batch * kv_heads, group * queries, dim).float(),
        key.reshape(batch * kv_heads, keys, dim).float().transpose(1, 2),
        alpha=dim**-0.5 if scaling is None else scaling,
    )
    probs = scores.softmax(-1).to(value.dtype)
    if mask.dtype == torch.bool:
        # A query that may attend to nothing: softmax gave NaN, SDPA gives 0. Always filled, not behind an
        # ``if attends.all()``: reading a tensor back would break a compiled decode step into pieces per layer.
        attends = mask.any(-1)  # [batch or 1, 1, q]
        keep = attends[:, :, None].expand(batch, kv_heads, group, queries).reshape(batch * kv_heads, -1, 1)
        probs = probs.masked_fill_(~keep, 0.0)
    out = torch.bmm(probs, value.reshape(batch * kv_heads, keys, dim))
    return out.view(batch, heads, queries, dim)


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softprompt_gated: GatedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: grouped products for short masked CPU calls, else SDPA; plus
    the gated prompts' term of the layer (`softprompt.engine.gated`) when the batch has any."""
    if attention_mask is not None and uses_grouped_path(query, key, value, attention_mask, dropout, **kwargs):
        out = grouped_attention(query, key, value, attention_mask, scaling).transpose(1, 2)
    else:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    term = softprompt_gated.term(module, query) if softprompt_gated is not None else None
    if term is not None:
        out = out + term.to(out.dtype)
    return out.contiguous(), None


def install(base: PreTrainedModel) -> bool:
    """Route ``base``'s attention through `attention` if it runs transformers' SDPA through the attention
    interface (Llama, Gemma, GPT-2, Qwen2, Mistral, T5, ...). Returns whether it did; models without it
    (Bloom's ALiBi) and other implementations (eager, flash) are left as they are. T5's calls all carry a
    position bias, so they always go on to SDPA."""
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) == IMPLEMENTATION:
        return True  # a second SoftPromptModel over the same base
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    if not base._can_set_attn_implementation():
        return False
    AttentionInterface.register(IMPLEMENTATION, attention)
    # Same masks as SDPA (including skipping the mask when a causal call needs none).
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    base.set_attn_implementation(IMPLEMENTATION)
    return base.config._attn_implementation == IMPLEMENTATION
