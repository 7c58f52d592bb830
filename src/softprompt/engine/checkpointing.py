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
``torch.utils.checkpoint`` whose recomputation runs against a copy of the cache as it was before the block (the
cache, nested caches and their layers, attributes copied, tensors shared), not against the cache itself: the
copy keeps the tensors only of the layer the block changed (what it read, the prefix), so the backward pass does
not keep every layer's keys/values of the whole text alive as the checkpoint's function holding the cache would.
In a pass whose cache is thrown away after it (a training forward's text pass, `dropping_caches`) each block
also puts its layer of the cache back as it found it, so the text's keys/values do not pile up to the pass's end.
Dynamic caches (the only ones the engine builds) rebind their tensors on update rather than writing into them,
so a copy of attributes is the whole state. Generation and scoring run without gradients and never enter this
path.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    whose recomputation sees the key/value cache as the first run did.

    The recomputation runs against a copy of the cache taken before the block (`_CacheCopy`), never the cache
    itself: the checkpoint holds its function until the backward pass reaches the block, and a function holding
    the cache would keep every layer's keys/values of the whole text alive through the backward (a plain pass
    frees the cache after the forward). The copy keeps the tensors only of what the block changed (its own layer:
    the prefix it read), and the rest as meta tensors (shapes, no data)."""
    partial = forward if isinstance(forward, functools.partial) else functools.partial(forward)
    copy = _CacheCopy([v for v in [*partial.args, *args, *partial.keywords.values()] if isinstance(v, Cache)])
    recompute = functools.partial(
        partial.func, *map(copy.swap, partial.args), **{k: copy.swap(v) for k, v in partial.keywords.items()}
    )
    # A cache passed positionally reaches `run` as None, since the checkpoint keeps its inputs until the backward.
    positional = {i: arg for i, arg in enumerate(args) if isinstance(arg, Cache)}
    copies_at = {i: copy.swap(arg) for i, arg in positional.items()}
    first = [(forward, positional)]  # dropped once run, so that nothing the checkpoint keeps holds the cache

    def run(*inputs: Any) -> Any:
        if first:  # the first run; any later one is the backward pass's recomputation
            function, caches = first.pop()
            output = function(*(caches.get(i, value) for i, value in enumerate(inputs)))
            copy.settle(drop_new=_dropping_caches.get())
            return output
        return recompute(*(copies_at.get(i, value) for i, value in enumerate(inputs)))

    return checkpoint(run, *(None if isinstance(arg, Cache) else arg for arg in args), use_reentrant=False)


class _CacheCopy:
    """Copies of caches, their nested caches (encoder-decoder) and their layers, with the attributes they have now
    (lists and dicts copied, tensors shared). Until `settle` it also knows the originals."""

    def __init__(self, caches: list[Cache]) -> None:
        self.copies: dict[int, object] = {}
        self.before: list[tuple[object, dict[str, Any]]] = []  # each original and its attributes now
        todo: list[object] = list(caches)
        while todo:
            obj = todo.pop()
            if id(obj) in self.copies:
                continue
            attributes = {k: v.copy() if isinstance(v, (list, dict)) else v for k, v in vars(obj).items()}
            self.before.append((obj, attributes))
            self.copies[id(obj)] = object.__new__(type(obj))
            for value in attributes.values():
                items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
                todo.extend(v for v in items if isinstance(v, (Cache, CacheLayerMixin)))
        for obj, attributes in self.before:
            vars(self.copies[id(obj)]).update({k: self._swap_in(v) for k, v in attributes.items()})

    def swap(self, value: Any) -> Any:
        """``value``'s copy if it is a copied cache, else ``value``."""
        return self.copies.get(id(value), value) if isinstance(value, Cache) else value

    def _swap_in(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._swap_in(v) for v in value]
        if isinstance(value, dict):
            return {k: self._swap_in(v) for k, v in value.items()}
        return self.copies.get(id(value), value) if isinstance(value, (Cache, CacheLayerMixin)) else value

    def settle(self, drop_new: bool) -> None:
        """After the first run: the copies of what the block left as it was (other layers) keep meta tensors only,
        and the originals are let go. ``drop_new``: the originals the block changed (its layer) are put back as
        they were, the block's keys/values dropped from the cache (`dropping_caches`)."""
        for obj, attributes in self.before:
            if not _changed(attributes, vars(obj)):
                copy = vars(self.copies[id(obj)])
                copy.update(
                    {k: torch.empty_like(v, device="meta") for k, v in copy.items() if isinstance(v, torch.Tensor)}
                )
            elif drop_new:
                vars(obj).clear()
                vars(obj).update({k: v.copy() if isinstance(v, (list, dict)) else v for k, v in attributes.items()})
        self.before = []


_dropping_caches: contextvars.ContextVar[bool] = contextvars.ContextVar("dropping_caches", default=False)


@contextlib.contextmanager
def dropping_caches() -> Iterator[None]:
    """Within: a checkpointed block leaves the key/value cache as it found it (its own keys/values are not kept),
    for a pass whose cache is thrown away after it (a training forward). Without checkpointing autograd keeps those
    keys/values for the backward anyway; with it, nothing would but the cache, up to the end of the forward."""
    token = _dropping_caches.set(True)
    try:
        yield
    finally:
        _dropping_caches.reset(token)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b) and a == b)


def _changed(before: dict[str, Any], now: dict[str, Any]) -> bool:
    return before.keys() != now.keys() or not all(_same(before[k], now[k]) for k in before)
