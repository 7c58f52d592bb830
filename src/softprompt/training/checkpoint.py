"""What a training run writes and reads back: the loop state, checkpoints, RNG states and the metrics log.

Under the run's ``output``, per adapter ``<name>/`` holds the best adapter in PEFT's layout (with the
fingerprints of its training texts, so evaluation stays held-out) and ``<name>/checkpoints/last/`` the
latest training state: the adapter, its AdamW slots, the scheduler, the `LoopState` and the RNG states
of torch, CUDA, numpy and Python. Resuming from it gives bit for bit the uninterrupted run (on CPU).
``metrics.jsonl`` holds one JSON record per log line; ``loss_curve.png`` plots it. Every directory is
written atomically (`SoftPromptModel.save_adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from softprompt.adapters.peft_format import read_training_state
from softprompt.data.heldout import TRAIN_FINGERPRINTS
from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_text, recover_directory
from softprompt.training import distributed
from softprompt.training.config import CHECKPOINT, TrainConfig, flag
from softprompt.training.jobs import AdapterJob
from softprompt.training.metrics import plot_loss_curve

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss_curve.png"
#: Config fields that may differ between a run and the run that resumes it (they do not change the result).
RESUMABLE_CHANGES = ("resume", "device", "save_every", "model")


@dataclass
class LoopState:
    """Everything about the loop's position that a checkpoint must restore (JSON)."""

    step: int = 0
    epoch: int = 0  # the current epoch (0-based); == epochs when all are done
    group: int = 0  # the next optimizer step inside the epoch
    active: list[str] = field(default_factory=list)  # adapters still training
    best: dict[str, dict] = field(default_factory=dict)  # name -> {"score": [...], "metrics": {...}}
    bad_evals: dict[str, int] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)  # adapters stopped early
    zero_shot: dict[str, dict] = field(default_factory=dict)
    last_eval_step: int = -1
    world_size: int = 1  # processes training together (resume needs as many)
    loss_sum: float = 0.0  # training loss since the last log line
    loss_steps: int = 0
    metrics_lines: int = 0
    finished: bool = False


# ======================================================================================== metrics log


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, appended as training goes."""

    def __init__(self, path: Path, write: bool = True):
        self.path = path
        self.write = write  # False: keep the records in memory only (processes other than the main one)
        self.records: list[dict] = []

    def reset(self) -> None:
        if self.write:
            atomic_write_text(self.path, "")
        self.records = []

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` records (those a checkpoint knew about)."""
        records: list[dict] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if len(records) == lines:
                    break  # later lines the checkpoint never knew about (the last may be half-written)
                if line.strip():
                    records.append(json.loads(line))
        self.records = records[:lines]
        if self.write:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, names: list[str], output: Path) -> None:
        """The loss curves: ``<output>/<name>/loss_curve.png`` per adapter (training loss and its validation
        loss), and ``<output>/loss_curve.png`` (with the validation loss when there is one adapter)."""
        train_records = [r for r in self.records if r["type"] == "train"]
        evals = [r for r in self.records if r["type"] == "eval" and r.get("model") == "adapter" and "val_loss" in r]
        for name in names:
            own = [r for r in evals if r["adapter"] == name]
            if train_records or own:
                (output / name).mkdir(parents=True, exist_ok=True)
                plot_loss_curve(sorted(train_records + own, key=lambda r: r["step"]), output / name / LOSS_PNG)
        single = evals if len(names) == 1 else []
        if train_records or single:
            plot_loss_curve(sorted(train_records + single, key=lambda r: r["step"]), output / LOSS_PNG)


# ============================================================================================= saving


