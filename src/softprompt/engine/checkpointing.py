"""Activation (gradient) checkpointing of the frozen base's transformer blocks, eval mode kept.

Each block of the families table (`FamilyQuirks.blocks`) is a transformers ``GradientCheckpointingLayer``. Such a
layer checkpoints its own ``forward`` through ``self._gradient_checkpointing_func`` when ``gradient_checkpointing``
is set; transformers' ``gradient_checkpointing_enable`` sets both on every layer. softprompt cannot use that
switch as it is, for two reasons:

* the layer checkpoints only while ``self.training``; softprompt keeps the frozen base in eval mode (no dropout);
* the layer drops the key/value cache of a checkpointed call, because the backward pass's recomputation would
  append the block's keys and values to it a second time; but softprompt's prefixes *are* that cache (the text
  pass reads each row's prefix from it and the prompt pass returns its keys/values through it).

`checkpointed_blocks` therefore sets the same two attributes, for the duration of one forward that needs
gradients, plus the layer's own flags that keep the cache (``_can_checkpoint_with_cache``) and let the hook run
(the layer's ``training``, on the layer itself only: its children, where dropout lives, stay in eval mode; no
block's own ``forward`` reads it). Its checkpoint function, `_checkpoint`, is non-reentrant
``torch.utils.checkpoint`` that replays the recomputation against the cache as it was before the block: it
snapshots the cache's state (the cache, nested caches and their layers' attributes) before the block runs, and
around the recomputation puts that state back, then the state found at that time. Dynamic caches (the only ones
the engine builds) rebind their tensors on update rather than writing into them, so a snapshot of attributes is
the whole state. Generation and scoring run without gradients and never enter this path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from softprompt.errors import SoftPromptError

FLAG = "--gradient-checkpointing"


def blocks_of(base: nn.Module, paths: tuple[str, ...], model_type: str) -> list[nn.Module]:
    """The transformer blocks at ``paths`` (the families table's ``blocks``) of ``base``; a `SoftPromptError`
    naming the flag when the family has none or they cannot be checkpointed."""
    if not paths:
        raise SoftPromptError(
            f"{FLAG}: model type {model_type!r} is not supported (softprompt does not know its transformer "
            "blocks; add them, `blocks`, to its row of softprompt.engine.families.FAMILY_QUIRKS)"
        )
    blocks: list[nn.Module] = []
    for path in paths:
        try:
            blocks.extend(base.get_submodule(path).children())
        except AttributeError:
            raise SoftPromptError(
                f"{FLAG}: model type {model_type!r} has no module {path!r} ({type(base).__name__}), where "
                "softprompt.engine.families.FAMILY_QUIRKS says its transformer blocks are"
            ) from None
    odd = next((b for b in blocks if not isinstance(b, GradientCheckpointingLayer)), None)
    if odd is not None:
        raise SoftPromptError(
            f"{FLAG}: model type {model_type!r} is not supported (its block {type(odd).__name__} is not a "
            "transformers GradientCheckpointingLayer)"
        )
    return blocks


def when_recording(blocks: list[nn.Module] | None) -> contextlib.AbstractContextManager:
    """A forward's context: ``blocks`` checkpointed (`checkpointed_blocks`) if given and autograd records this
    pass; else nothing (generation, scoring, ``torch.no_grad``)."""
    return checkpointed_blocks(blocks) if blocks and torch.is_grad_enabled() else contextlib.nullcontext()


@contextlib.contextmanager
def checkpointed_blocks(blocks: list[nn.Module]) -> Iterator[None]:
    """Within: every call of a block in ``blocks`` is checkpointed (see the module docstring)."""
    switches = {
        "gradient_checkpointing": True,
        "_gradient_checkpointing_func": _checkpoint,
        "_can_checkpoint_with_cache": True,  # `_checkpoint` replays the cache, so the layer keeps it
        "training": True,  # the layer's own flag only, which gates its hook (not nn.Module.train: children stay eval)
    }
    saved = [{name: vars(block)[name] for name in switches if name in vars(block)} for block in blocks]
    for block in blocks:
        vars(block).update(switches)
    # The layer warns once that it sets `use_cache=False` for the call: a no-op here (the blocks update the cache
    # they are given whatever `use_cache` says), so the warning would only mislead.
    layer_log = logging.getLogger(GradientCheckpointingLayer.__module__)
    level = layer_log.level
    layer_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        layer_log.setLevel(level)
        for block, attributes in zip(blocks, saved):
            for name in switches:
                vars(block).pop(name, None)
            vars(block).update(attributes)


def _checkpoint(forward: Callable[..., Any], *args: Any) -> Any:
    """Non-reentrant checkpoint of one block call (``forward``: the layer's forward with its keyword arguments)
    whose recomputation sees the key/value cache as the first run did."""
    keywords = forward.keywords if isinstance(forward, functools.partial) else {}
    caches = [value for value in [*args, *keywords.values()] if isinstance(value, Cache)]
    before = _snapshot(caches)
    recomputing = False

    def run(*inputs: Any) -> Any:
        nonlocal recomputing
        if not recomputing:  # the first run; any later one is the backward pass's recomputation
            recomputing = True
            return forward(*inputs)
        now = _snapshot(caches)
        _restore(before)
        try:
            return forward(*inputs)
        finally:
            _restore(now)

    return checkpoint(run, *args, use_reentrant=False)


_State = list[tuple[object, dict[str, Any]]]


def _snapshot(caches: list[Cache]) -> _State:
    """The attributes of each cache, its nested caches (encoder-decoder) and its layers; lists and dicts copied."""
    state: _State = []
    todo: list[object] = list(caches)
    while todo:
        obj = todo.pop()
        attributes = {k: v.copy() if isinstance(v, (list, dict)) else v for k, v in vars(obj).items()}
        state.append((obj, attributes))
        for value in attributes.values():
            items = value if isinstance(value, list) else [value]
            todo.extend(v for v in items if isinstance(v, (Cache, CacheLayerMixin)))
    return state


def _restore(state: _State) -> None:
    for obj, attributes in state:
        vars(obj).clear()
        vars(obj).update({k: v.copy() if isinstance(v, (list, dict)) else v for k, v in attributes.items()})
