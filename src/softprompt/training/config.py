"""Typed training configuration: YAML files, ``--key value`` overrides, validation that names the flag.

A training job is described by one `TrainConfig`. It comes from a YAML file, from flags, or both
(flags win)::

    config = load_config("recipes/raft.yaml", ["--lr", "0.1", "--batch-size", "4"])
    config = load_config(None, {"model": "smollm2-135m", "data": "train.csv", "label_column": "label"})

Every field carries its help text (``TrainConfig.options()`` lists flag, type, default and help, which
is what the CLI builds its parser from). Every mistake raises `ConfigError` naming the flag
(``--batch-size: expected an integer of at least 1, got 0``) or, for files, the file and key
(``run.yaml: unknown key 'lrr' (did you mean 'lr'?)``).

Several adapters can be trained in one job on one base model: ``adapters`` is a list of `AdapterSpec`
overrides, each with a ``name`` and any of data/method/lr/num_virtual_tokens/... of its own; what an
adapter does not set it inherits from the top level. `TrainConfig.resolved_adapters()` returns the
fully resolved settings of every adapter (one adapter, named ``name``, when ``adapters`` is empty).

`save_resolved(config, dir)` writes ``config.yaml``, the resolved config, next to the outputs; loading
that file gives back an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_yaml
from softprompt.methods import METHODS
from softprompt.methods.base import help_field

CONFIG_FILE = "config.yaml"
MAX_CONFIG_BYTES = 1024**2  # a config is a few hundred bytes; anything near this is not a config
SCHEDULES = ("linear", "cosine", "constant")
EVAL_METHODS = ("score", "generate")
#: Method-specific options and the methods that take them (all of them take num_virtual_tokens).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "init": ("prompt_tuning", "prefix_tuning"),
    "init_text": ("prompt_tuning", "prefix_tuning"),
    "prefix_projection": ("prefix_tuning",),
    "encoder_type": ("p_tuning",),
    "encoder_hidden_size": ("prefix_tuning", "p_tuning"),
    "encoder_num_layers": ("p_tuning",),
    "encoder_dropout": ("p_tuning",),
}
#: Fields an `AdapterSpec` may leave unset (None) to inherit from the top level.
INHERITED = (
    "data", "validation_data", "data_format", "encoding", "data_split", "validation_split", "text_column", "label_column", "template", "verbalizer", "val_fraction",
    "method", "num_virtual_tokens", *METHOD_OPTIONS, "init_from", "lr", "weight_decay", "seed",
)


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _key(name: str) -> str:
    """A field name from a flag or key spelling: ``--batch-size`` / ``batch-size`` -> ``batch_size``."""
    return str(name).lstrip("-").replace("-", "_")


# ----------------------------------------------------------------------------------------- dataclasses


@dataclass
class AdapterSpec:
    """One adapter of a multi-adapter job. Unset (null) fields inherit the top-level value."""

    name: str = help_field("", "Adapter name (letters, digits, '_' or '-'); also its output sub-directory.")
    data: str | None = help_field(None, "This adapter's training data file.")
    validation_data: str | None = help_field(None, "This adapter's validation data file.")
    data_format: str | None = help_field(None, "Format of this adapter's data files (default: from the extension).")
    encoding: str | None = help_field(None, "Text encoding of this adapter's data files.")
    data_split: str | None = help_field(None, "Split of this adapter's hub data set to train on.")
    validation_split: str | None = help_field(None, "Split of this adapter's hub data set to validate on.")
    text_column: str | None = help_field(None, "Text column of this adapter's data.")
    label_column: str | None = help_field(
        None, "Label column of this adapter's data; an empty string means none (language modelling).")
    template: str | None = help_field(None, "Prompt template with {column} fields for this adapter.")
    verbalizer: dict[str, str] | None = help_field(None, "Raw label -> label text for this adapter.")
    val_fraction: float | None = help_field(None, "Validation fraction of this adapter's data.")
    method: str | None = help_field(None, "Method of this adapter: prompt_tuning, prefix_tuning or p_tuning.")
    num_virtual_tokens: int | None = help_field(None, "Virtual tokens of this adapter.")
    init: str | None = help_field(
        None, "Prompt / prefix tuning init of this adapter (text, sample_vocab, random, auto).")
    init_text: str | None = help_field(None, "Prompt / prefix tuning init text of this adapter.")
    prefix_projection: bool | None = help_field(None, "Prefix tuning: reparameterise with an MLP.")
    encoder_type: str | None = help_field(None, "P-tuning encoder of this adapter (mlp or lstm).")
    encoder_hidden_size: int | None = help_field(None, "Hidden width of this adapter's MLP/LSTM encoder.")
    encoder_num_layers: int | None = help_field(None, "P-tuning LSTM layers of this adapter.")
    encoder_dropout: float | None = help_field(None, "P-tuning LSTM dropout of this adapter.")
    init_from: str | None = help_field(None, "Saved adapter (directory or hub id) this adapter starts from.")
    lr: float | None = help_field(None, "Peak learning rate of this adapter (its own optimizer param group).")
    weight_decay: float | None = help_field(None, "AdamW weight decay of this adapter.")
    seed: int | None = help_field(None, "Seed of this adapter's initialisation.")


@dataclass
class TrainConfig:
    """Everything a training job needs. See the module docstring for how it is loaded."""

    # --- model and method
    model: str | None = help_field(None, "Base model: built-in name, local checkpoint directory or hub id.")
    name: str = help_field("default", "Adapter name when one adapter is trained (its output sub-directory).")
    method: str = help_field("prompt_tuning", "Soft-prompt method: prompt_tuning, prefix_tuning or p_tuning.")
    num_virtual_tokens: int = help_field(8, "Number of virtual tokens the adapter adds.")
    init: str | None = help_field(
        None, "Prompt / prefix tuning: how to start the virtual tokens: text, sample_vocab, random or auto. "
              "Prompt tuning starts from token embeddings (auto: text when --init-text is given, else "
              "sample_vocab); prefix tuning from the keys/values the frozen model computes for those tokens "
              "(auto: the same, except random, as PEFT, with --prefix-projection).",
        choices=("text", "sample_vocab", "random", "auto"))
    init_text: str | None = help_field(
        None, "Prompt / prefix tuning: text whose token embeddings (prompt) or keys/values (prefix) start the adapter.")
    prefix_projection: bool | None = help_field(
        None, "Prefix tuning: reparameterise the prefix with a two-layer MLP while training (default false).")
    encoder_type: str | None = help_field(
        None, "P-tuning: prompt encoder, mlp or lstm (default mlp).", choices=("mlp", "lstm"))
    encoder_hidden_size: int | None = help_field(
        None, "Prefix tuning / P-tuning: hidden width of the reparameterisation encoder (default: model width).")
    encoder_num_layers: int | None = help_field(None, "P-tuning: LSTM layers (default 2).")
    encoder_dropout: float | None = help_field(None, "P-tuning: dropout between LSTM layers (default 0).")
    init_from: str | None = help_field(
        None, "Start from a saved adapter (a directory in PEFT's layout, or a hub id) instead of --init: "
              "continue training on new data, or transfer a prompt from a related task. Its method and number "
              "of virtual tokens must be this job's; one saved by softprompt also brings back its "
              "reparameterisation (MLP/LSTM), a plain PEFT table trains as a table.")
    # --- data
    data: str | None = help_field(
        None, "Training data: CSV, TSV, JSONL, parquet or phrasebank .txt file, or hf:owner/name.")
    validation_data: str | None = help_field(
        None, "Validation data file (default: --val-fraction of --data is held out).")
    data_format: str | None = help_field(
        None, "Format of --data/--validation-data when the extension does not tell: csv, tsv, jsonl, parquet, "
              "phrasebank (sentence@label lines) or hf (a hub data set).")
    encoding: str | None = help_field(
        None, "Text encoding of the data files (default UTF-8; phrasebank files fall back to latin-1).")
    data_split: str = help_field("train", "Split of a hub --data set to train on.")
    validation_split: str | None = help_field(
        None, "Split of a hub data set to validate on, e.g. validation: of --validation-data when it is a hub "
              "name, else of --data (instead of holding out --val-fraction).")
    text_column: str = help_field("text", "Column holding the input text (used when no --template is given).")
    label_column: str | None = help_field(
        None, "Column holding the label; without one the job is language modelling on the whole text.")
    template: str | None = help_field(
        None, "Prompt template with {column} fields, e.g. 'Tweet: {text} Sentiment: ' (default '{<text column>}').")
    verbalizer: dict[str, str] | None = help_field(
        None, "Raw label -> label text the model learns and scores, e.g. '1=complaint,2=no complaint' "
              "(default: the raw labels themselves).")
    val_fraction: float = help_field(
        0.1, "Fraction of --data held out for validation when no --validation-data is given (0: none).")
    kfold: int | None = help_field(None, "Cross-validate with k folds instead of a single split (k >= 2).")
    max_length: int = help_field(256, "Longest example in tokens (prompt + label); longer prompts keep their end.")
    # --- optimisation
    epochs: int = help_field(3, "Passes over the training data.")
    batch_size: int = help_field(8, "Examples per forward pass.")
    lr: float = help_field(3e-2, "Peak learning rate (AdamW).")
    weight_decay: float = help_field(0.0, "AdamW weight decay.")
    warmup_ratio: float = help_field(0.0, "Fraction of the optimizer steps spent warming the learning rate up from 0.")
    lr_schedule: str = help_field("linear", "Learning-rate schedule after warm-up: linear, cosine or constant.",
                                  choices=SCHEDULES)
    grad_accum: int = help_field(1, "Forward passes accumulated per optimizer step.")
    max_grad_norm: float | None = help_field(
        None, "Clip the gradient norm of each adapter to this value (default: off).")
    max_steps: int | None = help_field(None, "Stop after this many optimizer steps (the schedule then spans them).")
    seed: int = help_field(0, "Seed of the initialisation, the split and the data order.")
    bf16: bool = help_field(False, "Run forward passes under bfloat16 autocast (CPU or GPU).")
    device: str | None = help_field(None, "Device: cpu, cuda, cuda:1, mps (default: cuda when available).")
    # --- evaluation, checkpoints, output
    output: str = help_field("runs/softprompt", "Output directory: <output>/<adapter>/ holds each best adapter.")
    resume: bool = help_field(False, "Continue from <output>/<adapter>/checkpoints/last/ (same config required).")
    eval_every: int = help_field(1, "Validate every this many epochs (and after the last).")
    eval_method: str = help_field("score", "Validation of labelled data: score (rank the label texts) or generate "
                                           "(exact match of generated text).", choices=EVAL_METHODS)
    eval_zero_shot: bool = help_field(True, "Also validate the bare base model once, to report beside the adapter.")
    early_stopping_patience: int | None = help_field(
        None, "Stop an adapter after this many validations without improvement (default: off).")
    save_every: int = help_field(0, "Also save the latest state every this many optimizer steps (0: at validations).")
    log_every: int = help_field(10, "Append the training loss to metrics.jsonl every this many optimizer steps.")
    adapters: list[AdapterSpec] = help_field(
        list, "Several adapters in one job: a list of {name, and any of data, method, lr, num_virtual_tokens...}.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "TrainConfig":
        """A config from a mapping (a parsed YAML file); unknown keys and wrong types name ``source``."""
        return _build(cls, values, source=source, text=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what `save_resolved` writes); ``from_dict(to_dict())`` gives an equal config."""
        out = dataclasses.asdict(self)
        out["adapters"] = [{k: v for k, v in a.items() if v is not None} for a in out["adapters"]]
        return out

    @classmethod
    def options(cls) -> list["Option"]:
        """Every field as a command-line option (flag, type, default, help, choices), in order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(Option(f.name, flag(f.name), _type_name(hints[f.name]), default, f.metadata.get("help", ""),
                              tuple(f.metadata.get("choices", ()))))
        return out

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check ranges and combinations; raises `ConfigError` naming the flag. Normalises method names."""
        self.method = _method(self.method, "method")
        _positive_int(self, "num_virtual_tokens", maximum=4096)
        _positive_int(self, "max_length", minimum=2)
        _positive_int(self, "epochs")
        _positive_int(self, "batch_size")
        _positive_int(self, "grad_accum")
        _positive_int(self, "eval_every")
        _positive_int(self, "log_every")
        _positive_int(self, "save_every", minimum=0)
        _positive_int(self, "seed", minimum=0)
        for name in ("max_steps", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if self.kfold is not None:
            _positive_int(self, "kfold", minimum=2)
        _number(self, "lr", above=0.0)
        _number(self, "weight_decay", minimum=0.0)
        _number(self, "warmup_ratio", minimum=0.0, below=1.0)
        _number(self, "val_fraction", minimum=0.0, below=1.0)
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", above=0.0)
        _choice(self, "lr_schedule", SCHEDULES)
        _choice(self, "eval_method", EVAL_METHODS)
        if not isinstance(self.output, str) or not self.output.strip():
            raise ConfigError(f"{flag('output')}: expected a directory path, got {self.output!r}")
        _output_directory(self.output, [self.name] + [a.name for a in self.adapters if isinstance(a.name, str)])
        if self.device is not None and not _valid_device(self.device):
            raise ConfigError(f"{flag('device')}: expected cpu, cuda, cuda:N or mps, got {self.device!r}")
        _adapter_name(self.name, flag("name"))
        names = [a.name for a in self.adapters]
        for i, spec in enumerate(self.adapters):
            _adapter_name(spec.name, f"adapters[{i}].name")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"{flag('adapters')}: the adapter name {duplicate!r} is given twice")
        if self.kfold is not None and self.adapters:
            raise ConfigError(f"{flag('kfold')}: cross-validation trains one adapter per fold; "
                              f"remove {flag('adapters')}")
        if self.kfold is not None and self.validation_data:
            raise ConfigError(f"{flag('kfold')}: the folds are cut from {flag('data')}; "
                              f"remove {flag('validation_data')}")
        if not self.adapters:
            _check_method_options(self, self.method, "")
        self.resolved_adapters()  # validates every adapter's settings
        return self

    def resolved_adapters(self) -> list["ResolvedAdapter"]:
        """The fully resolved settings of every adapter of the job (validated)."""
        specs = self.adapters or [AdapterSpec(name=self.name)]
        return [_resolve(self, spec, f"adapters[{i}] ({spec.name}): " if self.adapters else "")
                for i, spec in enumerate(specs)]


