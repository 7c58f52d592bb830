"""Data-parallel training across processes and machines, on Hugging Face Accelerate.

`softprompt train` runs unchanged under ``accelerate launch`` or ``torchrun``: they set ``WORLD_SIZE``
(and ``RANK``/``LOCAL_RANK``) in the environment, and `current` then starts an `accelerate.Accelerator`
(process group, device of this process). Without them, or with ``WORLD_SIZE=1``, `current` is a
`Distributed` of one process whose every method is a no-op, so single-process training is untouched.

How a step is shared (only the small adapters train; the frozen base is never wrapped in DDP):

* Every process builds the same epoch order and the same global batches (same seed, same
  ``--batch-size``, which stays the *global* batch size); `Distributed.shard` keeps this process's
  contiguous, disjoint slice of each batch.
* One process's loss is the mean over its label tokens. `Distributed.batch_loss` turns it into its share
  of the mean over the label tokens of the *whole* batch (token counts are summed over processes), so
  the sum of the processes' gradients is the gradient one process computes for that batch.
* `Distributed.sync_gradients` sums every adapter gradient (one flat all-reduce per optimizer step) and
  keeps "no gradient" where no process had one (AdamW skips those parameters, as in one process). Every
  process then takes the same optimizer step.
* Validation, the metrics log, the progress bar, checkpoints and adapter files are the main process's
  (rank 0); `Distributed.share_state` then hands its loop state (best scores, early stopping) to all.

FSDP (an accelerate config with ``distributed_type: FSDP``, ``fsdp_version: 2``): the same, except that
the frozen base is sharded over the processes with torch's FSDP2 ``fully_shard`` (`Distributed.shard_base`,
units from `fsdp_units`), so each process holds about ``1/world_size`` of its weights and all-gathers one
unit at a time while it runs. The adapters stay whole on every process and keep the all-reduce above:
``accelerator.prepare`` is not used, because it would wrap (and shard) the trainable adapters too. Every
forward pass over a sharded base is a collective, so under FSDP *every* process runs validation (the
same rows, the same passes) and the main process alone records it.

DeepSpeed ZeRO-3 (an accelerate config with ``distributed_type: DEEPSPEED``, ``zero_stage: 3``): the same
as FSDP, with DeepSpeed partitioning the frozen base instead (`Distributed.shard_base`: its
``DeepSpeedZeRoOffload``, the parameter partitioner of ``deepspeed.initialize`` without an optimizer).
Its hooks gather each module's own weights in that module's forward (and again for the backward pass), so
any module can be called directly and no unit table is needed. The adapters, the optimizer (softprompt's
AdamW) and the gradient all-reduce stay softprompt's; DeepSpeed's engine is not used.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from softprompt.errors import ConfigError
from softprompt.training import lean_load
from softprompt.training.sharding import (
    FsdpSettings,
    ZeroSettings,
    deepspeed_launch,
    fsdp_launch,
    fsdp_settings,
    zero_settings,
)

#: Accelerate launch modes softprompt does not implement (see docs/distributed.md). FSDP and DeepSpeed
#: ZeRO-3 are implemented.
UNSUPPORTED = {"MEGATRON_LM", "XLA"}


class Distributed:
    """This process's place in the job; one process (``world_size == 1``) makes every method a no-op."""

    def __init__(self, accelerator=None, fsdp: FsdpSettings | None = None, zero: ZeroSettings | None = None):
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.rank == 0
        self.fsdp = fsdp if self.world_size > 1 else None
        self.zero = zero if self.world_size > 1 else None
        self._partitioner = None  # ZeRO-3: DeepSpeed's DeepSpeedZeRoOffload once the base is partitioned

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def shards_base(self) -> bool:
        """FSDP or ZeRO-3: the frozen base is sharded, so every process must take part in every forward pass."""
        return self.fsdp is not None or self.zero is not None

    @property
    def activation_checkpointing(self) -> bool:
        """Whether the launch's accelerate config asked for activation checkpointing (``fsdp_activation_checkpointing``),
        which softprompt honours as ``--gradient-checkpointing``."""
        return self.fsdp is not None and self.fsdp.activation_checkpointing

    def __repr__(self) -> str:
        return (
            f"Distributed(rank={self.rank}, world_size={self.world_size}, fsdp={self.fsdp is not None}, "
            f"zero3={self.zero is not None})"
        )

    # ------------------------------------------------------------------ set-up
    def device(self, requested: str | None) -> str | None:
        """The device to train on: ``requested`` in one process, else this process's device (Accelerate's)."""
        if not self.enabled:
            return requested
        mine = self.accelerator.device
        if requested and torch.device(requested).type != mine.type:
            raise ConfigError(
                f"--device: {requested!r} does not match the device accelerate gave this process "
                f"({mine}); leave --device out when launching several processes"
            )
        return str(mine)

    def load_device(self, requested: str | None) -> str | None:
        """Where to load the base: under FSDP or ZeRO-3 on the CPU, from where `shard_base` moves one unit
        (ZeRO-3: one weight) at a time, so a device never holds more than the shards plus that; else `device`."""
        device = self.device(requested)
        return "cpu" if self.shards_base else device

    def load_dtype(self, name_or_path: str | None, requested: str | None) -> str | torch.dtype | None:
        """The dtype to load the base in: ``requested``, except under FSDP or ZeRO-3, which load a safetensors
        checkpoint in its own dtype (its weights then stay file mappings, never a converted copy of the whole base)
        and convert each process's rows as they are read (`shard_base` with ``requested``)."""
        stored = lean_load.stored_dtype(name_or_path) if self.shards_base and requested is not None else None
        return stored if stored is not None else requested

    def shard_base(self, model, dtype: str | None = None) -> None:
        """FSDP or ZeRO-3: shard ``model``'s frozen base over the processes, in ``dtype`` if given; no-op otherwise.

        Call it after the adapters exist: their initialisation from the embedding table (text or
        vocabulary init) reads whole weights (in the dtype `load_dtype` loaded them in). The adapters stay
        unsharded and move to this process's device.
        """
        wanted = getattr(torch, dtype) if dtype is not None else None
        if self.zero is not None:
            self._partition_base(model, self.zero, wanted)
        elif self.fsdp is not None:
            self._fully_shard_base(model, self.fsdp, wanted)

    def _fully_shard_base(self, model, fsdp: FsdpSettings, dtype: torch.dtype | None) -> None:
        """FSDP2 ``fully_shard`` of the base, one unit per `fsdp_units` entry. A base whose every weight is found
        in its checkpoint's safetensors files is sharded lean (`softprompt.training.lean_load`): on the meta
        device, then each process reads only its own rows, so it never holds more than its shards."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        base = model.base
        if isinstance(base, FSDPModule):  # already sharded (a second job on the same model)
            return
        units = fsdp_units(model)
        mesh = init_device_mesh(self.accelerator.device.type, (self.world_size,))
        plan = lean_load.lean_plan(base)
        if plan is not None:
            lean_load.to_meta(base, dtype)
        elif dtype is not None:
            base.to(dtype)
        for unit in [*units, base]:  # inner units first; the root holds whatever is left
            fully_shard(unit, mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward)
        if plan is not None:
            lean_load.fill_shards(base, plan, self.rank, self.world_size, self.accelerator.device)
        # FSDP2 initialises every unit lazily in the root's first forward; softprompt calls the backbone,
        # embeddings and head directly, so run that first forward through the root once, here.
        ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        with torch.no_grad():
            base(input_ids=ids, **({"decoder_input_ids": ids} if model.shape.is_encoder_decoder else {}))
        for module in base.modules():  # reshard_after_forward false would keep that pass's gathered weights
            if isinstance(module, FSDPModule):
                module.reshard()
        model.adapters.to(model.device)

    def _partition_base(self, model, zero_settings: ZeroSettings, dtype: torch.dtype | None) -> None:
        """ZeRO-3: DeepSpeed partitions every base weight over the processes (each keeps a flat
        ``1/world_size`` slice, ``ds_tensor``; the parameter itself becomes empty) and hooks every module to
        all-gather its own weights for its forward and backward and free them after. A base whose every weight is
        found in its checkpoint's safetensors files is partitioned lean (`softprompt.training.lean_load`): emptied,
        then read back and partitioned one module at a time."""
        import deepspeed
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

        base = model.base
        if any(hasattr(p, "ds_id") for p in base.parameters()):  # already partitioned (a second job)
            return
        if self.accelerator.device.type == "cpu":
            # DeepSpeed's CPU backend would compile its shared-memory all-reduce (C++, minutes on a machine's
            # first launch) for tensor-parallel inference, which is not used here: mark it unbuildable
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # DeepSpeed's communication layer over the process group accelerate started (no second group)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        # train_batch_size only satisfies DeepSpeed's config checks: softprompt splits its own batches
        config = {"train_batch_size": self.world_size, "zero_optimization": zero_settings.zero_optimization}
        zero = DeepSpeedConfig(config).zero_config
        plan = lean_load.lean_plan(base)
        if plan is not None:
            converter: list[Callable[..., None]] = []  # a partitioned parameter's: it partitions the next ones

            def partition(params: list[nn.Parameter]) -> None:
                if converter:
                    converter[0](param_list=params)
                else:  # as DeepSpeedZeRoOffload below would (no offloading, the whole world, no mpu)
                    holder = nn.ParameterList(params)
                    deepspeed.zero.Init(module=holder, config_dict_or_path=config, dtype=params[0].dtype)
                    converter.append(getattr(params[0], "convert_to_zero_parameters"))  # noqa: B009 (DeepSpeed's)

            lean_load.fill_each(base, plan, lean_load.release(base, dtype), partition)
        elif dtype is not None:
            base.to(dtype)
        self._partitioner = DeepSpeedZeRoOffload(
            base,
            timers=None,
            ds_config=config,
            overlap_comm=zero.overlap_comm,
            # no prefetching: it follows the module order of the previous step, but softprompt's passes differ
            # from step to step (adapters per batch, validation, generation); each module fetches its own
            prefetch_bucket_size=0,
            max_reuse_distance=0,
            max_live_parameters=zero.max_live_parameters,
            param_persistence_threshold=zero.param_persistence_threshold,
            model_persistence_threshold=zero.model_persistence_threshold,
        )
        model.adapters.to(model.device)

    def _end_of_passes(self) -> None:
        """ZeRO-3: every forward and backward pass so far is over (every process calls this at the same
        point): reset DeepSpeed's per-step module trace, which `deepspeed.initialize` resets at the start of
        the root module's forward, which softprompt never calls (it calls the modules inside it)."""
        if self._partitioner is not None:
            self._partitioner.get_param_coordinator().reset_step()

    def check(self, batch_size: int) -> None:
        """Settings that cannot work across processes raise one clear error."""
        if not self.enabled:
            return
        if batch_size < self.world_size:
            raise ConfigError(
                f"--batch-size: {batch_size} is the global batch, shared by {self.world_size} "
                f"processes; give at least {self.world_size} (one row per process)"
            )

    # ------------------------------------------------------------------ a step
    def shard(self, batch: list, ghost: Callable[[str | None], Any] | None = None) -> list:
        """This process's contiguous slice of a global batch (all of it in one process).

        FSDP: every process must run the same forward passes over the sharded base, in the same order
        (their all-gathers are collectives, and so are the backward passes'), yet a slice may lack some
        of the batch's adapters (whose prompt passes would then run in other processes only) or be empty.
        So ``ghost(adapter)``, a row without loss, is put in front of the slice once per adapter of the
        global batch (items have an ``adapter``), in order of first appearance: every process then runs
        every adapter's prompt pass in that order, and one text pass.
        """
        if not self.enabled:
            return batch
        n = len(batch)
        mine = batch[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]
        if self.shards_base and ghost is not None:
            mine = [ghost(name) for name in dict.fromkeys(item.adapter for item in batch)] + mine
        return mine

    def batch_loss(self, out) -> torch.Tensor | None:
        """The loss to back-propagate for this process's rows of a batch (``out`` None: it has none).

        One process: the model's loss, the mean over the batch's label tokens. Several: this process's
        sum of token losses over the number of label tokens in the whole batch, so that the summed
        gradients equal the one-process gradient. Every process must call it for every batch.
        """
        if not self.enabled:
            return out.loss.float()
        tokens = out.loss_tokens if out is not None else 0
        total = self._sum(torch.tensor([float(tokens)], device=self.accelerator.device)).item()
        if out is None:
            return None
        return out.loss.float() * (tokens / max(total, 1.0))

    def sync_gradients(self, optimizer: torch.optim.Optimizer, loss: float) -> float:
        """Sum the adapters' gradients and the step loss over processes (one all-reduce); returns the loss."""
        if not self.enabled:
            return loss
        self._end_of_passes()  # this step's forward and backward passes are done on every process
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = self.accelerator.device
        flat = torch.cat(
            [
                p.grad.detach().float().flatten().to(device)
                if p.grad is not None
                else torch.zeros(p.numel(), device=device)
                for p in params
            ]
            + [torch.tensor([float(p.grad is not None) for p in params] + [loss], device=device)]
        )
        flat = self._sum(flat)
        offset = 0
        for p, present in zip(params, flat[-len(params) - 1 : -1].tolist()):
            grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            p.grad = grad.to(device=p.device, dtype=p.dtype).clone() if present else None
        return float(flat[-1])

    def share_rng(self) -> None:
        """Every process continues with the main process's torch RNG state (P-tuning's LSTM dropout draws
        from it), so the random state a checkpoint saves is every process's and resuming is exact."""
        if not self.enabled:
            return
        from accelerate.utils import broadcast

        device = self.accelerator.device
        state = broadcast(torch.get_rng_state().to(device), from_process=0)
        torch.set_rng_state(state.cpu())
        if device.type == "cuda":
            state = broadcast(torch.cuda.get_rng_state(device).to(device), from_process=0)
            torch.cuda.set_rng_state(state.cpu(), device)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    # ------------------------------------------------------------------ the main process's work
    def share_state(self, state) -> None:
        """Give every process the main process's loop state (a dataclass), in place."""
        if not self.enabled:
            return
        self._end_of_passes()  # after validation, which ran on every process
        from accelerate.utils import broadcast_object_list

        shared = [vars(state) if self.is_main else None]
        broadcast_object_list(shared, from_process=0)
        if not self.is_main:
            vars(state).update(shared[0])

    def barrier(self) -> None:
        """Wait until every process arrives here."""
        if self.enabled:
            self.accelerator.wait_for_everyone()