@contextlib.contextmanager
def _saving(model) -> Iterator[None]:
    """Eval mode and a forked RNG while saving: materialising a P-tuning LSTM in training mode would apply
    dropout to the saved table and draw from the RNG, so saving would change the run."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


def save_best(model, job: AdapterJob, config: TrainConfig, state: LoopState, output: Path) -> None:
    """The adapter as it is now, as the job's best, in ``<output>/<name>/`` (with its metrics and the
    fingerprints of its training texts)."""
    prints = torch.tensor(sorted(job.train_fingerprints()), dtype=torch.int64)
    best = state.best[job.name]
    meta = {
        "kind": "best",
        "adapter": job.name,
        "step": best["step"],
        "epoch": best["epoch"],
        "metrics": best["metrics"],
        "zero_shot": state.zero_shot.get(job.name),
        "labels": job.labels,
        "data": job.spec.to_dict(),
        "base_model": config.model,
        "max_length": config.max_length,
    }
    with _saving(model):
        model.save_adapter(job.name, output / job.name, training_state={TRAIN_FINGERPRINTS: prints}, training_meta=meta)


def save_latest(
    model,
    jobs: list[AdapterJob],
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: LoopState,
    config: TrainConfig,
    output: Path,
    log: MetricsLog,
) -> None:
    """The latest state of every adapter, in ``<output>/<name>/checkpoints/last/``."""
    state.metrics_lines = len(log.records)
    rng_tensors, rng_meta = _rng_state()
    optimizer_state = optimizer.state_dict()
    shared = {
        "kind": "last",
        "state": dataclasses.asdict(state),
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
        "config": config.to_dict(),
        "adapters": [job.name for job in jobs],
    }
    for index, job in enumerate(jobs):
        group = optimizer_state["param_groups"][index]
        names = [n for n, _ in model.adapters[job.name].named_parameters()]
        tensors = dict(rng_tensors)
        for name, param_id in zip(names, group["params"]):
            for key, value in optimizer_state["state"].get(param_id, {}).items():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().clone()
        meta = {**shared, "adapter": job.name, "optimizer_group": {k: v for k, v in group.items() if k != "params"}}
        with _saving(model):
            model.save_adapter(job.name, output / job.name / CHECKPOINT, training_state=tensors, training_meta=meta)


# ============================================================================================ resuming


def _in_current_layout(saved: dict) -> dict:
    """A saved config as today's `TrainConfig.to_dict` writes it (runs saved before method options were nested kept
    them flat; runs saved before ``text_column`` defaulted to unset wrote ``text`` beside a template, which never
    read it), so that only real changes count as differences."""
    if saved.get("template") and saved.get("text_column") == "text":
        saved = {**saved, "text_column": None}
    try:
        return TrainConfig.from_dict(saved, source="checkpoint config").to_dict()
    except ConfigError:
        return saved


def read_checkpoints(
    config: TrainConfig, output: Path, names: list[str], dist: distributed.Distributed | None = None
) -> dict[str, tuple[dict, dict]]:
    """Each adapter's latest checkpoint ``(tensors, meta)``; they must agree with each other and with ``config``."""
    dist = dist or distributed.Distributed()
    if dist.is_main:
        for name in names:
            recover_directory(output / name / CHECKPOINT)  # a save that a crash interrupted midway
    dist.barrier()
    saved = {}
    for name in names:
        path = output / name / CHECKPOINT
        if not (path / "training_state.json").is_file():
            raise ConfigError(f"{flag('resume')}: no checkpoint to resume at {path}; train without --resume first")
        saved[name] = read_training_state(path)
    steps = {name: meta["state"]["step"] for name, (_, meta) in saved.items()}
    if len(set(steps.values())) != 1:
        raise ConfigError(
            f"{flag('resume')}: the adapters' checkpoints are from different steps ({steps}); "
            f"the previous run was interrupted while saving them; train again without --resume"
        )
    processes = next(iter(saved.values()))[1]["state"].get("world_size", 1)
    if processes != dist.world_size:
        raise ConfigError(
            f"{flag('resume')}: the run being resumed trained on {processes} process(es), this one "
            f"on {dist.world_size}; launch {processes} (accelerate launch --num_processes {processes}) "
            f"to resume"
        )
    previous = _in_current_layout(next(iter(saved.values()))[1]["config"])
    current = config.to_dict()
    changed = [k for k in current if k not in RESUMABLE_CHANGES and previous.get(k) != current[k]]
    if changed:
        what = ", ".join(f"{flag(k)} {previous.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"{flag('resume')}: the config differs from the run being resumed ({what}); "
            f"resuming gives the uninterrupted result only with the same config"
        )
    if next(iter(saved.values()))[1]["adapters"] != names:
        raise ConfigError(
            f"{flag('resume')}: the run being resumed trained adapters "
            f"{next(iter(saved.values()))[1]['adapters']}, this one {names}"
        )
    return saved


def restore(
    saved: dict, model, jobs: list[AdapterJob], optimizer: torch.optim.Optimizer, scheduler, log: MetricsLog
) -> LoopState:
    """Optimizer, scheduler, loop state, metrics log and RNG states from the checkpoints (`read_checkpoints`)."""
    slots: dict[int, dict[str, torch.Tensor]] = {}
    groups: list[dict] = []
    index = 0
    for job in jobs:
        tensors, meta = saved[job.name]
        names = [n for n, _ in model.adapters[job.name].named_parameters()]
        ids = list(range(index, index + len(names)))
        index += len(names)
        by_name = dict(zip(names, ids))
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                param, _, slot = key[len("optimizer.") :].rpartition(".")
                slots.setdefault(by_name[param], {})[slot] = value
        groups.append({**meta["optimizer_group"], "params": ids})
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    tensors, meta = saved[jobs[0].name]
    scheduler.load_state_dict(meta["scheduler"])
    state = LoopState(**meta["state"])
    log.truncate(state.metrics_lines)
    _set_rng_state(tensors, meta["rng"])
    return state


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    # numpy's stubs pick the dict overload for a plain call; legacy=True (the default) is the tuple of the
    # global MT19937 generator
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)
    kind, keys, pos, has_gauss, gauss = state
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, python_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), python_gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = meta["python"]
    random.setstate((version, tuple(internal), python_gauss))


__all__ = [
    "LOSS_PNG",
    "METRICS_FILE",
    "RESUMABLE_CHANGES",
    "LoopState",
    "MetricsLog",
    "read_checkpoints",
    "restore",
    "save_best",
    "save_latest",
]
