"""The encoder-decoder (T5) text pass of a training / scoring forward.

The encoder runs over the inputs (input prompts already prepended), the decoder over the targets after each row's
self-attention prefix (prefix tuning's keys/values, in the `EncoderDecoderCache` it is given). Two differences from
calling the whole model, neither of which changes a result:

* The pass runs under `checkpointing.dropping_caches`: with gradient checkpointing each decoder block puts its
  self- and cross-attention cache layers back as it found them (the prefix stays, and is what the block's
  recomputation reads), so the text's keys/values and the encoder's projected keys/values do not pile up in the
  cache until the pass ends. Nothing reads that cache after the pass.
* With labels only the decoder positions that carry a label are projected onto the vocabulary (as `_label_loss`
  does for causal models), never the ``[batch, targets, vocab]`` logits. This needs the family's head: T5 scales
  the decoder's output by ``d_model ** -0.5`` before its head when its embeddings are tied
  (``T5ForConditionalGeneration.forward``: ``scale_decoder_outputs``, ``tie_word_embeddings`` before transformers
  5.23); `FamilyQuirks.decoder_output_scaled` marks the families that do exactly that. Any other encoder-decoder
  model runs its own forward and the label positions are picked from its logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import EncoderDecoderCache, PreTrainedModel

from softprompt.engine import checkpointing
from softprompt.engine.families import CacheArg, FamilyQuirks
from softprompt.engine.outputs import SoftPromptOutput


def text_pass(
    base: PreTrainedModel,
    quirks: FamilyQuirks,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor,
    cache: EncoderDecoderCache,
    labels: torch.Tensor | None,
) -> SoftPromptOutput:
    """Logits of every target (no ``labels``), or the loss and ``label_logits`` over the targets that are not -100.
    ``head``: the model's LM head (`SoftPromptModel.head_logits`); ``decoder_attention_mask`` covers the prefix."""
    with checkpointing.dropping_caches():  # the cache is not read after this pass
        if not quirks.decoder_output_scaled:
            return _whole_model(
                base, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask, cache, labels
            )
        encoder = base.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        decoder = base.get_decoder()
        hidden = decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=True,
            **CacheArg.of(decoder.forward).kwargs(cache),
        ).last_hidden_state
    config = base.config
    scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
    scale = config.d_model**-0.5 if scaled else None
    if labels is None:
        return SoftPromptOutput(logits=head(hidden * scale if scale is not None else hidden))
    wanted = labels != -100
    picked = hidden[wanted]  # [label tokens, d_model]: only these reach the vocabulary
    return _loss(head(picked * scale if scale is not None else picked).float(), labels[wanted])


def _whole_model(base, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask, cache, labels):
    """A family whose head is not known: the model's own forward, every logit, label positions picked after."""
    out = base(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
        use_cache=True,
        **CacheArg.of(base.forward).kwargs(cache),
    )
    if labels is None:
        return SoftPromptOutput(logits=out.logits)
    wanted = labels != -100
    return _loss(out.logits[wanted].float(), labels[wanted])


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> SoftPromptOutput:
    loss = F.cross_entropy(logits, targets) if targets.numel() else logits.sum() * 0.0
    return SoftPromptOutput(loss=loss, label_logits=logits)


__all__ = ["text_pass"]
