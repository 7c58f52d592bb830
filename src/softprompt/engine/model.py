"""`SoftPromptModel`: one frozen base model and a bank of named soft-prompt adapters.

Every call chooses an adapter per row (``None`` = the bare base model), so one batch can mix methods
and prompt lengths. The central idea, for causal models: virtual tokens come first and attend only to
each other, so their keys and values do not depend on the input. Each adapter's per-layer key/value
prefix is therefore computed once (prompt tuning and P-tuning run the frozen model over the prompt;
prefix tuning *is* a key/value prefix) and shared by every row that names it. A batch's prefixes are
left-padded to the longest and masked; the text keeps explicit positions that start right after its own
prompt, so padding never sits between a prompt and its text (PEFT issue 1093) and results equal running
each row alone. Encoder-decoder models take input prompts on the encoder and prefixes on the decoder's
self-attention, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from softprompt.adapters import hub, peft_format
from softprompt.engine import (
    activations,
    attention,
    checkpointing,
    gated,
    generation,
    prefixes,
    scoring,
    seq2seq,
    static_decode,
)
from softprompt.engine.adapter_name import check_adapter_name
from softprompt.engine.decode import DecodeState
from softprompt.engine.decode_options import DEFAULT_DECODE, DecodeMode
from softprompt.engine.families import CacheArg, ModelShape, quirks_for
from softprompt.engine.outputs import SoftPromptOutput
from softprompt.engine.rows import AdapterNames, TaskIds, row_adapter, row_keys
from softprompt.errors import SoftPromptError
from softprompt.methods import SoftPromptMethod, method_class


class SoftPromptModel(nn.Module):
    """A frozen base model with named soft-prompt adapters, chosen per row."""

    decode = DecodeMode()  # how decoding steps run: "eager", "static" or "compiled" (softprompt.engine.static_decode)

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer=None,
        *,
        name_or_path: str | None = None,
        gradient_checkpointing: bool = False,
        decode: str = DEFAULT_DECODE,
    ):
        super().__init__()
        base.requires_grad_(False)
        base.eval()
        # Short masked attention on CPU runs as grouped matrix products, else SDPA (see attention.py).
        self.grouped_attention = attention.install(base)
        self.base = base
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(base.config, "_name_or_path", None)
        self.shape = ModelShape.from_config(base.config)
        self.quirks = quirks_for(self.shape.model_type)
        # The module every cached forward below calls: the whole model for encoder-decoders, else the backbone.
        self.cache_arg = CacheArg.of((base if self.shape.is_encoder_decoder else self.backbone).forward)
        self.adapters = nn.ModuleDict()
        self._prompt_kv_cache = prefixes.PromptKVCache()
        self._gated = gated.Projector(base, self.quirks, self.shape)
        self._checkpointed: list[nn.Module] | None = None  # the blocks checkpointed (gradient_checkpointing)
        self.gradient_checkpointing = gradient_checkpointing
        self.decode = decode

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self, name: str, method: str = "prompt_tuning", *, seed: int | None = None, **config
    ) -> SoftPromptMethod:
        """Create a new trainable adapter. ``config`` holds the method's config fields."""
        self.check_new_name(name)
        cls = method_class(method)
        cfg = cls.config_class.from_dict(config, source=f"adapter {name!r}")
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
        adapter = cls.create(
            cfg,
            self.shape,
            word_embeddings=self.base.get_input_embeddings(),
            tokenize=self._tokenize_plain,
            generator=generator,
            text_kv=lambda ids: activations.text_kv(self.base, self.quirks, self.cache_arg, ids),
        )
        return self.register(name, adapter)

    def register(self, name: str, adapter: SoftPromptMethod) -> SoftPromptMethod:
        """Put a built adapter module under ``name`` (replacing one of that name); returns it on the model's device.
        Loading (`softprompt.adapters`), training and the server add adapters through this one door."""
        if adapter.adds == "gated":
            self._gated.check(adapter.config.method, attention_installed=self.grouped_attention)
        adapter.to(self.device)
        self.adapters[name] = adapter
        self._prompt_kv_cache.drop(name)
        return adapter

    def check_new_name(self, name: str) -> None:
        """Raise `SoftPromptError` unless ``name`` is a valid adapter name not in use yet."""
        problem = check_adapter_name(name)
        if problem:
            raise SoftPromptError(problem)
        if name in self.adapters:
            raise SoftPromptError(f"adapter name {name!r} is already in use; remove it first or pick another name")

    def remove_adapter(self, name: str) -> None:
        self.get_adapter(name)
        del self.adapters[name]
        self._prompt_kv_cache.drop(name)

    def load_adapter(self, path: str, name: str | None = None) -> SoftPromptMethod:
        """Load an adapter in PEFT's file layout (a local directory or a hub id)."""
        return peft_format.load_adapter(self, path, name=name)

    def save_adapter(
        self, name: str, path: str, *, training_state: dict | None = None, training_meta: dict | None = None
    ) -> None:
        """Save an adapter in PEFT's file layout (plus softprompt's training-state files)."""
        peft_format.save_adapter(self, name, path, training_state=training_state, training_meta=training_meta)

    def push_adapter(
        self,
        name: str,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Upload an adapter to the Hugging Face Hub (PEFT's layout and a model card); returns the commit URL.
        An adapter saved by training (with its template and verbalizer) is better pushed from its directory:
        ``softprompt.adapters.hub.push_adapter(path, repo_id)``."""
        return hub.push_saved(self, name, repo_id, private=private, token=token, commit_message=commit_message)

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def get_adapter(self, name: str) -> SoftPromptMethod:
        """The adapter module called ``name``; a `SoftPromptError` listing the loaded ones if there is none."""
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise SoftPromptError(f"unknown adapter {name!r}; loaded adapters: {known}")
        adapter = self.adapters[name]
        assert isinstance(adapter, SoftPromptMethod)  # `register` is the only way in
        return adapter

    def train(self, mode: bool = True) -> SoftPromptModel:
        # The frozen base stays in eval mode (no dropout): only the adapters train.
        super().train(mode)
        self.base.eval()
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each block's activations in the backward pass (the prompt pass included): less memory, about
        one more forward pass of time; only passes recording gradients (see `softprompt.engine.checkpointing`)."""
        return self._checkpointed is not None

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        # the blocks are found now, so a family that cannot take it says so here, naming the flag
        self._checkpointed = (
            checkpointing.blocks_of(self.base, self.quirks.blocks, self.shape.model_type) if enabled else None
        )

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().get_parameter("weight").device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_input_embeddings().get_parameter("weight").dtype

    @property
    def backbone(self) -> nn.Module:
        return self.base.base_model

    def _tokenize_plain(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise SoftPromptError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _row_names(self, adapters: AdapterNames, batch: int, task_ids: TaskIds = None) -> list[str | None]:
        return row_keys(adapters, batch, task_ids, self.get_adapter)

    def _inputs(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = input_ids.to(self.device)  # and the attention mask (default all ones) on the device, as long
        return input_ids, (torch.ones_like(input_ids) if mask is None else mask.to(self.device)).long()

    def _row_adapter(self, key: str) -> tuple[SoftPromptMethod, int | None]:
        return row_adapter(key, self.get_adapter)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of final hidden states (with the family's soft-cap)."""
        logits = self.base.get_output_embeddings()(hidden)
        attr = self.quirks.logit_softcap_attr
        cap = getattr(self.base.config, attr, None) if attr else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ prefixes
    def _prompt_kv(self, name: str, terms: dict[str, tuple[torch.Tensor, int]] | None = None) -> prefixes.AdapterPrefix:
        """Per-layer ``[kv_heads, n, head_dim]`` keys/values of one row key (an adapter, or a task of one) and the
        last hidden state for input methods.

        Input-method prompts are run through the frozen model once; the result is cached (per row key) until the
        adapter's parameters change, and recomputed (with gradients) while training. ``terms`` (a forward
        with labels) receives the adapter's own loss terms when it has `prompt_targets` (CPT's context).
        """
        adapter, task = self._row_adapter(name)
        if adapter.adds == "kv":
            return [(k.to(self.dtype), v.to(self.dtype)) for k, v in adapter.kv_prefix()], None
        params = list(adapter.parameters())
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        device_type = self.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (self.dtype, self.device, autocast_dtype)
        targets = adapter.prompt_targets() if terms is not None else None
        cached = None if needs_grad or targets is not None else self._prompt_kv_cache.get(name, key, params)
        if cached is not None:
            return cached
        embeds = adapter.input_embeddings(task).to(self.dtype)[None]
        out = activations.prompt_pass(self.base, self.quirks, self.cache_arg, inputs_embeds=embeds)
        cast = autocast_dtype or self.dtype
        layers = [(layer.keys[0].to(cast), layer.values[0].to(cast)) for layer in self.cache_arg.read(out).layers]
        last_hidden = out.last_hidden_state[0, -1]
        if targets is not None and terms is not None:
            terms[name] = self._prompt_loss_terms(out.last_hidden_state[0], *targets)
        if not needs_grad:
            self._prompt_kv_cache.put(name, key, params, layers, last_hidden)
        return layers, last_hidden

    def _prompt_loss_terms(self, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
        """``(sum of weighted token losses, token count)`` of a prompt's own targets: token j predicted from
        the prompt's hidden state j - 1, as PEFT's CPT loss shifts its labels."""
        wanted = (targets[1:] != -100).nonzero(as_tuple=True)[0]
        logits = self.head_logits(hidden[wanted]).float()
        loss = F.cross_entropy(logits, targets[1:][wanted].to(self.device), reduction="none")
        return (loss * weights[1:][wanted].to(self.device)).sum(), int(wanted.numel())

    def _batch_prefix(
        self, names: list[str | None], terms: dict[str, tuple[torch.Tensor, int]] | None = None
    ) -> prefixes.BatchPrefix | None:
        names = [n if n is not None and self._row_adapter(n)[0].adds != "gated" else None for n in names]
        unique = dict.fromkeys(n for n in names if n is not None)
        return prefixes.stack_prefixes(names, {name: self._prompt_kv(name, terms) for name in unique}, self.device)

    def _batch_gated(self, names: list[str | None]) -> gated.GatedBatch | None:
        adapters = {n: self._row_adapter(n)[0] for n in names if n is not None}
        return self._gated.batch(names, adapters, self.dtype, self.device)

    # ------------------------------------------------------------------ causal forward
    def _causal_hidden(
        self,
        input_ids,
        attention_mask,
        prefix: prefixes.BatchPrefix | None,
        cache=None,
        prefix_len: torch.Tensor | None = None,
        past_mask: torch.Tensor | None = None,
        gated_batch: gated.GatedBatch | None = None,
    ):
        """Run the backbone over text after a prefix (or an existing cache), with the rows' gated prompts.
        Returns (hidden, cache, full mask)."""
        batch = input_ids.shape[0]
        if cache is None:
            data = prefix.layers if prefix is not None else None
            cache = DynamicCache(ddp_cache_data=data, config=self.base.config)
            past_mask = prefix.mask if prefix is not None else attention_mask.new_zeros(batch, 0)
            prefix_len = prefix.lengths if prefix is not None else attention_mask.new_zeros(batch)
        assert past_mask is not None and prefix_len is not None  # callers passing a cache pass both
        full_mask = torch.cat([past_mask, attention_mask], dim=1)
        kwargs: dict = {gated.KWARG: gated_batch} if gated_batch is not None else {}
        if self.quirks.takes_position_ids:
            kwargs["position_ids"] = prefix_len[:, None] + (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(
            input_ids=input_ids, attention_mask=full_mask, use_cache=True, **self.cache_arg.kwargs(cache), **kwargs
        )
        return out.last_hidden_state, self.cache_arg.read(out), full_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapters: AdapterNames = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        task_ids: TaskIds = None,
    ) -> SoftPromptOutput:
        """Training / scoring forward. ``adapters``: one name (or None) per row, or one for all rows;
        ``task_ids``: each row's task of a multitask adapter (as PEFT's; or name the row ``NAME:TASK``).

        Causal models: ``labels`` align with ``input_ids`` (-100 = no loss), as in transformers.
        Encoder-decoder models: ``labels`` are the decoder targets.
        """
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        names = self._row_names(adapters, input_ids.shape[0], task_ids)
        with checkpointing.when_recording(self._checkpointed):
            if self.shape.is_encoder_decoder:
                return self._seq2seq_forward(input_ids, attention_mask, names, labels, decoder_input_ids)
            terms: dict[str, tuple[torch.Tensor, int]] | None = None if labels is None else {}
            prefix, gated_batch = self._batch_prefix(names, terms), self._batch_gated(names)
            with checkpointing.dropping_caches():  # the text's cache is not used after this pass
                hidden, _, _ = self._causal_hidden(input_ids, attention_mask, prefix, gated_batch=gated_batch)
        if labels is None:
            return SoftPromptOutput(logits=self.head_logits(hidden))
        labels = labels.to(self.device)
        # every row of an adapter with prompt targets adds its prompt's terms (PEFT's CPT loss)
        extra = [terms[n] for n in names if n in terms] if terms else []
        return self._label_loss(hidden, attention_mask, labels, prefix, extra)

    def text_hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapters: AdapterNames = None,
        task_ids: TaskIds = None,
    ) -> torch.Tensor:
        """Final hidden states ``[batch, seq, hidden]`` of the text after each row's prompt (causal models): what
        the LM head projects. For integrations that apply the head themselves (TRL's fused LM head)."""
        if self.shape.is_encoder_decoder:
            raise SoftPromptError("text_hidden_states: causal models only; encoder-decoder models use forward")
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        names = self._row_names(adapters, input_ids.shape[0], task_ids)
        with checkpointing.when_recording(self._checkpointed):
            prefix = self._batch_prefix(names)
            with checkpointing.dropping_caches():  # the text's cache is not used after this pass
                return self._causal_hidden(input_ids, attention_mask, prefix, gated_batch=self._batch_gated(names))[0]

    def _label_loss(
        self, hidden, attention_mask, labels, prefix: prefixes.BatchPrefix | None, extra=()
    ) -> SoftPromptOutput:
        """Loss over label tokens, projecting only the hidden states that predict a label. ``extra``: more
        ``(weighted loss sum, token count)`` terms, averaged in as further tokens (`_prompt_loss_terms`)."""
        batch, length = labels.shape
        positions = torch.arange(length, device=self.device)[None].expand(batch, -1)
        first = attention_mask.argmax(-1, keepdim=True)  # first real token of each row
        wanted = (labels != -100) & (attention_mask == 1)
        # A row's first real token is predicted by its prompt's last virtual token (input methods only).
        has_hidden = prefix.has_last_hidden[:, None] if prefix is not None else torch.zeros_like(wanted)
        wanted &= (positions != first) | has_hidden
        if prefix is not None and prefix.last_hidden is not None:
            extended = torch.cat([prefix.last_hidden[:, None].to(hidden.dtype), hidden], dim=1)
        else:
            extended = torch.cat([hidden[:, :1], hidden], dim=1)
        source = torch.where(positions == first, torch.zeros_like(positions), positions)
        rows, cols = wanted.nonzero(as_tuple=True)
        logits = self.head_logits(extended[rows, source[rows, cols]]).float()
        targets = labels[rows, cols]
        count = targets.numel() + sum(c for _, c in extra)
        if extra and count:
            loss = (F.cross_entropy(logits, targets, reduction="sum") + sum(t for t, _ in extra)) / count
        else:
            loss = F.cross_entropy(logits, targets) if targets.numel() else logits.sum() * 0.0
        return SoftPromptOutput(loss=loss, label_logits=logits, extra_tokens=count - targets.numel())

    # ------------------------------------------------------------------ encoder-decoder
    def _encoder_inputs(self, input_ids, attention_mask, names):
        embeds = self.base.get_input_embeddings()(input_ids)
        picked = [self._row_adapter(n) if n is not None else None for n in names]
        prompts = [p[0].input_embeddings(p[1]) if p is not None and p[0].adds == "input" else None for p in picked]
        return prefixes.prepend_prompts(embeds, attention_mask, prompts)

    def _decoder_prefix(self, names):
        """EncoderDecoderCache holding each row's decoder self-attention prefix (prefix tuning rows)."""
        kv_names = [n if n is not None and self._row_adapter(n)[0].adds == "kv" else None for n in names]
        prefix = self._batch_prefix(kv_names)
        self_cache = DynamicCache(ddp_cache_data=prefix.layers if prefix else None)
        cache = EncoderDecoderCache(self_cache, DynamicCache())
        batch = len(names)
        mask = prefix.mask if prefix is not None else torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        return cache, mask

    def _seq2seq_forward(self, input_ids, attention_mask, names, labels, decoder_input_ids) -> SoftPromptOutput:
        embeds, enc_mask = self._encoder_inputs(input_ids, attention_mask, names)
        cache, prefix_mask = self._decoder_prefix(names)
        if decoder_input_ids is None:
            if labels is None:
                raise SoftPromptError("an encoder-decoder forward needs labels or decoder_input_ids")
            # nn.Module.__getattr__ is typed Tensor | Module; encoder-decoder models define this method.
            prepare = self.base.prepare_decoder_input_ids_from_labels
            decoder_input_ids = prepare(labels=labels.to(self.device))  # type: ignore[operator]
        decoder_input_ids = decoder_input_ids.to(self.device)
        return seq2seq.text_pass(
            self.base,
            self.quirks,
            self.head_logits,
            inputs_embeds=embeds,
            attention_mask=enc_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=torch.cat([prefix_mask, torch.ones_like(decoder_input_ids)], dim=1),
            cache=cache,
            labels=None if labels is None else labels.to(self.device),
        )

    # ------------------------------------------------------------------ decoding primitives
    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: AdapterNames, task_ids: TaskIds = None
    ) -> DecodeState:
        """Run each row's prompt and text once; the returned state holds the next-token logits and continues
        with `advance` (see `softprompt.engine.decode`)."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device).long()
        names = self._row_names(adapters, input_ids.shape[0], task_ids)
        if self.shape.is_encoder_decoder:
            embeds, enc_mask = self._encoder_inputs(input_ids, attention_mask, names)
            encoder_hidden = self.base.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask).last_hidden_state
            cache, prefix_mask = self._decoder_prefix(names)
            start = torch.full((input_ids.shape[0], 1), self.base.config.decoder_start_token_id, device=self.device)
            # logits: the start token's, just below
            state = DecodeState(
                cache, prefix_mask, prefix_mask.sum(-1), prefix_mask.new_empty(0), encoder_hidden, enc_mask
            )
            state.logits = self.advance(state, start)[:, -1]
            return state
        prefix, gated_batch = self._batch_prefix(names), self._batch_gated(names)
        hidden, cache, full_mask = self._causal_hidden(input_ids, attention_mask, prefix, gated_batch=gated_batch)
        # Logits of each row's last real token only (rows may be left- or right-padded).
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
        logits = static_decode.prefill_head(self, hidden[torch.arange(hidden.shape[0], device=self.device), last])
        prefix_len = prefix.lengths if prefix is not None else torch.zeros_like(last)
        return DecodeState(cache, full_mask, prefix_len + attention_mask.sum(-1), logits.float(), gated=gated_batch)

    @torch.no_grad()
    def advance(self, state: DecodeState, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` [batch, L] after the state; returns their logits [batch, L, vocab] and updates it."""
        tokens = tokens.to(self.device)
        if token_mask is None:
            token_mask = torch.ones_like(tokens)
        token_mask = token_mask.to(self.device).long()
        if self.shape.is_encoder_decoder:
            full_mask = torch.cat([state.attention_mask, token_mask], dim=1)
            out = self.base(
                encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder_hidden),
                attention_mask=state.encoder_mask,
                decoder_input_ids=tokens,
                decoder_attention_mask=full_mask,
                use_cache=True,
                **self.cache_arg.kwargs(state.cache),
            )
            logits = out.logits
        else:
            hidden, _, full_mask = self._causal_hidden(
                tokens,
                token_mask,
                None,
                cache=state.cache,
                prefix_len=state.next_position,
                past_mask=state.attention_mask,
                gated_batch=state.gated,
            )
            logits = self.head_logits(hidden)
        state.attention_mask = full_mask
        state.next_position = state.next_position + token_mask.sum(-1)
        return logits.float()

    # ------------------------------------------------------------------ user-level API
    def generate(
        self, prompts, adapters: AdapterNames = None, *, task_ids: TaskIds = None, **options
    ) -> list[str] | list[generation.Generation]:
        """Generate text per row (greedy by default). See `softprompt.engine.generation.generate`."""
        return generation.generate(self, prompts, adapters=self._with_tasks(adapters, task_ids, prompts), **options)

    def score(
        self, texts, labels: Sequence[str], adapters: AdapterNames = None, *, task_ids: TaskIds = None, **options
    ):
        """Rank candidate label strings by log-likelihood per row. See `softprompt.engine.scoring.score`."""
        return scoring.score(
            self, texts, labels=labels, adapters=self._with_tasks(adapters, task_ids, texts), **options
        )

    def _with_tasks(self, adapters: AdapterNames, task_ids: TaskIds, texts) -> AdapterNames:
        """Per-row keys ``NAME:TASK`` for ``texts`` (one string or a list) when ``task_ids`` are given."""
        if task_ids is None:
            return adapters
        return self._row_names(adapters, 1 if isinstance(texts, str) else len(texts), task_ids)
