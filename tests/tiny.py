"""Tiny random-weight models and a byte-level tokenizer, built in-process (no network)."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from softprompt import SoftPromptModel

SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = 256 + len(SPECIALS)
FAMILIES = ["gpt2", "bloom", "llama", "gemma3", "t5"]
CAUSAL = ["gpt2", "bloom", "llama", "gemma3"]


@functools.cache
def _tokenizer_json() -> str:
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    return tok


def tiny_base(family: str, seed: int = 0, **config):
    """A tiny random model of ``family``; ``config``: more config fields (``tie_word_embeddings=False``, say)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2, **config)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "bloom":
        cfg = BloomConfig(n_layer=2, hidden_size=32, n_head=4, **common)
        model = BloomForCausalLM(cfg)
    elif family == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=128,
            **common,
        )
        model = Gemma3ForCausalLM(cfg)
    elif family == "t5":
        cfg = T5Config(
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **common,
        )
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    model.eval()
    return model


def tiny_model(family: str, seed: int = 0) -> SoftPromptModel:
    return SoftPromptModel(tiny_base(family, seed), tiny_tokenizer(), name_or_path=f"tiny-{family}")


def save_tiny_checkpoint(family: str, path, seed: int = 0) -> str:
    """Write a tiny model + tokenizer as a normal local checkpoint, loadable by `softprompt.load(path)`."""
    tiny_base(family, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
