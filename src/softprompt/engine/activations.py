"""The keys/values the frozen model itself computes for a text: a prefix's real-activation start.

Prefix tuning, cartridges and self-study start a key/value prefix from the frozen model's own activations for
some tokens (`SoftPromptMethod.create`'s ``text_kv``); this runs that one pass.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from softprompt.engine.families import CacheArg, FamilyQuirks
from softprompt.engine.prefixes import LayerKV
from softprompt.errors import SoftPromptError


def prompt_pass(
    base: PreTrainedModel,
    quirks: FamilyQuirks,
    cache_arg: CacheArg,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
):
    """The causal backbone run over one sequence alone (token ids or embeddings) at positions 0..n-1 with a fresh
    cache, in the weights' own dtype even under autocast: its output, whose cache holds the per-layer keys/values.

    A prompt's few tokens skip autocast: autocast would cast every frozen weight again for this pass and autograd
    would keep those casts for backward (a second copy of the model, ~200 MiB for a 135M model in bf16), while
    the float32 pass saves references to the weights themselves."""
    ref = input_ids if input_ids is not None else inputs_embeds
    assert ref is not None
    n, device = ref.shape[1], ref.device
    kwargs = {"position_ids": torch.arange(n, device=device)[None]} if quirks.takes_position_ids else {}
    with torch.autocast(device.type, enabled=False):
        return base.base_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
            use_cache=True,
            **cache_arg.kwargs(DynamicCache(config=base.config)),
            **kwargs,
        )


@torch.no_grad()
def text_kv(base: PreTrainedModel, quirks: FamilyQuirks, cache_arg: CacheArg, token_ids: list[int]) -> LayerKV:
    """Per-layer ``[kv_heads, n, head_dim]`` float32 CPU keys/values ``base`` computes for ``token_ids`` at
    positions 0..n-1 (decoder self-attention for encoder-decoder models)."""
    device = base.get_input_embeddings().get_parameter("weight").device
    ids = torch.tensor([token_ids], device=device)
    with torch.autocast(device.type, enabled=False):
        if getattr(base.config, "is_encoder_decoder", False):
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = base(input_ids=ids, decoder_input_ids=ids, use_cache=True, **cache_arg.kwargs(cache))
            layers = cache_arg.read(out).self_attention_cache.layers
        else:
            layers = cache_arg.read(prompt_pass(base, quirks, cache_arg, input_ids=ids)).layers
    kv = [(layer.keys[0].float().cpu(), layer.values[0].float().cpu()) for layer in layers]
    if any(k.shape[1] != len(token_ids) for k, _ in kv):
        raise SoftPromptError(
            f"prefix init from activations: {len(token_ids)} virtual tokens exceed a "
            "sliding-window layer's span; use fewer tokens or init: random"
        )
    return kv
