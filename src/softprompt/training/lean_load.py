"""Memory-lean FSDP sharding of a frozen base loaded from safetensors: each process reads only its own rows.

`softprompt.load` builds the base with transformers' ``from_pretrained``, which creates it on the meta device
and fills it from the safetensors files by memory-mapping them: where the file's dtype is the model's, no
weight is copied and nothing is resident until read. FSDP2's ``fully_shard`` then copies each process's rows
out of those mappings, and the pages it read stay resident beside the copies until the mapping is let go,
after the last weight: about the whole base per process at the peak (measured in docs/distributed.md).

`lean_plan` finds where every base parameter is stored (the checkpoint folder's safetensors headers). Then
`to_meta` swaps each parameter for a meta one before sharding (releasing the mapped weights), FSDP shards the
meta parameters, and `fill_shards` allocates this process's shards only and fills them with plain file reads
of exactly their rows (no mapping: the operating system's page cache holds the file, not the process).

ZeRO-3 partitions real parameters, one at a time, each from its whole tensor (a flat slice per process). There
`release` empties every parameter (releasing the mapped weights) and `fill_each` gives the parameters back their
data one module at a time, read from the files, each module's handed to DeepSpeed to partition before the
next is read: a process holds its partitions plus one module's weights.

A ``dtype`` other than the checkpoint's (``--dtype``) is applied as the rows are read: the base is loaded in the
checkpoint's own dtype (`stored_dtype`), whose weights stay file mappings, never converted copies of the whole.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from torch import nn

#: safetensors dtype names (those a frozen base stores).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's data lies in a safetensors file (row-major, little-endian)."""

    path: Path
    offset: int  # byte offset of its first element in the file
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_index(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder``, by name, from their headers (an 8-byte
    little-endian header length, then the JSON header; the data follows)."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype", "")) if name != "__metadata__" else None
            if dtype is not None:
                found[name] = StoredTensor(path, 8 + size + info["data_offsets"][0], dtype, tuple(info["shape"]))
    return found


def read_rows(stored: StoredTensor, start: int, out: torch.Tensor) -> None:
    """Rows ``start : start + len(out)`` (first dimension) of ``stored`` into ``out``, read from the file (not
    mapped), converted to ``out``'s dtype and device; a temporary of ``out``'s size only when those differ."""
    if out.numel() == 0:
        return
    direct = out.dtype == stored.dtype and out.device.type == "cpu" and out.is_contiguous()
    buffer = out if direct else torch.empty(out.shape, dtype=stored.dtype)
    row_bytes = math.prod(stored.shape[1:]) * buffer.element_size()
    view = buffer.reshape(-1).view(torch.uint8).numpy().data  # a writable memoryview of its bytes
    with open(stored.path, "rb", buffering=0) as f:
        f.seek(stored.offset + start * row_bytes)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{stored.path}: ends before the rows of a weight (a truncated safetensors file?)")
            done += got
    if not direct:
        out.copy_(buffer)


def checkpoint_folder(name_or_path: str | None) -> Path | None:
    """The local folder of a checkpoint: the path itself, or a hub id's cached snapshot (never downloads)."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(huggingface_hub.snapshot_download(name_or_path, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a hub id
        return None


def lean_plan(base: nn.Module) -> dict[str, StoredTensor] | None:
    """Where each parameter of ``base`` is stored, when every one is found in its checkpoint's safetensors files
    with its shape and its loaded first row equals the stored one; None otherwise (another format, keys or
    weights converted while loading, quantized weights, a model built in code): shard as loaded."""
    folder = checkpoint_folder(getattr(base.config, "name_or_path", None))
    if folder is None:
        return None
    stored = safetensors_index(folder)
    plan = {}
    for name, param in base.named_parameters():
        found = stored.get(name)
        if found is None or found.shape != tuple(param.shape) or param.ndim == 0 or not param.is_floating_point():
            return None
        first = torch.empty((1, *param.shape[1:]), dtype=param.dtype)
        read_rows(found, 0, first)
        if not torch.equal(first, param.detach()[:1].cpu()):
            return None
        plan[name] = found
    return plan


def stored_dtype(name_or_path: str | None) -> torch.dtype | None:
    """The one floating dtype of a checkpoint's safetensors weights (a local folder or a cached hub id); None when
    there are none, or several."""
    folder = checkpoint_folder(name_or_path)
    found = {t.dtype for t in safetensors_index(folder).values()} if folder is not None else set()
    floating = {dtype for dtype in found if dtype.is_floating_point}
    return floating.pop() if len(floating) == 1 else None


def to_meta(base: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Swap every parameter of ``base`` for a meta one of its shape and dtype (``dtype`` if given; a tied parameter
    stays one parameter), letting the loaded weights go. Buffers stay."""
    swapped: dict[int, nn.Parameter] = {}
    for module in base.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if id(param) not in swapped:
                meta = torch.empty_like(param, device="meta", dtype=dtype or param.dtype)
                swapped[id(param)] = nn.Parameter(meta, requires_grad=param.requires_grad)
            setattr(module, key, swapped[id(param)])


def fill_shards(base: nn.Module, plan: dict[str, StoredTensor], rank: int, world_size: int, device) -> None:
    """Allocate this process's shards of ``base``'s (FSDP-sharded, meta) parameters on ``device`` and read their
    rows from the checkpoint. FSDP2 shards the first dimension as ``torch.chunk`` does: rank r holds rows
    ``r * ceil(n / world_size)`` onwards."""
    buffers = {name: buffer.detach().clone() for name, buffer in base.named_buffers()}
    base.to_empty(device=device)  # allocates the shards (and buffers, restored below)
    with torch.no_grad():
        for name, buffer in buffers.items():
            base.get_buffer(name).copy_(buffer)
        for name, param in base.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            rows = param.shape[0]
            start = min(rank * -(-rows // world_size), rows)
            read_rows(plan[name], start, local)


def release(base: nn.Module, dtype: torch.dtype | None = None) -> dict[int, torch.Size]:
    """Empty every parameter of ``base`` in place (``dtype`` if given), letting the loaded weights go; returns each
    parameter's shape (by id) for `fill_each`. Buffers stay."""
    shapes = {}
    for param in base.parameters():  # each tied parameter once
        shapes[id(param)] = param.shape
        param.data = torch.empty(0, dtype=dtype or param.dtype)
    return shapes


def fill_each(
    base: nn.Module,
    plan: dict[str, StoredTensor],
    shapes: dict[int, torch.Size],
    partition: Callable[[list[nn.Parameter]], None],
) -> None:
    """Give the parameters `release` emptied their whole data back, one module at a time, read from the checkpoint
    in their (released) dtype, and hand each module's to ``partition`` before reading the next."""
    done: set[int] = set()
    with torch.no_grad():
        for prefix, module in base.named_modules():
            params = []
            for key, param in module.named_parameters(recurse=False):
                if id(param) in done:  # tied: filled as its first name
                    continue
                done.add(id(param))
                param.data = torch.empty(shapes[id(param)], dtype=param.dtype)
                read_rows(plan[f"{prefix}.{key}" if prefix else key], 0, param.data)
                params.append(param)
            if params:
                partition(params)


__all__ = [
    "StoredTensor",
    "checkpoint_folder",
    "fill_each",
    "fill_shards",
    "lean_plan",
    "read_rows",
    "release",
    "safetensors_index",
    "stored_dtype",
    "to_meta",
]
