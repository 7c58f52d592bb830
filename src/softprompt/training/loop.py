"""Train soft prompts: one job, one frozen base model, one or several adapters.

Read it top to bottom like nanoGPT's ``train.py``: `train` loads the data and the model, then
`train_jobs` runs set-up, the loop and the saving. In short:

* **Examples.** A causal-LM example is the tokens of the rendered template (with the tokenizer's
  special tokens, exactly as scoring and generation tokenise a prompt), then the tokens of the label
  text (tokenised on its own, no special tokens), then end-of-sequence; the loss covers the label
  tokens only (PEFT's RAFT example). Data without a label column is language modelling on the whole
  text. Encoder-decoder models (T5) take the template on the encoder and the label text + eos as
  decoder targets.
* **Batches.** All adapters of a job share the base model: each epoch shuffles the rows of every
  (still training) adapter together with a seeded generator, so a batch mixes rows of several adapters
  (the engine gives each row its own soft prompt). Each adapter is its own AdamW param group with its
  own learning rate and only ever gets gradients from its own rows.
* **Schedule.** Warm-up then linear, cosine or constant (transformers' `get_scheduler`), stepped once
  per optimizer step; ``grad_accum`` forward passes per step.
* **Validation** every ``eval_every`` epochs and after the last: label scoring (or generation)
  accuracy and macro-F1 plus the label loss for classification, loss and perplexity otherwise. The
  bare base model is validated once first (zero-shot), to report beside the adapter. Validation rows
  that also occur in the training rows are dropped, so validation numbers are always held-out.
* **Files** under ``output``: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON record
  per log line), ``loss_curve.png``, and per adapter ``<name>/`` holding the best adapter in PEFT's
  layout (+ its own ``loss_curve.png``) and ``<name>/checkpoints/last/`` the latest training state.
  Every directory is written atomically (`SoftPromptModel.save_adapter`).
* **Warm start** (``init_from: DIR``): an adapter starts as a saved one (softprompt's or PEFT's files,
  same method and length) instead of from its ``init``, and trains as a new job: new data, schedule
  and optimizer. That is continued training on more rows, or prompt transfer from a related task.
* **Resume** (``resume: true``) restores adapters, optimizer, scheduler, step, epoch, the position
  inside the epoch, best scores, early-stopping counters and RNG states from ``checkpoints/last``; the
  result is bit-for-bit the adapter an uninterrupted run gives (on CPU). The latest state is saved at
  every validation, every ``save_every`` optimizer steps and when training ends.
* **Several processes** (``accelerate launch`` / ``torchrun``; `softprompt.training.distributed`,
  ``docs/distributed.md``): each process takes its slice of every global batch, the adapters' gradients
  are summed over processes (the one-process result within rounding), and rank 0 alone validates and
  writes files. Under FSDP the frozen base is sharded over the processes after the adapters are created,
  and every process runs validation's (collective) forward passes; rank 0 still alone records and writes.
  One process runs exactly the code above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from softprompt.training import distributed
from softprompt.training.config import ResolvedAdapter, TrainConfig, flag, save_resolved
from softprompt.data import Example, Verbalizer, build_examples, train_val_split
from softprompt.errors import ConfigError, DataError, SoftPromptError
from softprompt.training.evaluate import evaluate, example_loss
from softprompt.data.heldout import fingerprint, read_train_fingerprints
from softprompt.training.batches import Encoded, collate, encode_examples, epoch_groups
from softprompt.fileio import atomic_write_text, recover_directory
from softprompt.training.metrics import perplexity, plot_loss_curve
from softprompt.adapters.peft_format import load_adapter, read_training_state
from softprompt.engine.tokens import pad_id

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss_curve.png"
LAST = Path("checkpoints") / "last"
#: Config fields that may differ between a run and the run that resumes it (they do not change the result).
RESUMABLE_CHANGES = ("resume", "device", "save_every", "model")
PLOT_EVERY_SECONDS = 60.0  # the loss curve is redrawn at validations at most this often, and at the end


# ============================================================================================ data


@dataclass
class AdapterJob:
    """One adapter of a job: its resolved settings and its rendered examples."""

    spec: ResolvedAdapter
    train: list[Example]
    val: list[Example]  # held out: no validation text occurs in `train`
    labels: list[str] | None  # label texts (classification), None for language modelling
    dropped_val_rows: int = 0  # validation rows dropped because their text also occurs in training rows
    # Training texts of the adapter this one starts from (``init_from``): this adapter learnt them too,
    # so they are never validation rows and its saved fingerprints include them.
    inherited_fingerprints: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        return self.spec.name


def prepare_job(spec: ResolvedAdapter, *, rows: list[dict] | None = None, val_rows: list[dict] | None = None,
                verbalizer: Verbalizer | None = None, source: str | None = None) -> AdapterJob:
    """Load and render one adapter's data.

    By default rows come from ``spec.data`` and validation rows from ``spec.validation_data`` or a
    seeded (label-stratified) ``spec.val_fraction`` split. ``rows``/``val_rows`` pass rows directly
    (cross-validation folds); then ``val_rows=None`` still splits ``rows`` by ``spec.val_fraction``.
    """
    source = source or spec.data
    if rows is None:
        rows = spec.load_train_rows()
        if val_rows is None:
            val_rows = spec.load_validation_rows()
    rows = list(rows)
    split_here = val_rows is None  # validation rows are cut from `rows` (or there are none)
    if split_here:
        val_rows = (train_val_split(rows, spec.val_fraction, spec.seed, spec.label_column, source=source)[1]
                    if spec.val_fraction > 0 else [])
    else:
        val_rows = list(val_rows)
    if spec.label_column is not None and verbalizer is None:
        verbalizer = (Verbalizer(spec.verbalizer) if spec.verbalizer else  # else: the labels the data has
                      Verbalizer.from_rows(rows + ([] if split_here else val_rows), spec.label_column, source=source))
    # Render all rows of a file at once, so that error messages count rows as the file does.
    rendered = build_examples(rows, spec.template, spec.label_column, verbalizer, source=source)
    if split_here:
        in_val = {id(r) for r in val_rows}
        train = [e for e in rendered if id(e.row) not in in_val]
        val = [e for e in rendered if id(e.row) in in_val]
    else:
        train = rendered
        val = build_examples(val_rows, spec.template, spec.label_column, verbalizer,
                             source=spec.validation_data or f"{source} (validation rows)") if val_rows else []
    if not train:
        raise DataError(f"{source}: no training rows are left after holding out validation rows")
    # Held-out means held-out: a validation text that is also a training text is dropped, including
    # the texts the ``init_from`` adapter was trained on.
    start = Path(spec.init_from).expanduser() if spec.init_from else None  # as load_adapter resolves it
    inherited = frozenset(read_train_fingerprints(start)) if start is not None and start.is_dir() else frozenset()
    seen = {fingerprint(e.text) for e in train} | inherited
    kept = [e for e in val if fingerprint(e.text) not in seen]
    if val and not kept:
        raise DataError(f"{spec.validation_data or source}: every validation row also occurs in the training rows; "
                        f"there is nothing held-out to validate on")
    return AdapterJob(spec, train, kept, verbalizer.texts if verbalizer is not None else None, len(val) - len(kept),
                      inherited)


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


@dataclass
class _State:
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


# ============================================================================================ train


def train(config: TrainConfig, model=None, *, on_step: Callable[[StepInfo], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train the adapter(s) a config describes; see the module docstring.

    ``model``: a `SoftPromptModel` to train on (default: ``softprompt.load(config.model)``); its base
    weights are never changed. ``on_step`` is called after every optimizer step (and after the latest
    state was saved, when it was). Cross-validation (``kfold``) is `softprompt.training.cross_validate`.
    """
    config = dataclasses.replace(config, adapters=[dataclasses.replace(a) for a in config.adapters]).validate()
    if config.kfold is not None:
        raise ConfigError(f"{flag('kfold')}: cross-validation is softprompt.training.cross_validate "
                          f"(the CLI runs it when --kfold is given)")
    jobs = [prepare_job(spec) for spec in config.resolved_adapters()]
    model = model if model is not None else load_model(config)
    with stop_at_step_boundary_on_signals():
        return train_jobs(config, model, jobs, on_step=on_step, progress=progress)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after the latest state was saved; the message says where."""


_CTRL_C = threading.Event()


@contextlib.contextmanager
def stop_at_step_boundary_on_signals():
    """While training in one process, Ctrl-C (SIGINT) or SIGTERM (what `kill`, systemd and job schedulers
    send) only sets a flag: the loop then saves the latest state at the next step boundary and raises
    `TrainingInterrupted`, so ``--resume`` continues exactly. A second signal acts at once (the handler
    that was there before comes back). Signals someone else already handles are left alone."""
    if threading.current_thread() is not threading.main_thread() or distributed.launched_world_size() > 1:
        yield  # not ours to change: another thread, or several processes
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {sig: signal.getsignal(sig) for sig, default in defaults.items()
                if signal.getsignal(sig) is default}

    def on_signal(signum, frame):
        _CTRL_C.set()
        signal.signal(signum, previous[signum])

    _CTRL_C.clear()
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _CTRL_C.clear()


def load_model(config: TrainConfig):
    if not config.model:
        raise ConfigError(f"{flag('model')}: required (a built-in name, a local checkpoint directory or a hub id)")
    from softprompt.models.loading import load

    return load(config.model, device=distributed.current().load_device(config.device) or default_device())


def _start_from(model, job: AdapterJob, prefix: str = "") -> None:
    """``init_from``: the job's new adapter takes a saved adapter's weights (and reparameterisation, if
    the save kept one), after checking that it is the same method with as many virtual tokens."""
    fresh = model.adapters[job.name]
    where = f"{prefix}{flag('init_from')} {job.spec.init_from}"
    try:
        loaded = load_adapter(model, job.spec.init_from, name=job.name, resume=True)
    except (SoftPromptError, OSError) as exc:  # raised before the fresh adapter was replaced
        raise ConfigError(f"{where}: {exc}") from None
    want = (job.spec.method, job.spec.method_options["num_virtual_tokens"])
    found = (loaded.config.method, loaded.config.num_virtual_tokens)
    if found != want:
        model.remove_adapter(job.name)
        model.register(job.name, fresh)  # leave the model as a failed set-up of any other kind does
        raise ConfigError(f"{where}: is a {found[0]} adapter with {found[1]} virtual tokens, but this job trains "
                          f"{want[0]} with {want[1]}; set {flag('method')} and {flag('num_virtual_tokens')} to match")
    loaded.requires_grad_(True)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_jobs(config: TrainConfig, model, jobs: list[AdapterJob], *,
               on_step: Callable[[StepInfo], None] | None = None, progress: bool = True) -> TrainResult:
    """The training loop over prepared jobs, all on ``model`` (see the module docstring)."""
    # ------------------------------------------------------------------ set-up
    dist = distributed.current()  # one process, or this one of several (accelerate launch / torchrun)
    dist.check(config.batch_size)
    device = dist.device(config.device)
    if device and not dist.shards_base:  # FSDP: `dist.shard_base` below moves the base, shard by shard
        model.to(device)
    if not config.model:
        config = dataclasses.replace(config, model=model.name_or_path)
    output = Path(config.output)
    names = [job.name for job in jobs]
    for job in jobs:
        if job.name in model.adapters:
            raise ConfigError(f"{flag('name')}: the model already has an adapter named {job.name!r}; remove it or "
                              f"choose another name")
        if config.early_stopping_patience is not None and not job.val:
            raise ConfigError(f"{flag('early_stopping_patience')}: adapter {job.name!r} has no validation rows; "
                              f"give {flag('validation_data')} or a {flag('val_fraction')} above 0")
        if job.labels is None and config.eval_method == "generate":
            raise ConfigError(f"{flag('eval_method')}: generate needs a {flag('label_column')} to compare with")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    for job in jobs:
        model.add_adapter(job.name, method=job.spec.method, seed=job.spec.seed, **job.spec.method_options)
        if job.spec.init_from and not config.resume:  # a resumed run restores its own checkpoint instead
            _start_from(model, job, prefix=f"adapters ({job.name}): " if len(jobs) > 1 else "")
    if config.resume:
        saved = _read_checkpoints(config, output, names, dist)
        for job in jobs:  # the adapters, reparameterisation included, as they were
            load_adapter(model, output / job.name / LAST, name=job.name, resume=True)
    dist.shard_base(model)  # FSDP only; after the adapters were initialised from the whole embedding table
    if dist.is_main:  # only the main process writes files, and only once every check has passed
        output.mkdir(parents=True, exist_ok=True)
        save_resolved(config, output)
    model.train()
    items = {job.name: encode_examples(model, job.train, job.name, config.max_length) for job in jobs}
    pad = pad_id(model.tokenizer)

    optimizer = torch.optim.AdamW([
        {"params": list(model.adapters[job.name].parameters()), "lr": job.spec.lr,
         "weight_decay": job.spec.weight_decay, "name": job.name} for job in jobs])
    steps_per_epoch = math.ceil(math.ceil(sum(len(v) for v in items.values()) / config.batch_size) / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    from transformers import get_scheduler

    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=total_steps)

    state = _State(active=list(names), bad_evals={n: 0 for n in names}, world_size=dist.world_size)
    log = _MetricsLog(output / METRICS_FILE, write=dist.is_main)
    if config.resume:
        state = _restore(saved, model, jobs, optimizer, scheduler, log)
    else:
        log.reset()
        # the bare base model on every adapter's validation rows, once (FSDP: every process runs the passes)
        if config.eval_zero_shot and (dist.is_main or dist.shards_base):
            for job in jobs:
                if job.val:
                    metrics = validate(model, job, None, config)
                    state.zero_shot[job.name] = metrics
                    log.append({"type": "eval", "model": "base", "adapter": job.name, "step": 0, "epoch": 0, **metrics})

    last_plot = [time.time()]

    def evaluate_and_checkpoint() -> None:
        """Validate every active adapter, keep the best, count patience, save the latest state."""
        # The main process validates and saves, then every process goes on with its state. FSDP: the other
        # processes run the same validation passes (their all-gathers are collectives) and record nothing.
        if dist.is_main or dist.shards_base:
            _evaluate_and_checkpoint()
        dist.share_state(state)

    def _evaluate_and_checkpoint() -> None:
        for job in jobs:
            if job.name not in state.active:
                continue
            metrics = validate(model, job, job.name, config) if job.val else {}
            if not dist.is_main:
                continue
            log.append({"type": "eval", "model": "adapter", "adapter": job.name, "step": state.step,
                        "epoch": state.epoch, **metrics})
            score = _score(metrics, job)
            best = state.best.get(job.name)
            if best is None or not job.val or score > tuple(best["score"]):
                state.best[job.name] = {"score": list(score), "step": state.step, "epoch": state.epoch,
                                        "metrics": metrics}
                state.bad_evals[job.name] = 0
                _save_best(model, job, config, state, output)
            else:
                state.bad_evals[job.name] += 1
                if config.early_stopping_patience is not None and \
                        state.bad_evals[job.name] >= config.early_stopping_patience:
                    state.active.remove(job.name)
                    state.stopped.append(job.name)
                    log.append({"type": "early_stop", "adapter": job.name, "step": state.step, "epoch": state.epoch,
                                "best_step": best["step"]})
        if not dist.is_main:
            return
        state.last_eval_step = state.step
        if time.time() - last_plot[0] > PLOT_EVERY_SECONDS:  # plotting is slow: refresh it now and then
            _plot(log, jobs, output)
            last_plot[0] = time.time()
        _save_checkpoint(model, jobs, optimizer, scheduler, state, config, output, log)

    # ------------------------------------------------------------------ loop
    bar = tqdm(total=total_steps, initial=state.step, desc=f"train {', '.join(names)}"[:40], unit="step",
               disable=not progress or not dist.is_main, dynamic_ncols=True)
    started = time.time()
    while not state.finished and state.epoch < config.epochs and state.active:
        rows = [item for name in state.active for item in items[name]]
        groups = epoch_groups(rows, state.epoch, config.seed, config.batch_size, config.grad_accum)
        while state.group < len(groups) and (config.max_steps is None or state.step < config.max_steps):
            if _CTRL_C.is_set():  # Ctrl-C: save the latest state here, between two steps, and stop
                _save_checkpoint(model, jobs, optimizer, scheduler, state, config, output, log)
                bar.close()
                raise TrainingInterrupted(f"stopped after step {state.step}; the latest state is saved in "
                                          f"{output / names[0] / LAST}; continue with --resume")
            # one optimizer step: forward/backward over grad_accum batches, then AdamW and the schedule
            group = groups[state.group]
            step_loss = 0.0
            for batch in group:
                # this process's rows of the batch (all of them in one process; FSDP: after loss-free rows)
                batch = dist.shard(batch, ghost=lambda name: Encoded([pad], [-100], name))
                out = None
                if batch:
                    ids, mask, labels, adapters = collate(batch, pad)
                    with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                        out = model(ids, mask, adapters=adapters, labels=labels)
                loss = dist.batch_loss(out)  # the batch's mean label-token loss (this process's share of it)
                if loss is not None:
                    loss = loss / len(group)
                    loss.backward()
                    step_loss += float(loss.detach())
            step_loss = dist.sync_gradients(optimizer, step_loss)  # sums gradients over processes
            if config.max_grad_norm is not None:
                for param_group in optimizer.param_groups:
                    torch.nn.utils.clip_grad_norm_(param_group["params"], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dist.share_rng()
            state.step += 1
            state.group += 1
            state.loss_sum += step_loss
            state.loss_steps += 1
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            if state.step % config.log_every == 0:
                log.append({"type": "train", "step": state.step, "epoch": state.epoch + 1,
                            "loss": state.loss_sum / state.loss_steps, "lr": lrs,
                            "seconds": round(time.time() - started, 3)})
                state.loss_sum, state.loss_steps = 0.0, 0
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}", refresh=False)
            if config.save_every and state.step % config.save_every == 0 and dist.is_main:
                _save_checkpoint(model, jobs, optimizer, scheduler, state, config, output, log)
            if on_step is not None:
                on_step(StepInfo(state.step, state.epoch + 1, step_loss, lrs))
        if state.group < len(groups):  # max_steps reached inside the epoch
            break
        state.epoch += 1
        state.group = 0
        if state.epoch % config.eval_every == 0 or state.epoch == config.epochs:
            evaluate_and_checkpoint()
    bar.close()

    # ------------------------------------------------------------------ save
    if not state.finished:
        if state.last_eval_step != state.step:
            evaluate_and_checkpoint()
        state.finished = True
        if dist.is_main:
            _save_checkpoint(model, jobs, optimizer, scheduler, state, config, output, log)
    if dist.is_main:
        _plot(log, jobs, output)
    dist.barrier()  # the best adapters are on disk for every process
    results = {}
    for job in jobs:  # leave the model holding each adapter's best checkpoint, ready for inference
        load_adapter(model, output / job.name, name=job.name)
        best = state.best.get(job.name)
        results[job.name] = AdapterResult(
            job.name, output / job.name,
            {**best["metrics"], "step": best["step"], "epoch": best["epoch"]} if best and job.val else None,
            state.zero_shot.get(job.name), job.name in state.stopped)
    model.eval()
    return TrainResult(output, results, state.step, state.epoch, model)


# ====================================================================================== validation


def validate(model, job: AdapterJob, adapter: str | None, config: TrainConfig) -> dict:
    """Validation metrics of ``adapter`` (None: the bare base model) on a job's validation rows."""
    was_training = model.training
    model.eval()
    try:
        total, tokens = example_loss(model, job.val, adapter, batch_size=config.batch_size,
                                     max_length=config.max_length, bf16=config.bf16)
        metrics = {"n": len(job.val), "val_loss": total / tokens, "perplexity": perplexity(total, tokens)}
        if job.labels is not None:
            report = evaluate(model, job.val, adapter, job.labels, method=config.eval_method, compare_base=False,
                              batch_size=config.batch_size, max_length=config.max_length)
            metrics.update(accuracy=report.metrics["accuracy"], macro_f1=report.metrics["macro_f1"])
    finally:
        model.train(was_training)
    return metrics


