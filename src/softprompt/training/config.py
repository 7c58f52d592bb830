"""Typed training configuration: YAML files, ``--key value`` overrides, validation that names the flag.

A training job is described by one `TrainConfig`. It comes from a YAML file, from flags, or both
(flags win)::

    config = load_config("recipes/raft.yaml", ["--lr", "0.1", "--batch-size", "4"])
    config = load_config(None, {"model": "smollm2-135m", "data": "train.csv", "label_column": "label"})

Every field carries its help text; `train_options()` lists flag, type, default and help of every
option, which is what ``softprompt train --help`` shows. Every mistake raises `ConfigError` naming the
flag (``--batch-size: expected an integer of at least 1, got 0``) or, for files, the file and key
(``run.yaml: unknown key 'lrr' (did you mean 'lr'?)``).

The method's own options (``num_virtual_tokens``, ``init_text``, ``prefix_projection`` ...) are declared
once, as fields of the method's config class (`softprompt.methods`). A job keeps them in the nested
``method_options`` mapping; each may also be given as a key or flag of its own (``prefix_projection:
true``, ``--init-text "Classify:"``), which is what recipes and command lines do.

Several adapters can be trained in one job on one base model: ``adapters`` is a list of `AdapterSpec`
overrides, each with a ``name`` and any `AdapterSettings` field (data, method, its options, lr, ...) of
its own; what an adapter does not set it inherits from the top level. `TrainConfig.resolved_adapters()`
returns the fully resolved settings of every adapter (one adapter, named ``name``, when ``adapters`` is
empty).

`save_resolved(config, dir)` writes ``config.yaml``, the resolved config, next to the outputs; loading
that file gives back an equal config.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from softprompt.models.precision import DTYPE_HELP, DTYPE_NAMES, QUANTIZE_HELP, QUANTIZE_NAMES
from softprompt.engine.adapter_name import ADAPTER_NAME, ADAPTER_NAME_RULE
from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_yaml
from softprompt.methods import METHOD_OPTIONS
from softprompt.options import (
    Option,
    OptionError,
    check_choice,
    check_int,
    check_number,
    coerce,
    did_you_mean,
    field_name,
    flag,
    is_bool,
    is_optional,
    option,
    options_of,
    parse_mapping_text,
)
from softprompt.training.adapter_config import (
    METHOD_OPTION_TYPES,
    AdapterSettings,
    AdapterSpec,
    ResolvedAdapter,
    check_adapter_numbers,
    method_name,
    method_option_listing,
    resolve_adapter,
)
from softprompt.training.objectives import check_objective

CONFIG_FILE = "config.yaml"
MAX_CONFIG_BYTES = 1024**2  # a config is a few hundred bytes; anything near this is not a config
SCHEDULES = ("linear", "cosine", "constant")
VALIDATION_METHODS = ("score", "generate")  # how training validates labelled rows
RESUME = (False, True, "auto")
OBJECTIVES = ("lm", "distill")  # the training loss (softprompt.training.objectives)
#: Where each adapter's latest training state is saved, under ``<output>/<adapter>/``.
CHECKPOINT = Path("checkpoints") / "last"


@dataclass
class TrainConfig(AdapterSettings):
    """Everything a training job needs. See the module docstring for how it is loaded."""

    model: str | None = option(None, "Base model: built-in name, local checkpoint directory or hub id.")
    name: str = option("default", "Adapter name when one adapter is trained (its output sub-directory).")
    kfold: int | None = option(None, "Cross-validate with k folds instead of a single split (k >= 2).")
    max_length: int = option(256, "Longest example in tokens (prompt + label); longer prompts keep their end.")
    objective: str = option(
        "lm",
        "Training loss: lm (cross-entropy on the data's tokens) or distill (KL to the frozen model reading "
        "--context, for kv methods such as cartridge; see docs/selfstudy.md).",
        choices=OBJECTIVES,
    )
    # --- optimisation
    epochs: int = option(3, "Passes over the training data.")
    batch_size: int = option(8, "Examples per forward pass.")
    warmup_ratio: float = option(0.0, "Fraction of the optimizer steps spent warming the learning rate up from 0.")
    lr_schedule: str = option(
        "linear", "Learning-rate schedule after warm-up: linear, cosine or constant.", choices=SCHEDULES
    )
    grad_accum: int = option(1, "Forward passes accumulated per optimizer step.")
    max_grad_norm: float | None = option(None, "Clip the gradient norm of each adapter to this value (default: off).")
    max_steps: int | None = option(None, "Stop after this many optimizer steps (the schedule then spans them).")
    dtype: str | None = option(None, DTYPE_HELP, choices=DTYPE_NAMES)
    quantize: str | None = option(None, QUANTIZE_HELP, choices=QUANTIZE_NAMES)
    bf16: bool = option(False, "Run forward passes under bfloat16 autocast (CPU or GPU).")
    gradient_checkpointing: bool = option(
        False, "Recompute each transformer block in the backward pass: far less activation memory, ~1/3 more time."
    )
    device: str | None = option(None, "Device: cpu, cuda, cuda:1, mps (default: cuda when available).")
    # --- evaluation, checkpoints, output
    output: str = option("runs/softprompt", "Output directory: <output>/<adapter>/ holds each best adapter.")
    resume: bool | str = option(
        False,
        "Continue from <output>/<adapter>/checkpoints/last/ (same config required); auto: continue when "
        "that checkpoint exists, else start fresh.",
        choices=RESUME,
    )
    eval_every: int = option(1, "Validate every this many epochs (and after the last).")
    eval_method: str = option(
        "score",
        "Validation of labelled data: score (rank the label texts) or generate (exact match of generated text).",
        choices=VALIDATION_METHODS,
    )
    eval_zero_shot: bool = option(True, "Also validate the bare base model once, to report beside the adapter.")
    early_stopping_patience: int | None = option(
        None, "Stop an adapter after this many validations without improvement (default: off)."
    )
    save_every: int = option(0, "Also save the latest state every this many optimizer steps (0: at validations).")
    log_every: int = option(10, "Append the training loss to metrics.jsonl every this many optimizer steps.")
    adapters: list[AdapterSpec] = option(
        list, "Several adapters in one job: a list of {name, and any of data, method, lr, num_virtual_tokens...}."
    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from a mapping (a parsed YAML file); unknown keys and wrong types name ``source``."""
        return _build(cls, values, source=source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what `save_resolved` writes); ``from_dict(to_dict())`` gives an equal config."""
        out = dataclasses.asdict(self)
        out["adapters"] = [{k: v for k, v in a.items() if v is not None} for a in out["adapters"]]
        return out

    @classmethod
    def options(cls) -> list[Option]:
        """Every field as a command-line option (flag, type, default, help, choices), in order."""
        return options_of(cls)

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check ranges and combinations; raises `ConfigError` naming the flag. Normalises method names and
        decides ``resume: auto`` (true when a checkpoint of an adapter of this job exists)."""
        self.method = method_name(self.method, flag("method"))
        check_adapter_numbers(self, "")
        check_int(self.max_length, flag("max_length"), minimum=2)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "log_every"):
            check_int(getattr(self, name), flag(name), minimum=1)
        check_int(self.save_every, flag("save_every"), minimum=0)
        for name in ("max_steps", "early_stopping_patience"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), flag(name), minimum=1)
        if self.kfold is not None:
            check_int(self.kfold, flag("kfold"), minimum=2)
        check_number(self.warmup_ratio, flag("warmup_ratio"), minimum=0.0, below=1.0)
        if self.max_grad_norm is not None:
            check_number(self.max_grad_norm, flag("max_grad_norm"), above=0.0)
        check_choice(self.lr_schedule, flag("lr_schedule"), SCHEDULES)
        check_choice(self.eval_method, flag("eval_method"), VALIDATION_METHODS)
        if self.dtype is not None:
            check_choice(self.dtype, flag("dtype"), DTYPE_NAMES)
        if self.quantize is not None:
            check_choice(self.quantize, flag("quantize"), QUANTIZE_NAMES)
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise OptionError(flag("resume"), f"expected true, false or auto, got {self.resume!r}")
        if not isinstance(self.output, str) or not self.output.strip():
            raise OptionError(flag("output"), f"expected a directory path, got {self.output!r}")
        _output_directory(self.output, [self.name] + [a.name for a in self.adapters if isinstance(a.name, str)])
        if self.device is not None and not _valid_device(self.device):
            raise OptionError(flag("device"), f"expected cpu, cuda, cuda:N or mps, got {self.device!r}")
        _adapter_name(self.name, flag("name"))
        names = [a.name for a in self.adapters] or [self.name]
        for i, spec in enumerate(self.adapters):
            _adapter_name(spec.name, f"adapters[{i}].name")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise OptionError(flag("adapters"), f"the adapter name {duplicate!r} is given twice")
        if self.kfold is not None and self.adapters:
            raise OptionError(flag("kfold"), f"cross-validation trains one adapter per fold; remove {flag('adapters')}")
        if self.kfold is not None and self.objective != "lm":
            raise OptionError(flag("kfold"), f"cross-validation trains with {flag('objective')} lm")
        if self.kfold is not None and self.validation_data:
            raise OptionError(flag("kfold"), f"the folds are cut from {flag('data')}; remove {flag('validation_data')}")
        check_choice(self.objective, flag("objective"), OBJECTIVES)
        check_objective(self.objective, self.resolved_adapters())  # also validates every adapter's settings
        if self.resume == "auto":
            self.resume = any((Path(self.output).expanduser() / name / CHECKPOINT).exists() for name in names)
        return self

    def resolved_adapters(self) -> list[ResolvedAdapter]:
        """The fully resolved settings of every adapter of the job (validated)."""
        specs = self.adapters or [AdapterSpec(name=self.name)]
        return [
            resolve_adapter(
                self, spec, f"adapters[{i}] ({spec.name}): " if self.adapters else "", several=bool(self.adapters)
            )
            for i, spec in enumerate(specs)
        ]


