"""Static decoding: a running batch in a preallocated key/value slot pool, its step optionally compiled.

`SoftPromptModel.advance` (the "eager" path) grows a transformers `DynamicCache` by one column per step: every
layer's keys and values are concatenated anew, and so is the 2D mask, from which transformers rebuilds the 4D one.
Here ("static" and "compiled", `SoftPromptModel.decode`) a batch lives in a `SlotPool`: per layer keys/values
``[slots, kv_heads, capacity, head_dim]`` and a bool mask ``[slots, capacity]``, allocated once. A prefilled row
(the usual mixed-adapter `SoftPromptModel.prefill`: its prefix and text, padding columns masked) is copied into a
free slot's first columns; each slot has its own length, and a step writes every row's new key/value at that
row's own column, in place, and sets that mask column. The backbone gets the mask as a 4D view, which
transformers' mask code returns unchanged. A finished row frees its slot; nothing else moves.

Shapes are bucketed (slots and capacity to powers of two) so that "compiled" (`torch.compile`: inductor on CPU,
CUDA graphs via ``mode="reduce-overhead"`` on CUDA) compiles once per bucket; pools, with their compiled step,
are kept per model and bucket. A row that reaches the capacity grows the pool (a copy into the next bucket).
Where compiling fails (no C++ compiler, an unsupported operation) the step runs eagerly, after one log line.

States this cannot hold keep the eager path (`supports`): encoder-decoder models and sliding-window cache layers
(their caches are not plain full-width key/value tensors: `DecodeState.mergeable`), rows with gated prompts
(adaption prompts attend through a per-batch keyword that the pool does not carry), families without position
ids (Bloom's ALiBi derives positions from a 2D mask, which a 4D one replaces), and attention other than
transformers' SDPA routed through `softprompt.engine.attention` (eager attention wants an additive float mask).
"""

from __future__ import annotations

import logging
import types
import weakref
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, StaticLayer

from softprompt.engine.decode import DecodeState, kv_layers

log = logging.getLogger("softprompt.engine")

# Smallest capacity bucket (key/value columns per slot).
MIN_CAPACITY = 64
# Columns reserved up front for generated tokens at most; rows that go further grow the pool.
MAX_RESERVE = 256
# Compiles of a model's step allowed. All of a model's pools step through one code object (`compile_step`), and
# dynamo allows 8 compiles of a code object by default, then runs it eagerly with only a warning; one compile per
# bucket is this design (a server passes 10 buckets quickly: slots 1-16 x two capacities), so its calls raise it.
RECOMPILE_LIMIT = 256


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two at least ``max(n, minimum)``."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


class SlotLayer(StaticLayer):
    """One layer of a `SlotPool`: transformers' `StaticLayer` (preallocated keys/values with static addresses, which
    CUDA graphs need), except that each row writes its new key/value at its own column, ``columns[row]``.
    `StaticLayer.update` writes every row at one shared position, which rows of different lengths cannot use;
    so only `update` is ours."""

    def __init__(self, capacity: int, columns: torch.Tensor):
        super().__init__(max_cache_len=capacity)
        self.columns = columns  # [slots], shared by the pool's layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        assert self.keys is not None and self.values is not None  # allocated by the pool
        rows, heads = key_states.shape[:2]
        where = self.columns[:, None, None, None]
        self.keys.scatter_(2, where.expand(rows, heads, 1, key_states.shape[-1]), key_states)
        self.values.scatter_(2, where.expand(rows, heads, 1, value_states.shape[-1]), value_states)
        return self.keys, self.values