def _score(metrics: dict, job: AdapterJob) -> tuple:
    """Higher is better: accuracy, then macro-F1, then lower loss (classification); lower loss otherwise."""
    if not metrics:
        return ()
    if job.labels is not None:
        return (metrics["accuracy"], metrics["macro_f1"], -metrics["val_loss"])
    return (-metrics["val_loss"],)


# ====================================================================================== files


class _MetricsLog:
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
        records = []
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


def _plot(log: _MetricsLog, jobs: list[AdapterJob], output: Path) -> None:
    train_records = [r for r in log.records if r["type"] == "train"]
    for job in jobs:
        own = [r for r in log.records if r["type"] == "eval" and r.get("model") == "adapter"
               and r["adapter"] == job.name and "val_loss" in r]
        if train_records or own:
            (output / job.name).mkdir(parents=True, exist_ok=True)
            plot_loss_curve(sorted(train_records + own, key=lambda r: r["step"]), output / job.name / LOSS_PNG)
    single = [r for r in log.records if r["type"] == "eval" and r.get("model") == "adapter" and "val_loss" in r] \
        if len(jobs) == 1 else []
    if train_records or single:
        plot_loss_curve(sorted(train_records + single, key=lambda r: r["step"]), output / LOSS_PNG)


@contextlib.contextmanager
def _saving(model):
    """Eval mode and a forked RNG while saving: materialising a P-tuning LSTM in training mode would apply
    dropout to the saved table and draw from the RNG, so saving would change the run."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


def _save_best(model, job: AdapterJob, config: TrainConfig, state: _State, output: Path) -> None:
    prints = torch.tensor(sorted({fingerprint(e.text) for e in job.train} | job.inherited_fingerprints),
                          dtype=torch.int64)
    best = state.best[job.name]
    meta = {
        "kind": "best", "adapter": job.name, "step": best["step"], "epoch": best["epoch"],
        "metrics": best["metrics"], "zero_shot": state.zero_shot.get(job.name), "labels": job.labels,
        "data": job.spec.to_dict(), "base_model": config.model, "max_length": config.max_length,
    }
    with _saving(model):
        model.save_adapter(job.name, output / job.name, training_state={"data.train_fingerprints": prints},
                           training_meta=meta)


def _save_checkpoint(model, jobs, optimizer, scheduler, state: _State, config: TrainConfig, output: Path,
                     log: _MetricsLog) -> None:
    """The latest state of every adapter, in ``<output>/<name>/checkpoints/last/``."""
    state.metrics_lines = len(log.records)
    rng_tensors, rng_meta = _rng_state()
    optimizer_state = optimizer.state_dict()
    shared = {"kind": "last", "state": dataclasses.asdict(state), "scheduler": scheduler.state_dict(),
              "rng": rng_meta, "config": config.to_dict(), "adapters": [job.name for job in jobs]}
    for index, job in enumerate(jobs):
        group = optimizer_state["param_groups"][index]
        names = [n for n, _ in model.adapters[job.name].named_parameters()]
        tensors = dict(rng_tensors)
        for name, param_id in zip(names, group["params"]):
            for key, value in optimizer_state["state"].get(param_id, {}).items():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().clone()
        meta = {**shared, "adapter": job.name, "optimizer_group": {k: v for k, v in group.items() if k != "params"}}
        with _saving(model):
            model.save_adapter(job.name, output / job.name / LAST, training_state=tensors, training_meta=meta)


def _read_checkpoints(config: TrainConfig, output: Path, names: list[str],
                      dist: distributed.Distributed | None = None) -> dict[str, tuple[dict, dict]]:
    """Each adapter's latest checkpoint; they must agree with each other and with ``config``."""
    dist = dist or distributed.Distributed()
    if dist.is_main:
        for name in names:
            recover_directory(output / name / LAST)  # a save that a crash interrupted midway
    dist.barrier()
    saved = {}
    for name in names:
        path = output / name / LAST
        if not (path / "training_state.json").is_file():
            raise ConfigError(f"{flag('resume')}: no checkpoint to resume at {path}; train without --resume first")
        saved[name] = read_training_state(path)
    steps = {name: meta["state"]["step"] for name, (_, meta) in saved.items()}
    if len(set(steps.values())) != 1:
        raise ConfigError(f"{flag('resume')}: the adapters' checkpoints are from different steps ({steps}); "
                          f"the previous run was interrupted while saving them; train again without --resume")
    processes = next(iter(saved.values()))[1]["state"].get("world_size", 1)
    if processes != dist.world_size:
        raise ConfigError(f"{flag('resume')}: the run being resumed trained on {processes} process(es), this one "
                          f"on {dist.world_size}; launch {processes} (accelerate launch --num_processes {processes}) "
                          f"to resume")
    previous = next(iter(saved.values()))[1]["config"]
    current = config.to_dict()
    changed = [k for k in current if k not in RESUMABLE_CHANGES and previous.get(k) != current[k]]
    if changed:
        what = ", ".join(f"{flag(k)} {previous.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"{flag('resume')}: the config differs from the run being resumed ({what}); "
                          f"resuming gives the uninterrupted result only with the same config")
    if next(iter(saved.values()))[1]["adapters"] != names:
        raise ConfigError(f"{flag('resume')}: the run being resumed trained adapters "
                          f"{next(iter(saved.values()))[1]['adapters']}, this one {names}")
    return saved