@dataclass(frozen=True)
class Option:
    """One config field as a command-line option."""

    name: str
    flag: str
    type: str  # "int", "float", "bool", "str", "mapping", "list", each possibly "... or null"
    default: Any
    help: str
    choices: tuple[str, ...] = ()


@dataclass
class ResolvedAdapter:
    """Everything one adapter of a job uses, inheritance applied."""

    name: str
    data: str | None
    validation_data: str | None
    text_column: str
    label_column: str | None  # None: language modelling on the whole rendered text
    template: str  # with {column} fields
    verbalizer: dict[str, str] | None
    val_fraction: float
    method: str
    method_options: dict[str, Any]  # num_virtual_tokens and the method's own options, for add_adapter
    lr: float
    weight_decay: float
    seed: int
    data_format: str | None = None
    encoding: str | None = None
    data_split: str = "train"
    init_from: str | None = None  # a saved adapter to start from (replaces the method's init)
    validation_split: str | None = None

    def load_train_rows(self) -> list[dict[str, str]]:
        from softprompt.data import load_rows

        return load_rows(self.data, format=self.data_format, split=self.data_split, encoding=self.encoding)

    def load_validation_rows(self) -> list[dict[str, str]] | None:
        """Rows of --validation-data, or of --validation-split of a hub --data set; None: split --data."""
        from softprompt.data import load_rows

        if self.validation_data:
            return load_rows(self.validation_data, format=self.data_format,
                             split=self.validation_split or "validation", encoding=self.encoding)
        if self.validation_split:
            return load_rows(self.data, format=self.data_format, split=self.validation_split, encoding=self.encoding)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                *, validate: bool = True) -> TrainConfig:
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
    config = _build(TrainConfig, values, source=source, text=False)
    if overrides:
        config = apply_overrides(config, overrides)
    return config.validate() if validate else config


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, unreadable or non-mapping file is a `ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file" if not path.exists() else
                          f"{path}: not a regular file; expected a YAML config file")
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


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any] | Sequence[str],
                    *, source: str = "command line") -> TrainConfig:
    """A copy of ``config`` with overrides applied (see `load_config`); not validated."""
    if not isinstance(overrides, Mapping):
        overrides = parse_override_words(overrides)
    known = {f.name for f in fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for raw_key, value in overrides.items():
        key = _key(raw_key)
        if key not in known:
            raise ConfigError(f"{flag(key)}: unknown option{_did_you_mean(key, known)}")
        if value is None:
            continue
        changes[key] = _coerce(value, hints[key], text=isinstance(value, str), where=flag(key), source=source)
    return dataclasses.replace(config, **changes)


def parse_override_words(words: Sequence[str]) -> dict[str, str | bool]:
    """``["--lr", "0.1", "--bf16", "--no-resume"]`` -> ``{"lr": "0.1", "bf16": True, "resume": False}``."""
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, str | bool] = {}
    words = list(words)
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ConfigError(f"{word!r}: expected an option such as --lr, got a bare value")
        name, eq, inline = word[2:].partition("=")
        key = _key(name)
        if key not in hints and key.startswith("no_") and key[3:] in hints and not eq:
            out[key[3:]] = False
            i += 1
            continue
        if key not in hints:
            raise ConfigError(f"{flag(key)}: unknown option{_did_you_mean(key, hints)}")
        if eq:
            out[key] = inline
            i += 1
        elif _is_bool(hints[key]) and (i + 1 == len(words) or words[i + 1].startswith("--")):
            out[key] = True
            i += 1
        elif i + 1 < len(words):
            out[key] = words[i + 1]
            i += 2
        else:
            raise ConfigError(f"{flag(key)}: expects a value")
    return out


def save_resolved(config: TrainConfig, directory: str | Path) -> Path:
    """Write the resolved ``config.yaml`` into ``directory`` (atomically); returns its path."""
    path = Path(directory) / CONFIG_FILE
    atomic_write_yaml(path, config.to_dict())
    return path


# ----------------------------------------------------------------------------------------- internals


def _build(cls, values: Mapping[str, Any], *, source: str, text: bool):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for raw_key, value in values.items():
        key = str(raw_key)
        if key not in hints:
            alt = _key(key)
            if alt in hints:
                key = alt
            else:
                raise ConfigError(f"{source}: unknown key {raw_key!r}{_did_you_mean(key, known)}; "
                                  f"expected some of: {', '.join(known)}")
        if value is None and not _is_optional(hints[key]):
            continue  # an explicit null keeps the default of a required field
        kwargs[key] = _coerce(value, hints[key], text=text, where=key, source=source)
    return cls(**kwargs)


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _args(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else ()


def _is_optional(hint) -> bool:
    return type(None) in _args(hint)


def _base(hint):
    args = [a for a in _args(hint) if a is not type(None)]
    return args[0] if args else hint


def _is_bool(hint) -> bool:
    return _base(hint) is bool


def _type_name(hint) -> str:
    base = _base(hint)
    origin = typing.get_origin(base)
    name = {int: "int", float: "float", bool: "bool", str: "str"}.get(base) or \
        {dict: "mapping", list: "list"}.get(origin, str(base))
    return f"{name} or null" if _is_optional(hint) else name


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(value, hint, *, text: bool, where: str, source: str):
    """``value`` as the field's type. ``text``: the value came from a command line (parse strings)."""

    def fail(expected: str):
        place = where if source == "command line" else f"{source}: key {where!r}"
        raise ConfigError(f"{place}: expected {expected}, got {value!r}")

    if _is_optional(hint):
        if value is None or (text and isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
    base = _base(hint)
    if base is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail(_EXPECTED[bool])
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        fail(_EXPECTED[int])
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-2 (no dot) as a string: accept it as a number
            try:
                return float(value.strip())
            except ValueError:
                pass
        fail(_EXPECTED[float])
    if base is str:
        if isinstance(value, str):
            return value
        fail(_EXPECTED[str])
    origin = typing.get_origin(base)
    if origin is dict:
        if text and isinstance(value, str):
            value = _parse_mapping_text(value, where)
        if not isinstance(value, Mapping) or not value:
            fail("a mapping of raw labels to label texts, e.g. {'1': 'complaint', '2': 'no complaint'}")
        out = {}
        for k, v in value.items():
            if isinstance(v, (dict, list)) or v is None or isinstance(k, (dict, list)) or k is None:
                fail("a mapping of raw labels to label texts (strings)")
            out[_scalar_text(k)] = _scalar_text(v)
        return out
    if origin is list:
        if text and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                fail("a YAML list of adapters")
        if not isinstance(value, list):
            fail("a list of adapters, each a mapping with a name")
        item_cls = typing.get_args(base)[0]
        place = where if source == "command line" else source
        return [_build(item_cls, item, source=f"{place}: {where}[{i}]", text=False)
                if isinstance(item, Mapping) else fail(f"a list of mappings (item {i} is {item!r})")
                for i, item in enumerate(value)]
    raise TypeError(f"unsupported config type {hint!r}")  # a programming error, not a user one


def _scalar_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_verbalizer(text: str, where: str = "--verbalizer") -> dict[str, str]:
    """A verbalizer given on a command line ('1=complaint,2=no complaint' or a YAML mapping), checked as
    the ``verbalizer`` config field is."""
    return _coerce(text, dict[str, str], text=True, where=where, source="command line")


def _parse_mapping_text(text: str, where: str) -> Mapping | str:
    """``'1=complaint,2=no complaint'`` or a YAML/JSON mapping."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not a valid mapping ({str(exc).splitlines()[0]})") from None
    out = {}
    for part in stripped.split(","):
        raw, eq, label = part.partition("=")
        if not eq or not raw.strip():
            raise ConfigError(f"{where}: expected RAW=TEXT pairs separated by commas, e.g. "
                              f"'1=complaint,2=no complaint', got {text!r}")
        out[raw.strip()] = label.strip()
    return out


def _positive_int(config, name: str, *, minimum: int = 1, maximum: int | None = None, prefix: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}{flag(name)}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"of at least {minimum}"
        raise ConfigError(f"{prefix}{flag(name)}: expected an integer {bound}, got {value}")


def _number(config, name: str, *, minimum: float | None = None, above: float | None = None,
            below: float | None = None, prefix: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{prefix}{flag(name)}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{prefix}{flag(name)}: expected a number of at least {minimum}, got {value}")
    if above is not None and value <= above:
        raise ConfigError(f"{prefix}{flag(name)}: expected a number above {above}, got {value}")
    if below is not None and value >= below:
        raise ConfigError(f"{prefix}{flag(name)}: expected a number below {below}, got {value}")


def _choice(config, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{flag(name)}: expected one of {', '.join(choices)}, got {value!r}")


def _method(value, where: str, prefix: str = "") -> str:
    key = str(value).replace("-", "_").lower() if isinstance(value, str) else value
    if key not in METHODS:
        raise ConfigError(f"{prefix}{flag(where)}: expected one of {', '.join(METHODS)}, got {value!r}")
    return key


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


def _adapter_name(name, where: str) -> None:
    from softprompt.engine.adapter_name import ADAPTER_NAME

    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"{where}: expected 1-64 letters, digits, '_' or '-' (starting with a letter or digit), "
                          f"got {name!r}")


def _check_method_options(source, method: str, prefix: str) -> None:
    """Options set on ``source`` that ``method`` does not take are an error."""
    for option, methods in METHOD_OPTIONS.items():
        if getattr(source, option) is not None and method not in methods:
            raise ConfigError(f"{prefix}{flag(option)}: only applies to {flag('method')} "
                              f"{' or '.join(methods)}, not {method}")


def _check_data_source(view, prefix: str) -> None:
    from softprompt.data import FORMATS, HUB_PREFIX, format_name, is_known_encoding

    if view.data_format is not None:
        name = format_name(view.data_format)
        if name is None:
            raise ConfigError(f"{prefix}{flag('data_format')}: expected one of {', '.join(FORMATS)}, "
                              f"got {view.data_format!r}")
        view.data_format = name
    if view.encoding is not None and not is_known_encoding(view.encoding):
        raise ConfigError(f"{prefix}{flag('encoding')}: {view.encoding!r} is not a known text encoding "
                          f"(e.g. utf-8, latin-1, cp1252)")
    hub = str(view.data).startswith(HUB_PREFIX) or view.data_format == "hf"
    if view.validation_split and not view.validation_data:
        if not hub:
            raise ConfigError(f"{prefix}{flag('validation_split')}: applies to hub data sets (hf:owner/name); "
                              f"for a local file give {flag('validation_data')} or {flag('val_fraction')}")
        if view.validation_split == (view.data_split or "train"):
            raise ConfigError(f"{prefix}{flag('validation_split')}: is the training split "
                              f"({view.validation_split!r}); validation numbers would not be held out")


def _resolve(config: TrainConfig, spec: AdapterSpec, prefix: str) -> ResolvedAdapter:
    def pick(name):
        own = getattr(spec, name)
        return own if own is not None else getattr(config, name)

    method = _method(pick("method"), "method", prefix)
    if spec.method is not None:
        spec.method = method
    _check_method_options(spec, method, prefix)
    resolved_values = {name: pick(name) for name in INHERITED}
    view = types.SimpleNamespace(**resolved_values)
    _positive_int(view, "num_virtual_tokens", maximum=4096, prefix=prefix)
    _number(view, "lr", above=0.0, prefix=prefix)
    _number(view, "weight_decay", minimum=0.0, prefix=prefix)
    _number(view, "val_fraction", minimum=0.0, below=1.0, prefix=prefix)
    _positive_int(view, "seed", minimum=0, prefix=prefix)
    if not view.data:
        raise ConfigError(f"{prefix}{flag('data')}: required (a CSV, TSV, JSONL, parquet or phrasebank file, "
                          f"or hf:owner/name)")
    if view.validation_data and Path(str(view.validation_data)).resolve() == Path(str(view.data)).resolve():
        raise ConfigError(f"{prefix}{flag('validation_data')}: is the same file as {flag('data')}; validation "
                          f"numbers would be training numbers, not held-out ones")
    _check_data_source(view, prefix)
    if view.init_from is not None and (not isinstance(view.init_from, str) or not view.init_from.strip()):
        raise ConfigError(f"{prefix}{flag('init_from')}: expected an adapter directory or hub id, got {view.init_from!r}")
    label_column = view.label_column or None
    if not view.text_column and not view.template:
        raise ConfigError(f"{prefix}{flag('text_column')}: required when no {flag('template')} is given")
    template = view.template if view.template else "{" + view.text_column + "}"
    from softprompt.data import Template

    try:
        Template(template)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{flag('template')}: {exc}") from None
    if view.verbalizer is not None and label_column is None:
        raise ConfigError(f"{prefix}{flag('verbalizer')}: needs {flag('label_column')} (the column it maps)")
    options: dict[str, Any] = {"num_virtual_tokens": view.num_virtual_tokens}
    for option, methods in METHOD_OPTIONS.items():
        if method in methods and resolved_values[option] is not None:
            options[option] = resolved_values[option]
    # Let the method check its own options; its messages name the field, we name the flag.
    try:
        METHODS[method].config_class.from_dict(dict(options), source="")
    except ConfigError as exc:
        message = str(exc).removeprefix(": ")
        field, sep, rest = message.partition(":")
        raise ConfigError(f"{prefix}{flag(field)}:{rest}" if sep and field.isidentifier() else f"{prefix}{message}") \
            from None
    return ResolvedAdapter(
        name=spec.name, data=str(view.data), validation_data=view.validation_data, text_column=view.text_column,
        label_column=label_column, template=template, verbalizer=view.verbalizer, val_fraction=float(view.val_fraction),
        method=method, method_options=options, lr=float(view.lr), weight_decay=float(view.weight_decay),
        seed=int(view.seed), data_format=view.data_format, encoding=view.encoding,
        data_split=view.data_split or "train", validation_split=view.validation_split, init_from=view.init_from,
    )


__all__ = [
    "CONFIG_FILE", "SCHEDULES", "EVAL_METHODS", "TrainConfig", "AdapterSpec", "ResolvedAdapter", "Option",
    "load_config", "read_yaml", "apply_overrides", "parse_override_words", "save_resolved", "flag",
]
