"""Data-parallel training across processes and machines, on Hugging Face Accelerate.

`softprompt train` runs unchanged under ``accelerate launch`` or ``torchrun``: they set ``WORLD_SIZE``
(and ``RANK``/``LOCAL_RANK``) in the environment, and `current` then starts an `accelerate.Accelerator`
(process group, device of this process). Without them, or with ``WORLD_SIZE=1``, `current` is a
`Distributed` of one process whose every method is a no-op, so single-process training is untouched.

How a step is shared (the frozen base is never wrapped: only the small adapters train):

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
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import ConfigError

#: Accelerate launch modes whose sharding of the model softprompt does not implement (see docs/distributed.md).
UNSUPPORTED = {"FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"}


class Distributed:
    """This process's place in the job; one process (``world_size == 1``) makes every method a no-op."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ set-up
    def device(self, requested: str | None) -> str | None:
        """The device to train on: ``requested`` in one process, else this process's device (Accelerate's)."""
        if not self.enabled:
            return requested
        mine = self.accelerator.device
        if requested and torch.device(requested).type != mine.type:
            raise ConfigError(f"--device: {requested!r} does not match the device accelerate gave this process "
                              f"({mine}); leave --device out when launching several processes")
        return str(mine)

    def check(self, batch_size: int) -> None:
        """Settings that cannot work across processes raise one clear error."""
        if not self.enabled:
            return
        if batch_size < self.world_size:
            raise ConfigError(f"--batch-size: {batch_size} is the global batch, shared by {self.world_size} "
                              f"processes; give at least {self.world_size} (one row per process)")

    # ------------------------------------------------------------------ a step
    def shard(self, batch: list) -> list:
        """This process's contiguous slice of a global batch (all of it in one process)."""
        if not self.enabled:
            return batch
        n = len(batch)
        return batch[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]

    def batch_loss(self, out) -> torch.Tensor | None:
        """The loss to back-propagate for this process's rows of a batch (``out`` None: it has none).

        One process: the model's loss, the mean over the batch's label tokens. Several: this process's
        sum of token losses over the number of label tokens in the whole batch, so that the summed
        gradients equal the one-process gradient. Every process must call it for every batch.
        """
        if not self.enabled:
            return out.loss.float()
        tokens = out.label_logits.shape[0] if out is not None else 0
        total = self._sum(torch.tensor([float(tokens)], device=self.accelerator.device)).item()
        if out is None:
            return None
        return out.loss.float() * (tokens / max(total, 1.0))

    def sync_gradients(self, optimizer: torch.optim.Optimizer, loss: float) -> float:
        """Sum the adapters' gradients and the step loss over processes (one all-reduce); returns the loss."""
        if not self.enabled:
            return loss
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = self.accelerator.device
        flat = torch.cat([p.grad.detach().float().flatten().to(device) if p.grad is not None else
                          torch.zeros(p.numel(), device=device) for p in params] +
                         [torch.tensor([float(p.grad is not None) for p in params] + [loss], device=device)])
        flat = self._sum(flat)
        offset = 0
        for p, present in zip(params, flat[-len(params) - 1:-1].tolist()):
            grad = flat[offset:offset + p.numel()].view_as(p)
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
        raise ConfigError(f"WORLD_SIZE: expected a whole number of processes, got {os.environ['WORLD_SIZE']!r}")


@functools.lru_cache(maxsize=1)
def current() -> Distributed:
    """This process's `Distributed`: an `accelerate.Accelerator` when launched as several processes."""
    if launched_world_size() <= 1:
        return Distributed()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
                              or not torch.cuda.is_available())
    kind = accelerator.distributed_type.name
    if kind in UNSUPPORTED:
        raise ConfigError(f"distributed_type: {kind} (from the accelerate config) would shard the model, which "
                          f"softprompt train does not do yet; use configs/accelerate/ddp_multi_gpu.yaml (each "
                          f"process holds the frozen base, only the adapters' gradients are shared)")
    return Distributed(accelerator)


__all__ = ["Distributed", "current", "launched_world_size"]