def _restore(saved: dict, model, jobs, optimizer, scheduler, log: _MetricsLog) -> _State:
    """Optimizer, scheduler, loop state, metrics log and RNG states from the checkpoints."""
    optimizer_state = {"state": {}, "param_groups": []}
    index = 0
    for job in jobs:
        tensors, meta = saved[job.name]
        names = [n for n, _ in model.adapters[job.name].named_parameters()]
        ids = list(range(index, index + len(names)))
        index += len(names)
        by_name = dict(zip(names, ids))
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                param, _, slot = key[len("optimizer."):].rpartition(".")
                optimizer_state["state"].setdefault(by_name[param], {})[slot] = value
        optimizer_state["param_groups"].append({**meta["optimizer_group"], "params": ids})
    optimizer.load_state_dict(optimizer_state)
    tensors, meta = saved[jobs[0].name]
    scheduler.load_state_dict(meta["scheduler"])
    state = _State(**meta["state"])
    log.truncate(state.metrics_lines)
    _set_rng_state(tensors, meta["rng"])
    return state


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, python_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), python_gauss]}
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
    "train", "train_jobs", "prepare_job", "TrainingInterrupted", "AdapterJob", "AdapterResult", "TrainResult", "StepInfo",
    "validate", "load_model", "METRICS_FILE",
    "LOSS_PNG",
]