class SlotPool:
    """Preallocated keys/values, mask, write columns and positions of ``slots`` rows of ``capacity`` columns.

    A free slot attends to its column 0 only (so its attention is defined) and writes there; its results are
    never read. ``lengths`` (host side) is each slot's next column, so no step reads a device value back.
    """

    def __init__(
        self, heads: list[int], head_dim: int, slots: int, capacity: int, compiled: Callable | None, dtype, device
    ):
        # No reference to the model: the registry of pools is keyed weakly by it.
        self.slots, self.capacity = slots, capacity
        self.heads, self.head_dim, self.dtype = heads, head_dim, dtype
        self.columns = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.mask[:, 0] = True
        self.lengths = [0] * slots
        self.layers = [SlotLayer(capacity, self.columns) for _ in heads]
        self.cache = Cache(layers=list(self.layers))
        self.cache.early_initialization(slots, heads, head_dim, dtype, device)
        # allocated now: per layer [slots, heads, capacity, head_dim] keys and values
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            assert layer.keys is not None and layer.values is not None
            self.kv.append((layer.keys, layer.values))
        # The model's compiled `decode_step` (`_Pools`), or None: the step runs eagerly.
        self.run: Callable[..., torch.Tensor] = compiled or decode_step
        self.compiled = compiled is not None
        self.owner: weakref.ref | None = None  # the `SlotState` using the pool

    def admit(self, slots: list[int], state: DecodeState) -> None:
        """Copy the rows of a prefilled ``state`` into ``slots`` (free, and wide enough)."""
        width = state.attention_mask.shape[1]
        index = torch.tensor(slots, device=self.mask.device)
        for (keys, values), (_, new_keys, new_values) in zip(self.kv, kv_layers(state.cache)):
            keys[index, :, :width] = new_keys.to(keys.dtype)
            values[index, :, :width] = new_values.to(values.dtype)
        self.mask[index] = False
        self.mask[index, :width] = state.attention_mask.bool()
        self.columns[index] = width
        self.positions[index, 0] = state.next_position
        for slot in slots:
            self.lengths[slot] = width

    def free(self, slots: list[int]) -> None:
        if not slots:
            return
        index = torch.tensor(slots, device=self.mask.device)
        self.mask[index] = False
        self.mask[index, 0] = True
        self.columns[index] = 0
        self.positions[index] = 0
        for slot in slots:
            self.lengths[slot] = 0

    def copy_from(self, other: SlotPool) -> None:
        """Take ``other``'s rows (a smaller pool: fewer slots or columns) into the same slots and columns."""
        slots, width = other.slots, other.capacity
        for (keys, values), (old_keys, old_values) in zip(self.kv, other.kv):
            keys[:slots, :, :width] = old_keys
            values[:slots, :, :width] = old_values
        self.mask[:slots] = False
        self.mask[:slots, :width] = other.mask
        self.columns[:slots] = other.columns
        self.positions[:slots] = other.positions
        self.lengths[:slots] = other.lengths

    def step(self, model, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens[i]`` to slot ``slots[i]``; the next-token logits of those slots, in that order."""
        self.tokens[slots, 0] = tokens.to(self.tokens.device)
        self.mask[slots, self.columns[slots]] = True
        logits = self.run(self, model, self.tokens, self.positions, self.mask[:, None, None, :])
        self.columns[slots] += 1
        self.positions[slots, 0] += 1
        return logits[slots]


def decode_step(pool: SlotPool, model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
    """One decoding step of every slot of ``pool``: the float32 next-token logits ``[slots, vocab]``."""
    out = model.backbone(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions,  # `supports`: only families that take them
        use_cache=True,
        **model.cache_arg.kwargs(pool.cache),
    )
    return model.head_logits(out.last_hidden_state[:, -1]).float()


def compile_step(device_type: str) -> Callable[..., torch.Tensor]:
    """`decode_step` compiled for one model: the step of all its pools (one graph per bucket).

    Dynamo keeps compiled graphs per code object and, before each call, evaluates the guards that choose one. Its
    guards on the model's modules (hundreds of attributes and parameters) cost 3 ms of a 19 ms step on a 135M model
    (research/NOTES.md), so they are skipped: the frozen base's modules do not change while it decodes. Skipping them
    is safe only if no other model's graph can be chosen, so every model compiles its own copy of the code object.
    The pool's tensors and the step's inputs keep their guards (a bucket is chosen by their shapes)."""
    return _compiled_copy(decode_step, device_type, dynamic=False)


def prefill_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits of a prefill's last hidden states ``[rows, hidden]``; compiled (once per model, rows
    dynamic) when ``model.decode`` is "compiled": torchao's eager int8 head converts its whole weight per call, 22 ms
    of a 21-token prefill's 86 ms on smollm2-135m, where the compiled head runs torch's int8-weight kernel."""
    if model.decode != "compiled":  # every prefill passes here: eager models touch no registry
        return model.head_logits(hidden)
    registry = _POOLS.setdefault(model, _Pools())
    if registry.compile_failed:
        return model.head_logits(hidden)
    kind = hidden.device.type
    head = registry.heads.get(kind) or registry.heads.setdefault(kind, _compiled_copy(head_step, kind, dynamic=None))
    try:
        return head(model, hidden)
    except Exception as exc:
        _compile_failed(model, exc)
        return model.head_logits(hidden)


def head_step(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.head_logits(hidden)


def _compiled_copy(fn: Callable, device_type: str, dynamic: bool | None) -> Callable[..., torch.Tensor]:
    """``fn`` compiled for one model, without dynamo's module guards (see `compile_step`)."""
    code = fn.__code__.replace()  # a new code object: its own dynamo cache
    fresh = types.FunctionType(code, fn.__globals__, fn.__name__)
    options: dict = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if device_type == "cuda":
        options["triton.cudagraphs"] = True  # mode="reduce-overhead", which cannot be named beside options
    compiled = torch.compile(fresh, dynamic=dynamic, options=options)

    def run(*args) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)

    return run


class _Pools:
    """A model's pools by bucket, its compiled step; and whether compiling failed once already."""

    def __init__(self) -> None:
        self.pools: dict[tuple, SlotPool] = {}
        self.compiled: dict[str, Callable[..., torch.Tensor]] = {}  # the step, by device type
        self.heads: dict[str, Callable[..., torch.Tensor]] = {}  # the prefill's head, by device type
        self.compile_failed = False


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def acquire(
    model, heads: list[int], head_dim: int, dtype, device, slots: int, capacity: int, owner: SlotState
) -> SlotPool:
    """A pool of this bucket for ``model`` (kept and reused; a fresh one if another state holds it)."""
    registry = _POOLS.setdefault(model, _Pools())
    compiled = None
    if model.decode == "compiled" and not registry.compile_failed:
        kind = torch.device(device).type
        compiled = registry.compiled.get(kind) or registry.compiled.setdefault(kind, compile_step(kind))
    key = (slots, capacity, compiled is not None, tuple(heads), head_dim, dtype, device)
    pool = registry.pools.get(key)
    if pool is None or (pool.owner is not None and pool.owner() is not None):
        pool = SlotPool(heads, head_dim, slots, capacity, compiled, dtype, device)
        registry.pools.setdefault(key, pool)
    else:
        pool.free(list(range(slots)))
    pool.owner = weakref.ref(owner)
    return pool


def run_step(model, pool: SlotPool, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`SlotPool.step`, falling back to the eager step (one log line, once per model) when compiling fails."""
    try:
        return pool.step(model, slots, tokens)
    except Exception as exc:
        if not pool.compiled:
            raise
        _compile_failed(model, exc)
        return pool.step(model, slots, tokens)


def _compile_failed(model, exc: Exception) -> None:
    """Everything of ``model`` runs eagerly from now on; said once."""
    registry = _POOLS.setdefault(model, _Pools())
    if not registry.compile_failed:
        log.warning("decode=compiled: torch.compile failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
    registry.compile_failed = True
    for other in registry.pools.values():
        other.compiled, other.run = False, decode_step


def supports(model, state: DecodeState) -> bool:
    """Whether ``state`` (just prefilled) can decode in a slot pool; see the module docstring for why not."""
    return (
        model.decode != "eager"
        and isinstance(state, DecodeState)
        and state.mergeable
        and state.gated is None
        and model.quirks.takes_position_ids
        and model.grouped_attention
        and all(keys.shape == values.shape for _, keys, values in kv_layers(state.cache))
    )


class SlotState:
    """A running batch in a `SlotPool`, with `DecodeState`'s interface for decoding (`rows`, ``logits``, `select`,
    `merge`, `step`): state row ``i`` is pool slot ``slots[i]``."""

    mergeable = True

    def __init__(self, model, state: DecodeState, reserve: int = 0):
        self.model = model
        width = state.attention_mask.shape[1]
        keys = [k for _, k, _ in kv_layers(state.cache)]
        self.pool = acquire(
            model,
            [k.shape[1] for k in keys],
            keys[0].shape[-1],
            keys[0].dtype,
            keys[0].device,
            bucket(state.rows),
            bucket(width + min(reserve, MAX_RESERVE), MIN_CAPACITY),
            self,
        )
        self.slots = list(range(state.rows))
        self.pool.admit(self.slots, state)
        self.logits = state.logits
        self.index = torch.tensor(self.slots, device=self.pool.mask.device)

    @property
    def rows(self) -> int:
        return len(self.slots)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows``; the others' slots are freed."""
        keep = rows.tolist()
        kept = set(keep)
        self.pool.free([slot for i, slot in enumerate(self.slots) if i not in kept])
        self.slots = [self.slots[i] for i in keep]
        self.logits = self.logits[rows]
        self.index = torch.tensor(self.slots, device=self.pool.mask.device)

    def trim(self) -> None:
        """Nothing to trim: a slot's columns are its own."""

    def accepts(self, other: DecodeState) -> bool:
        return supports(self.model, other)

    def merge(self, other: DecodeState) -> None:
        """Copy the rows of ``other`` (`accepts`) into free slots, growing the pool when there are too few."""
        width = other.attention_mask.shape[1]
        self._grow(bucket(self.rows + other.rows), bucket(width + 1, self.pool.capacity))
        used = set(self.slots)
        free = [slot for slot in range(self.pool.slots) if slot not in used][: other.rows]
        self.pool.admit(free, other)
        self.slots += free
        self.logits = torch.cat([self.logits, other.logits])
        self.index = torch.tensor(self.slots, device=self.pool.mask.device)

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its token; the rows' next-token logits."""
        longest = max(self.pool.lengths[slot] for slot in self.slots)
        if longest >= self.pool.capacity:
            self._grow(self.pool.slots, bucket(longest + 1, self.pool.capacity))
        for slot in self.slots:
            self.pool.lengths[slot] += 1
        return run_step(model, self.pool, self.index, tokens)

    def _grow(self, slots: int, capacity: int) -> None:
        """Move the rows into a pool of at least ``slots`` slots and ``capacity`` columns, if this one is smaller."""
        old = self.pool
        slots, capacity = max(slots, old.slots), max(capacity, old.capacity)
        if (slots, capacity) == (old.slots, old.capacity):
            return
        device = old.mask.device
        new = acquire(self.model, old.heads, old.head_dim, old.dtype, device, slots, capacity, self)
        new.copy_from(old)
        old.owner = None
        self.pool = new


def start(model, state: DecodeState, reserve: int = 0) -> DecodeState | SlotState:
    """The running batch for a prefilled ``state``: a `SlotState` where `supports` says so, else ``state``
    itself. ``reserve``: columns to leave for generated tokens (``max_new_tokens``), so the pool need not grow."""
    return SlotState(model, state, reserve) if supports(model, state) else state