def train_options() -> list[Option]:
    """Every option of ``softprompt train``: the config's fields, and after ``method_options`` one option
    per field of the method config classes (its help naming the methods that take it)."""
    own = {o.name: o for o in TrainConfig.options()}
    first = ("model", "name", "method", "method_options")
    return [own[name] for name in first] + method_option_listing() + [o for name, o in own.items() if name not in first]


# ----------------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None, *, validate: bool = True
) -> TrainConfig:
    """A config from a YAML file (optional) with overrides on top, validated.

    ``overrides`` is either a mapping (``{"lr": 0.1}`` or ``{"--batch-size": "4"}``; string values are
    parsed as on the command line, None values are skipped) or a list of command-line words
    (``["--lr", "0.1", "--bf16", "--no-resume"]``; a bool flag without a value means true).
    """
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        values = read_yaml(path)
        source = str(path)
    config = _build(TrainConfig, values, source=source)
    if overrides:
        config = apply_overrides(config, overrides)
    return config.validate() if validate else config


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, unreadable or non-mapping file is a `ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a YAML config file")
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such config file"
            if not path.exists()
            else f"{path}: not a regular file; expected a YAML config file"
        )
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: is {path.stat().st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(value).__name__}")
    return value


def apply_overrides(
    config: TrainConfig, overrides: Mapping[str, Any] | Sequence[str], *, source: str = "command line"
) -> TrainConfig:
    """A copy of ``config`` with overrides applied (see `load_config`); not validated. A method option
    (``--init-text``) sets that key of ``method_options``; ``null`` unsets it (the method's default)."""
    if not isinstance(overrides, Mapping):
        overrides = parse_override_words(overrides)
    hints = typing.get_type_hints(TrainConfig)
    changes: dict[str, Any] = {}
    options = dict(config.method_options)
    for raw_key, value in overrides.items():
        key = field_name(raw_key)
        if key not in hints and key not in METHOD_OPTIONS:
            raise ConfigError(f"{flag(key)}: unknown option{did_you_mean(key, [*hints, *METHOD_OPTIONS])}")
        if value is None:
            continue
        text = isinstance(value, str)
        if key in METHOD_OPTIONS or key == "method_options":
            parsed = _method_options(value if key == "method_options" else {key: value}, text=text, where=flag)
            options.update(parsed)
            options = {k: v for k, v in options.items() if v is not None}
        elif key == "adapters":
            changes[key] = _adapters(value, text=text, where=flag(key))
        else:
            changes[key] = coerce(value, hints[key], text=text, where=flag(key))
    if options != config.method_options:
        changes["method_options"] = options
    return dataclasses.replace(config, **changes)


def parse_override_words(words: Sequence[str]) -> dict[str, str | bool]:
    """``["--lr", "0.1", "--bf16", "--no-resume"]`` -> ``{"lr": "0.1", "bf16": True, "resume": False}``."""
    hints = {**METHOD_OPTION_TYPES, **typing.get_type_hints(TrainConfig)}
    out: dict[str, str | bool] = {}
    words = list(words)
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ConfigError(f"{word!r}: expected an option such as --lr, got a bare value")
        name, eq, inline = word[2:].partition("=")
        key = field_name(name)
        if key not in hints and key.startswith("no_") and key[3:] in hints and not eq:
            out[key[3:]] = False
            i += 1
            continue
        if key not in hints:
            raise ConfigError(f"{flag(key)}: unknown option{did_you_mean(key, hints)}")
        if eq:
            out[key] = inline
            i += 1
        elif is_bool(hints[key]) and (i + 1 == len(words) or words[i + 1].startswith("--")):
            out[key] = True
            i += 1
        elif i + 1 < len(words):
            out[key] = words[i + 1]
            i += 2
        else:
            raise ConfigError(f"{flag(key)}: expects a value")
    return out


def parse_verbalizer(text: str, where: str = "--verbalizer") -> dict[str, str]:
    """A verbalizer given on a command line ('1=complaint,2=no complaint' or a YAML mapping), checked as
    the ``verbalizer`` config field is."""
    return coerce(text, dict[str, str], text=True, where=where)


def save_resolved(config: TrainConfig, directory: str | Path) -> Path:
    """Write the resolved ``config.yaml`` into ``directory`` (atomically); returns its path."""
    path = Path(directory) / CONFIG_FILE
    atomic_write_yaml(path, config.to_dict())
    return path


# ----------------------------------------------------------------------------------------- internals


def _build(cls, values: Mapping[str, Any], *, source: str):
    """A `TrainConfig` or `AdapterSpec` from a parsed YAML mapping; method options given as keys of their
    own go into ``method_options``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key)
        if key not in hints and key not in METHOD_OPTIONS:
            alt = field_name(key)
            if alt not in hints and alt not in METHOD_OPTIONS:
                raise ConfigError(
                    f"{source}: unknown key {raw_key!r}{did_you_mean(key, [*known, *METHOD_OPTIONS])}; "
                    f"expected some of: {', '.join(known)}, or a method option: "
                    f"{', '.join(METHOD_OPTIONS)}"
                )
            key = alt
        where = f"{source}: key {key!r}"
        if key in METHOD_OPTIONS or key == "method_options":
            if key == "method_options" and value is None:
                continue
            parsed = _method_options(
                value if key == "method_options" else {key: value},
                text=False,
                where=lambda name: f"{source}: key {name!r}",
            )
            options.update({k: v for k, v in parsed.items() if v is not None})
        elif key == "adapters":
            kwargs[key] = _adapters(value, text=False, where=f"{source}: adapters")
        elif value is not None or is_optional(hints[key]):  # an explicit null keeps the default of a required field
            kwargs[key] = coerce(value, hints[key], text=False, where=where)
    if options:
        kwargs["method_options"] = options
    return cls(**kwargs)


def _method_options(values: Any, *, text: bool, where) -> dict[str, Any]:
    """A mapping of method options (YAML, or YAML text from a command line), each value of its type;
    ``where(name)`` spells an option's name in errors."""
    if text and isinstance(values, str):
        values = parse_mapping_text(values, where("method_options"))
    if not isinstance(values, Mapping):
        raise OptionError(where("method_options"), f"expected a mapping of method options, got {values!r}")
    out = {}
    for raw_key, value in values.items():
        key = field_name(raw_key)
        if key not in METHOD_OPTIONS:
            raise OptionError(
                where(str(raw_key)),
                f"unknown method option{did_you_mean(key, METHOD_OPTIONS)}; "
                f"expected some of: {', '.join(METHOD_OPTIONS)}",
            )
        out[key] = coerce(value, METHOD_OPTION_TYPES[key], text=text, where=where(key))
    return out


def _adapters(value: Any, *, text: bool, where: str) -> list:
    if text and isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise OptionError(where, f"expected a YAML list of adapters, got {value!r}") from None
    if not isinstance(value, list):
        raise OptionError(where, f"expected a list of adapters, each a mapping with a name, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise OptionError(where, f"expected a list of mappings (item {i} is {item!r})")
    return [_build(AdapterSpec, item, source=f"{where}[{i}]") for i, item in enumerate(value)]


def _output_directory(output: str, names: list[str]) -> None:
    """``output`` (and each adapter's sub-directory) must be a directory or not exist yet, never a file."""
    path = Path(output).expanduser()
    for place in [path, *(path / n for n in names if n and "/" not in n)]:
        if place.exists() and not place.is_dir():
            raise ConfigError(f"{flag('output')}: {place} exists and is not a directory; choose another output path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag('output')}: {parent} is not a directory, so {path} cannot be created")
            break


def _valid_device(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind in ("cpu", "cuda", "mps", "xpu") and (not index or index.isdigit())


def _adapter_name(name: Any, where: str) -> None:

    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"{where}: expected {ADAPTER_NAME_RULE}, got {name!r}")


__all__ = [
    "CHECKPOINT",
    "CONFIG_FILE",
    "OBJECTIVES",
    "SCHEDULES",
    "VALIDATION_METHODS",
    "AdapterSettings",
    "AdapterSpec",
    "Option",
    "ResolvedAdapter",
    "TrainConfig",
    "apply_overrides",
    "flag",
    "load_config",
    "parse_override_words",
    "parse_verbalizer",
    "read_yaml",
    "save_resolved",
    "train_options",
]
