"""Train soft prompts: one job, one frozen base model, one or several adapters.

Read it top to bottom like nanoGPT's ``train.py``: `train` loads the data and the model, then
`train_jobs` runs a `Trainer`: its set-up (``__init__``), its loop (`Trainer.train`, one optimizer step
at a time) and its end (`Trainer.finish`). In short:

* **Examples** and **batches** are `softprompt.training.batches`: a causal-LM example is the prompt's
  tokens then the label text's (the loss covers the label only), or the whole text without a label
  column; encoder-decoder models (T5) take the label text as decoder targets.
  All adapters of a job share the base model: each epoch shuffles the rows of every
  (still training) adapter together with a seeded generator, so a batch mixes rows of several adapters
  (the engine gives each row its own soft prompt). Each adapter is its own AdamW param group with its
  own learning rate and only ever gets gradients from its own rows.
* **Objective.** The loss of a batch is a callable (`softprompt.training.objectives`): cross-entropy on
  the label tokens, or ``distill`` (`softprompt.training.distill`), KL to the frozen model reading a
  document, whose set-up (teachers, self-study rows) `train` does before the loop.
* **Schedule.** Warm-up then linear, cosine or constant (transformers' `get_scheduler`), stepped once
  per optimizer step; ``grad_accum`` forward passes per step.
* **Validation** every ``eval_every`` epochs and after the last: label scoring (or generation)
  accuracy and macro-F1 plus the label loss for classification, loss and perplexity otherwise. The
  bare base model is validated once first (zero-shot), to report beside the adapter. Validation rows
  that also occur in the training rows are dropped, so validation numbers are always held-out.
* **Files** under ``output`` (`softprompt.training.checkpoint`): ``config.yaml`` (resolved config),
  ``metrics.jsonl`` (one JSON record per log line), ``loss_curve.png``, and per adapter ``<name>/``
  holding the best adapter in PEFT's layout (+ its own ``loss_curve.png``) and
  ``<name>/checkpoints/last/`` the latest training state. Every directory is written atomically.
* **Warm start** (``init_from: DIR``): an adapter starts as a saved one (softprompt's or PEFT's files,
  same method and length) instead of from its ``init``, and trains as a new job: new data, schedule
  and optimizer. That is continued training on more rows, or prompt transfer from a related task.
* **Resume** (``resume: true``) restores adapters, optimizer, scheduler, step, epoch, the position
  inside the epoch, best scores, early-stopping counters and RNG states from ``checkpoints/last``; the
  result is bit-for-bit the adapter an uninterrupted run gives (on CPU). The latest state is saved at
  every validation, every ``save_every`` optimizer steps, when training ends and on Ctrl-C or SIGTERM
  (`softprompt.training.signals`).
* **Several processes** (``accelerate launch`` / ``torchrun``; `softprompt.training.distributed`,
  ``docs/distributed.md``): each process takes its slice of every global batch, the adapters' gradients
  are summed over processes (the one-process result within rounding), and rank 0 alone validates and
  writes files. Under FSDP the frozen base is sharded over the processes after the adapters are created,
  and every process runs validation's (collective) forward passes; rank 0 still alone records and writes.
  One process runs exactly the code above.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from softprompt.adapters.peft_format import load_adapter
from softprompt.engine.tokens import pad_id
from softprompt.errors import ConfigError
from softprompt.models.loading import load
from softprompt.training import distributed
from softprompt.training.batches import Encoded, collate, encode_examples, epoch_groups
from softprompt.training.checkpoint import (
    METRICS_FILE,
    LoopState,
    MetricsLog,
    read_checkpoints,
    restore,
    save_best,
    save_latest,
)
from softprompt.training.config import CHECKPOINT, TrainConfig, flag, save_resolved
from softprompt.training.distill import prepare_distill
from softprompt.training.jobs import AdapterJob, complete_options, prepare_job, start_from
from softprompt.training.objectives import Objective, lm_loss
from softprompt.training.signals import TrainingInterrupted, stop_at_step_boundary_on_signals, stop_requested
from softprompt.training.validation import selection_score, validation_metrics

PLOT_EVERY_SECONDS = 60.0  # the loss curve is redrawn at validations at most this often, and at the end


# ========================================================================================= results


@dataclass
class AdapterResult:
    """How one adapter of a job ended."""

    name: str
    path: Path  # <output>/<name>/: the best adapter (PEFT files)
    best: dict | None  # the validation metrics of the best checkpoint (+ step, epoch), None without validation
    zero_shot: dict | None  # the bare base model on the same validation rows
    stopped_early: bool


@dataclass
class TrainResult:
    output: Path
    adapters: dict[str, AdapterResult]
    steps: int  # optimizer steps taken
    epochs: int  # epochs completed
    model: object  # the SoftPromptModel, holding the best adapters (inference-ready)


@dataclass
class StepInfo:
    """What `train`'s ``on_step`` callback receives after every optimizer step."""

    step: int  # optimizer steps taken so far
    epoch: int  # the epoch the step belongs to, counting from 1
    loss: float  # its training loss
    lr: dict[str, float]  # the learning rate of every adapter after the step


