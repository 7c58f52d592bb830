"""PEFT-parity scaffolding shared by the method tests (tests/methods): a PEFT model saved by PEFT and reloaded
beside ours loaded from PEFT's files, PEFT's forward on the common input, and the generation oracle, greedy
decoding of PEFT's forward, against our greedy tokens."""

import copy
from collections.abc import Callable

import torch
from peft import PeftModel, get_peft_model

from softprompt import SoftPromptModel
from softprompt.engine.generation import GenerationConfig, generate_batch

from tiny import tiny_tokenizer

INPUT = torch.tensor([[20, 30, 40, 50, 60, 70], [21, 31, 41, 51, 61, 71]])
MASK = torch.ones_like(INPUT)
DECODER_IDS = torch.tensor([[0, 33, 44, 55], [0, 34, 45, 56]])  # T5's decoder input
DECODER_LABELS = torch.tensor([[33, 44, 55, 66], [34, 45, 56, 67]])


def decoder_ids(family: str) -> torch.Tensor | None:
    return DECODER_IDS if family == "t5" else None


def labels_for(family: str) -> torch.Tensor:
    """Labels of INPUT: T5's decoder targets, or INPUT with its first tokens masked out."""
    return DECODER_LABELS if family == "t5" else INPUT.masked_fill(INPUT < 40, -100)


def ours_over(base, family: str) -> SoftPromptModel:
    """Our model over a copy of ``base``."""
    return SoftPromptModel(copy.deepcopy(base), tiny_tokenizer(), name_or_path=f"tiny-{family}")


def peft_from(base, path):
    """PEFT's model loading the adapter files at ``path`` over a copy of ``base``, for inference."""
    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def peft_pair(base, family: str, config, tmp_path, name: str, prepare: Callable | None = None):
    """PEFT's model with adapter ``config`` on a copy of ``base`` (``prepare(peft_model)``, under no_grad, sets its
    weights), saved by PEFT and reloaded; and ours over ``base`` with it loaded from PEFT's files as ``name``."""
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    if prepare is not None:
        with torch.no_grad():
            prepare(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = ours_over(base, family)
    ours.load_adapter(str(tmp_path / "peft"), name=name)
    return peft_from(base, tmp_path / "peft"), ours


def halve_prompt(peft_model) -> None:
    """A `peft_pair` ``prepare``: a clearly non-trivial prompt, at the scale of real embeddings and keys/values."""
    for p in peft_model.prompt_encoder.parameters():
        p.mul_(0.5)


def peft_forward(peft_model, family: str, **extra):
    """PEFT's output for INPUT (T5: with its decoder input), without gradients; ``extra``: labels, task_ids."""
    decoder = {"decoder_input_ids": DECODER_IDS} if family == "t5" and "labels" not in extra else {}
    with torch.no_grad():
        return peft_model(input_ids=INPUT, attention_mask=MASK, **decoder, **extra)


def peft_greedy(peft_model, seq2seq: bool, new: int, **extra) -> list[list[int]]:
    """The parity oracle for generation: greedy decoding of PEFT's full forward, rerun on the growing sequence at
    every step (no cache), argmax of the last position; ``extra``: e.g. task_ids. Not PEFT's `generate`: its
    cache handling for prompt learning breaks with transformers releases (PEFT 0.21.2's `generate` disagrees
    with its own forward under transformers 5.25), while its forward is what the logits tests pin down."""
    batch = INPUT.shape[0]
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(new):
            if seq2seq:
                start = torch.full((batch, 1), peft_model.base_model.config.decoder_start_token_id)
                decoder = torch.cat([start, tokens], dim=1)
                logits = peft_model(input_ids=INPUT, attention_mask=MASK, decoder_input_ids=decoder, **extra).logits
            else:
                ids = torch.cat([INPUT, tokens], dim=1)
                logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens.tolist()


def our_greedy(ours: SoftPromptModel, adapters, new: int) -> list[list[int]]:
    """Our greedy tokens for INPUT, all ``new`` of them (no end-of-sequence token, as the oracle runs without)."""
    ours.tokenizer.eos_token = None
    ours.base.config.eos_token_id = None
    ours.base.generation_config.eos_token_id = None
    return [g.token_ids for g in generate_batch(ours, INPUT, MASK, adapters, GenerationConfig(max_new_tokens=new))]


def assert_greedy_matches_peft(peft_model, ours: SoftPromptModel, adapters, family: str, new: int = 8, **extra):
    """Our greedy decoding with ``adapters`` equals greedy decoding of PEFT's forward (``extra``: e.g. task_ids)."""
    assert our_greedy(ours, adapters, new) == peft_greedy(peft_model, family == "t5", new, **extra)
