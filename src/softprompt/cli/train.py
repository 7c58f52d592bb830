"""``softprompt train``: a job from a YAML file and/or ``--key value`` flags, trained (or cross-validated).

The flags are the training config's fields and the method options (`softprompt.training.config.train_options`),
parsed by `load_config`, so this module declares none of its own: ``--help`` lists them from the fields.
"""

from __future__ import annotations

import argparse
import sys

import torch

from softprompt.errors import SoftPromptError
from softprompt.models.memory import device_memory, estimate_memory
from softprompt.training.checkpoint import LOSS_PNG, METRICS_FILE
from softprompt.training.config import CONFIG_FILE, TrainConfig, load_config, train_options
from softprompt.training.cross_validate import cross_validate
from softprompt.training.distributed import Distributed, current
from softprompt.training.loop import TrainResult, train

NAME = "train"
HELP = "Train one or several adapters on one frozen base model."
TAKES_EXTRA = True  # every word after the subcommand goes to load_config
EXAMPLES = """
    examples:
      softprompt train recipes/offline/raft_twitter_complaints.yaml      # smollm2-135m, local data
      softprompt train recipes/raft_twitter_complaints.yaml --model smollm2-135m \\
          --data ../shared/data/raft_twitter_complaints/train.csv --kfold 10
      softprompt train --model smollm2-135m --data hf:glue:sst2 --validation-split validation \\
          --text-column sentence --label-column label --verbalizer '0=negative,1=positive'
      softprompt train --model smollm2-135m --method prompt-tuning --data tweets.csv \\
          --text-column text --label-column label --template "Tweet: {text} Sentiment: " \\
          --num-virtual-tokens 8 --init-text "Classify the sentiment:" --epochs 5 --batch-size 8 \\
          --lr 3e-2 --seed 0 --output runs/sentiment
      softprompt train --model smollm2-135m --method prefix-tuning --data tweets.csv \\
          --text-column text --label-column label --init-text "Classify the sentiment:" \\
          --num-virtual-tokens 8 --lr 1e-2        # prefix starts from the text's keys/values
      softprompt train recipes/raft_twitter_complaints.yaml --output runs/raft --resume
      softprompt train recipes/raft_twitter_complaints.yaml --output runs/raft --resume auto
          (continues when runs/raft/<adapter>/checkpoints/last exists, else starts fresh)
      softprompt train --model smollm2-135m --method prefix-tuning --num-virtual-tokens 20 \\
          --data more_reviews.csv --init-from examples/adapters/sst2 --lr 3e-3 --output runs/more
          (warm start: a new job from a saved adapter, e.g. more rows, or another related task)
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "softprompt train [CONFIG.yaml] [--KEY VALUE ...]"
    lines = [f"  {o.flag:<28} {o.help}" for o in train_options()]
    parser.epilog = (
        (parser.epilog or "") + "\noptions from the config (--KEY VALUE overrides the file):\n" + "\n".join(lines)
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    path = extra[0] if extra and not extra[0].startswith("-") else None
    config = load_config(path, overrides=extra[1:] if path else extra)
    dist = current()
    main = dist.is_main  # under accelerate launch / torchrun only the main process prints
    warning = fit_warning(config, dist) if main else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if config.kfold:
        report = cross_validate(config)
        if main:
            print(report.format())
        return 0
    result = train(config)
    if main:
        print(summary(result))
    return 0


def fit_warning(config: TrainConfig, dist: Distributed) -> str | None:
    """One line when `estimate_memory` predicts that a process of this job needs more than its device has (a
    CUDA card's total memory, the CPU's available RAM); None when it fits or cannot be told (a model or device
    the estimate does not cover). Read before the model loads, from its config.json alone."""
    requested = dist.device(config.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    memory = device_memory(str(device))
    if memory is None or config.model is None:
        return None
    sharding = "zero3" if dist.zero is not None else "fsdp" if dist.fsdp is not None else "none"
    adapter = max(config.resolved_adapters(), key=lambda a: a.method_options.get("num_virtual_tokens", 0))
    options = dict(adapter.method_options)
    try:
        estimate = estimate_memory(
            config.model,
            method=adapter.method,
            num_virtual_tokens=options.pop("num_virtual_tokens"),
            batch_size=-(-config.batch_size // dist.world_size),  # --batch-size is the global batch
            max_length=config.max_length,
            dtype=config.dtype or "float32",
            # fields of the job config the estimate models once the job declares them
            quantize=getattr(config, "quantize", None),
            gradient_checkpointing=bool(getattr(config, "gradient_checkpointing", False)),
            processes=dist.world_size,
            sharding=sharding,
            device=device.type,
            method_options=options,
        )
    except SoftPromptError:
        return None
    if estimate.total_bytes <= memory:
        return None
    what = "total memory" if device.type == "cuda" else "available memory"
    return (
        f"warning: softprompt estimate-memory predicts {estimate.total_bytes / 2**30:.2f} GiB per process for this "
        f"job, above the {memory / 2**30:.2f} GiB {what} of {device}; it may run out of memory "
        "(see `softprompt estimate-memory --help` for what lowers it)"
    )


def _cell(metrics: dict | None, key: str, digits: int) -> str:
    value = (metrics or {}).get(key)
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary(result: TrainResult) -> str:
    """How a training run ended: per adapter its best validation (step, loss, accuracy, macro-F1) beside the
    zero-shot base model's on the same rows, then where the config, metrics, plots and adapters are."""
    header = ["adapter", "best step", "val loss", "accuracy", "macro-F1", "zero-shot loss", "accuracy", "macro-F1"]
    rows = [header]
    for name, adapter in result.adapters.items():
        best, base = adapter.best, adapter.zero_shot
        rows.append(
            [
                name,
                _cell(best, "step", 0),
                _cell(best, "val_loss", 4),
                _cell(best, "accuracy", 3),
                _cell(best, "macro_f1", 3),
                _cell(base, "val_loss", 4),
                _cell(base, "accuracy", 3),
                _cell(base, "macro_f1", 3),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    if any(a.best is None for a in result.adapters.values()):
        lines.append("(-: no validation rows, so the adapter saved is the last one)")
    output = result.output
    plots = [output / LOSS_PNG, *(a.path / LOSS_PNG for a in result.adapters.values())]
    where = [
        ("config", [output / CONFIG_FILE]),
        ("metrics", [output / METRICS_FILE]),
        ("plots", plots),
        ("adapters", [a.path for a in result.adapters.values()]),
    ]
    for label, paths in where:
        found = [str(p) for p in paths if p.exists()]
        if found:
            lines.append(f"{label + ':':<9} {', '.join(found)}")
    return "\n".join(lines)