# ============================================================================================ train


def train(
    config: TrainConfig, model=None, *, on_step: Callable[[StepInfo], None] | None = None, progress: bool = True
) -> TrainResult:
    """Train the adapter(s) a config describes; see the module docstring.

    ``model``: a `SoftPromptModel` to train on (default: ``softprompt.load(config.model)``); its base
    weights are never changed. ``on_step`` is called after every optimizer step (and after the latest
    state was saved, when it was). Cross-validation (``kfold``) is `softprompt.training.cross_validate`.
    """
    config = dataclasses.replace(config, adapters=[dataclasses.replace(a) for a in config.adapters]).validate()
    if config.kfold is not None:
        raise ConfigError(
            f"{flag('kfold')}: cross-validation is softprompt.training.cross_validate "
            f"(the CLI runs it when --kfold is given)"
        )
    if config.objective == "distill":  # the teachers and self-study's rows need the model
        model = model if model is not None else load_model(config)
        jobs, objective = prepare_distill(config, model)
        try:
            with stop_at_step_boundary_on_signals():
                return train_jobs(config, model, jobs, on_step=on_step, progress=progress, objective=objective)
        finally:
            objective.remove_teachers(model)
    jobs = [prepare_job(spec) for spec in config.resolved_adapters()]
    model = model if model is not None else load_model(config)
    with stop_at_step_boundary_on_signals():
        return train_jobs(config, model, jobs, on_step=on_step, progress=progress)


def load_model(config: TrainConfig):
    """The `SoftPromptModel` of ``config.model``, on the device this process trains on."""
    if not config.model:
        raise ConfigError(f"{flag('model')}: required (a built-in name, a local checkpoint directory or a hub id)")
    dist = distributed.current()
    if config.quantize not in (None, "none") and dist.shards_base:
        raise ConfigError(
            f"{flag('quantize')} {config.quantize}: FSDP and ZeRO-3 cannot shard quantized weights; "
            "launch without them (DDP) or leave --quantize out"
        )
    device = dist.load_device(config.device) or default_device()
    dtype = dist.load_dtype(config.model, config.dtype)  # FSDP/ZeRO-3: converted as each process reads its rows
    return load(config.model, dtype=dtype, device=device, quantize=config.quantize)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_jobs(
    config: TrainConfig,
    model,
    jobs: list[AdapterJob],
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    progress: bool = True,
    objective: Objective = lm_loss,
) -> TrainResult:
    """The training loop over prepared jobs, all on ``model`` (see the module docstring)."""
    run = Trainer(
        config, model, jobs, on_step=on_step, progress=progress, objective=objective
    )  # checks, adapters, optimizer
    run.train()  # the optimizer steps, with validation and checkpoints
    return run.finish()  # the last validation and save; the model holds every adapter's best