def launched_world_size() -> int:
    """The number of processes ``accelerate launch`` / ``torchrun`` started (1 without them)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE: expected a whole number of processes, got {os.environ['WORLD_SIZE']!r}"
        ) from None


def fsdp_units(model) -> list[nn.Module | list[nn.Module]]:
    """The FSDP units of a `SoftPromptModel`'s base, inner first (the base itself is the root, not listed).

    Every transformer block (the families table's ``blocks``) is a unit. So is every module softprompt
    calls outside the root's forward (`SoftPromptModel` calls the backbone, the input embedding, the output
    head, an encoder-decoder's encoder and decoder directly): a module inside another unit has no whole weights
    outside that unit's forward. All modules holding the embedding matrix (a tied head, T5's encoder/decoder
    ``embed_tokens``) form one unit, so the tie survives and the matrix is sharded once.
    """
    base, kind = model.base, model.shape.model_type
    if not model.quirks.blocks:
        raise ConfigError(
            f"--model: model type {kind!r} cannot be sharded with FSDP (distributed_type: FSDP in the "
            f"accelerate config): softprompt does not know its transformer blocks; add them (`blocks`) "
            f"to its row of softprompt.engine.families.FAMILY_QUIRKS, or use "
            f"configs/accelerate/ddp_multi_gpu.yaml"
        )
    units: list[nn.Module | list[nn.Module]] = []
    for path in model.quirks.blocks:
        try:
            blocks = base.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"--model: model type {kind!r} has no module {path!r} ({type(base).__name__}), where "
                f"softprompt.engine.families.FAMILY_QUIRKS says its transformer blocks are; FSDP cannot "
                f"shard it, use configs/accelerate/ddp_multi_gpu.yaml"
            ) from None
        units.extend(blocks)
    embedding = base.get_input_embeddings()
    tied = [m for m in base.modules() if getattr(m, "weight", None) is embedding.weight]
    units.append(tied)
    head = base.get_output_embeddings()
    if head is not None and not any(head is m for m in tied):
        units.append(head)
    stacks = (base.get_encoder(), base.get_decoder()) if model.shape.is_encoder_decoder else ()
    for module in (*stacks, model.backbone):
        if module is not None and module is not base:
            units.append(module)
    return units


def _shut_down(accelerator, wait_s: float = 60.0) -> None:
    """Tear the process group down at exit, the processes together.

    Left alive, gloo's threads can abort a process at exit ("terminate called without an active exception")
    after a run that succeeded; torn down while the other process is still finishing, the same happened in
    3 of 20 two-process CPU runs. A gloo barrier first (0 of 62 since). It waits at most `wait_s`, so a process
    leaving on an error, whose partner never arrives, still exits and lets the launcher stop the others."""
    dist = torch.distributed
    if dist.is_initialized() and dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # the other process left first (or failed): nothing to wait for
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=wait_s))
    accelerator.end_training()


@functools.lru_cache(maxsize=1)
def current() -> Distributed:
    """This process's `Distributed`: an `accelerate.Accelerator` when launched as several processes."""
    if launched_world_size() <= 1:
        return Distributed()
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    )
    atexit.register(_shut_down, accelerator)
    kind = accelerator.distributed_type.name
    if kind in UNSUPPORTED:
        raise ConfigError(
            f"distributed_type: {kind} (from the accelerate config) is not supported by softprompt "
            f"train; use configs/accelerate/fsdp.yaml (shards the frozen base) or ddp_multi_gpu.yaml"
        )
    if deepspeed_launch(accelerator):
        return Distributed(accelerator, zero=zero_settings(accelerator))
    return Distributed(accelerator, fsdp_settings(accelerator) if fsdp_launch(accelerator) else None)


__all__ = [
    "Distributed",
    "FsdpSettings",
    "ZeroSettings",
    "current",
    "fsdp_settings",
    "fsdp_units",
    "launched_world_size",
    "zero_settings",
]