class Trainer:
    """One run over prepared jobs: ``__init__`` sets up, `train` loops, `finish` saves and reports.

    ``state`` is what a checkpoint saves and restores (`LoopState`); everything else is rebuilt from
    the config at set-up.
    """

    # ------------------------------------------------------------------------------------- set-up

    def __init__(
        self,
        config: TrainConfig,
        model,
        jobs: list[AdapterJob],
        *,
        on_step: Callable[[StepInfo], None] | None = None,
        progress: bool = True,
        objective: Objective = lm_loss,
    ):
        self.objective = objective  # the loss of a batch (softprompt.training.objectives)
        self.dist = dist = distributed.current()  # one process, or this one of several (accelerate / torchrun)
        dist.check(config.batch_size)
        device = dist.device(config.device)
        if device and not dist.shards_base:  # FSDP: `dist.shard_base` below moves the base, shard by shard
            model.to(device)
        if not config.model:
            config = dataclasses.replace(config, model=model.name_or_path)
        self.config, self.model, self.jobs = config, model, jobs
        self.names = [job.name for job in jobs]
        self.output = Path(config.output)
        self.on_step, self.progress = on_step, progress
        self._check_jobs()
        if config.gradient_checkpointing or dist.activation_checkpointing:
            model.gradient_checkpointing = True  # a family that cannot take it says so here, naming the flag

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        for job in jobs:
            complete_options(job, model.tokenizer)
            model.add_adapter(job.name, method=job.spec.method, seed=job.spec.seed, **job.spec.method_options)
            if job.spec.init_from and not config.resume:  # a resumed run restores its own checkpoint instead
                start_from(model, job, prefix=f"adapters ({job.name}): " if len(jobs) > 1 else "")
        saved = None
        if config.resume:
            saved = read_checkpoints(config, self.output, self.names, dist)
            for job in jobs:  # the adapters, reparameterisation included, as they were
                load_adapter(model, self.output / job.name / CHECKPOINT, name=job.name, resume=True)
        dist.shard_base(
            model, config.dtype
        )  # FSDP/ZeRO-3 only; after the adapters were initialised from the whole embedding table
        if dist.is_main:  # only the main process writes files, and only once every check has passed
            self.output.mkdir(parents=True, exist_ok=True)
            save_resolved(config, self.output)

        model.train()
        self.items = {job.name: encode_examples(model, job.train, job.name, config.max_length) for job in jobs}
        self.pad = pad_id(model.tokenizer)
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": list(model.adapters[job.name].parameters()),
                    "lr": job.spec.lr,
                    "weight_decay": job.spec.weight_decay,
                    "name": job.name,
                }
                for job in jobs
            ]
        )
        rows = sum(len(items) for items in self.items.values())
        self.total_steps = config.epochs * math.ceil(math.ceil(rows / config.batch_size) / config.grad_accum)
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = get_scheduler(
            config.lr_schedule,
            self.optimizer,
            num_training_steps=self.total_steps,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
        )

        self.log = MetricsLog(self.output / METRICS_FILE, write=dist.is_main)
        if saved is not None:
            self.state = restore(saved, model, jobs, self.optimizer, self.scheduler, self.log)
        else:
            self.state = LoopState(
                active=list(self.names), bad_evals={n: 0 for n in self.names}, world_size=dist.world_size
            )
            self.log.reset()
            self._validate_zero_shot()
        self.last_plot = time.time()

    def _check_jobs(self) -> None:
        config = self.config
        for job in self.jobs:
            if job.name in self.model.adapters:
                raise ConfigError(
                    f"{flag('name')}: the model already has an adapter named {job.name!r}; remove it "
                    f"or choose another name"
                )
            if config.early_stopping_patience is not None and not job.val:
                raise ConfigError(
                    f"{flag('early_stopping_patience')}: adapter {job.name!r} has no validation rows; "
                    f"give {flag('validation_data')} or a {flag('val_fraction')} above 0"
                )
            if job.labels is None and config.eval_method == "generate":
                raise ConfigError(f"{flag('eval_method')}: generate needs a {flag('label_column')} to compare with")

    def _validate_zero_shot(self) -> None:
        """The bare base model on every adapter's validation rows, once (FSDP: every process runs the passes)."""
        if not self.config.eval_zero_shot or not (self.dist.is_main or self.dist.shards_base):
            return
        for job in self.jobs:
            if job.val:
                metrics = validation_metrics(self.model, job, None, self.config)
                self.state.zero_shot[job.name] = metrics
                self.log.append(
                    {"type": "eval", "model": "base", "adapter": job.name, "step": 0, "epoch": 0, **metrics}
                )

    # --------------------------------------------------------------------------------------- loop

    def train(self) -> None:
        """Optimizer steps until the epochs, ``max_steps`` or every adapter's patience run out."""
        config, state = self.config, self.state
        self.bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc=f"train {', '.join(self.names)}"[:40],
            unit="step",
            disable=not self.progress or not self.dist.is_main,
            dynamic_ncols=True,
        )
        self.started = time.time()
        while not state.finished and state.epoch < config.epochs and state.active:
            rows = [item for name in state.active for item in self.items[name]]
            groups = epoch_groups(rows, state.epoch, config.seed, config.batch_size, config.grad_accum)
            while state.group < len(groups) and (config.max_steps is None or state.step < config.max_steps):
                if stop_requested():  # Ctrl-C or SIGTERM: save the latest state here, between two steps
                    self._stop()
                loss = self._optimizer_step(groups[state.group])
                self._after_step(loss)
            if state.group < len(groups):  # max_steps reached inside the epoch
                break
            state.epoch += 1
            state.group = 0
            if state.epoch % config.eval_every == 0 or state.epoch == config.epochs:
                self.validate_and_save()
        self.bar.close()

    def _optimizer_step(self, group: list[list[Encoded]]) -> float:
        """Forward/backward over the ``grad_accum`` batches of one step, then AdamW and the schedule."""
        dist, model = self.dist, self.model
        step_loss = 0.0
        for batch in group:
            # this process's rows of the batch (all of them in one process; FSDP: after loss-free rows)
            batch = dist.shard(batch, ghost=lambda name: Encoded([self.pad], [-100], name))
            out = None
            if batch:
                ids, mask, labels, adapters = collate(batch, self.pad)
                with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                    out = self.objective(model, ids, mask, adapters, labels)
            loss = dist.batch_loss(out)  # the batch's mean label-token loss (this process's share of it)
            if loss is not None:
                loss = loss / len(group)
                loss.backward()
                step_loss += float(loss.detach())
        step_loss = dist.sync_gradients(self.optimizer, step_loss)  # sums gradients over processes
        if self.config.max_grad_norm is not None:
            for param_group in self.optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(param_group["params"], self.config.max_grad_norm)
        self.optimizer.step()
        for name in self.names:  # e.g. CPT's projection onto its epsilon ball
            model.get_adapter(name).after_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.share_rng()
        return step_loss

    def _after_step(self, step_loss: float) -> None:
        """Count the step; log it, show it, save the latest state when due, tell ``on_step``."""
        config, state = self.config, self.state
        state.step += 1
        state.group += 1
        state.loss_sum += step_loss
        state.loss_steps += 1
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if state.step % config.log_every == 0:
            self.log.append(
                {
                    "type": "train",
                    "step": state.step,
                    "epoch": state.epoch + 1,
                    "loss": state.loss_sum / state.loss_steps,
                    "lr": lrs,
                    "seconds": round(time.time() - self.started, 3),
                }
            )
            state.loss_sum, state.loss_steps = 0.0, 0
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}", refresh=False)
        if config.save_every and state.step % config.save_every == 0 and self.dist.is_main:
            self._save_latest()
        if self.on_step is not None:
            self.on_step(StepInfo(state.step, state.epoch + 1, step_loss, lrs))

    def _stop(self) -> NoReturn:
        self._save_latest()
        self.bar.close()
        raise TrainingInterrupted(
            f"stopped after step {self.state.step}; the latest state is saved in "
            f"{self.output / self.names[0] / CHECKPOINT}; continue with --resume"
        )

    def validate_and_save(self) -> None:
        """Validate every active adapter, keep the best, count patience, save the latest state."""
        # The main process validates and saves, then every process goes on with its state. FSDP: the other
        # processes run the same validation passes (their all-gathers are collectives) and record nothing.
        dist = self.dist
        if dist.is_main or dist.shards_base:
            for job in self.jobs:
                if job.name in self.state.active:
                    metrics = validation_metrics(self.model, job, job.name, self.config) if job.val else {}
                    if dist.is_main:
                        self._keep_if_best(job, metrics)
            if dist.is_main:
                self.state.last_eval_step = self.state.step
                if time.time() - self.last_plot > PLOT_EVERY_SECONDS:  # plotting is slow: refresh it now and then
                    self.log.plot(self.names, self.output)
                    self.last_plot = time.time()
                self._save_latest()
        dist.share_state(self.state)

    def _keep_if_best(self, job: AdapterJob, metrics: dict) -> None:
        """Log a validation; save the adapter if it is the best so far, else count towards early stopping."""
        state = self.state
        self.log.append(
            {
                "type": "eval",
                "model": "adapter",
                "adapter": job.name,
                "step": state.step,
                "epoch": state.epoch,
                **metrics,
            }
        )
        score = selection_score(metrics, job)
        best = state.best.get(job.name)
        if best is None or not job.val or score > tuple(best["score"]):
            state.best[job.name] = {"score": list(score), "step": state.step, "epoch": state.epoch, "metrics": metrics}
            state.bad_evals[job.name] = 0
            save_best(self.model, job, self.config, state, self.output)
            return
        state.bad_evals[job.name] += 1
        patience = self.config.early_stopping_patience
        if patience is not None and state.bad_evals[job.name] >= patience:
            state.active.remove(job.name)
            state.stopped.append(job.name)
            self.log.append(
                {
                    "type": "early_stop",
                    "adapter": job.name,
                    "step": state.step,
                    "epoch": state.epoch,
                    "best_step": best["step"],
                }
            )

    def _save_latest(self) -> None:
        save_latest(
            self.model, self.jobs, self.optimizer, self.scheduler, self.state, self.config, self.output, self.log
        )

    # ------------------------------------------------------------------------------------- finish

    def finish(self) -> TrainResult:
        """Validate and save the end state (once), plot, and load every adapter's best into the model."""
        state = self.state
        if not state.finished:
            if state.last_eval_step != state.step:
                self.validate_and_save()
            state.finished = True
            if self.dist.is_main:
                self._save_latest()
        if self.dist.is_main:
            self.log.plot(self.names, self.output)
        self.dist.barrier()  # the best adapters are on disk for every process
        results = {}
        for job in self.jobs:  # leave the model holding each adapter's best checkpoint, ready for inference
            load_adapter(self.model, self.output / job.name, name=job.name)
            best = state.best.get(job.name)
            results[job.name] = AdapterResult(
                job.name,
                self.output / job.name,
                {**best["metrics"], "step": best["step"], "epoch": best["epoch"]} if best and job.val else None,
                state.zero_shot.get(job.name),
                job.name in state.stopped,
            )
        self.model.eval()
        return TrainResult(self.output, results, state.step, state.epoch, self.model)


__all__ = [
    "AdapterJob",
    "AdapterResult",
    "StepInfo",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "default_device",
    "load_model",
    "prepare_job",
    "train",
    "train_jobs",
    "validation_metrics",
]
