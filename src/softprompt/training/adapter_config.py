"""What one adapter of a training job is configured with, and how its settings are resolved.

`AdapterSettings` holds every setting an adapter may have of its own (data, template, method, the
method's options, lr, ...); `TrainConfig` (`softprompt.training.config`) extends it with the job-wide
fields, so its values are what adapters inherit. `AdapterSpec` (derived: the same fields, each None
unless set) is one entry of a job's ``adapters`` list, and `resolve_adapter` gives the
`ResolvedAdapter` the training loop uses, inheritance applied and every value checked.

The method's own options are not declared here: they are the fields of the method config classes
(`softprompt.methods`), kept in ``method_options`` and checked by those classes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from softprompt.data import (
    FORMATS,
    HUB_PREFIX,
    Template,
    default_template,
    format_name,
    is_known_encoding,
    load_rows,
    sample_rows,
)
from softprompt.errors import ConfigError
from softprompt.methods import METHOD_OPTIONS, METHODS, MethodConfig, normalize_method, suggest_method
from softprompt.options import (
    Option,
    OptionError,
    check_int,
    check_number,
    default_of,
    did_you_mean,
    flag,
    option,
    type_name,
)


def _method_option_fields() -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """Each method option -> ``(method, field, type)`` of every method config that declares it."""
    out: dict[str, list] = {}
    for method, cls in METHODS.items():
        hints = typing.get_type_hints(cls.config_class)
        for f in fields(cls.config_class):
            out.setdefault(f.name, []).append((method, f, hints[f.name]))
    return out


_METHOD_OPTION_FIELDS = _method_option_fields()
#: The type of each method option as the training config reads it: None always means "the method's default".
METHOD_OPTION_TYPES = {name: declared[0][2] | None for name, declared in _METHOD_OPTION_FIELDS.items()}
_VIRTUAL_TOKENS_DEFAULT = default_of(MethodConfig.__dataclass_fields__["num_virtual_tokens"])


@dataclass
class AdapterSettings:
    """What each adapter of a job may set for itself; the job's top level gives the values it inherits."""

    method: str = option("prompt_tuning", f"Soft-prompt method: {', '.join(METHODS)} (dashes work too: prompt-tuning).")
    method_options: dict[str, Any] = option(
        dict,
        "The method's own options, e.g. {num_virtual_tokens: 20, prefix_projection: true}; each is also "
        "a key and flag of its own (listed below), which is how recipes and command lines give them.",
    )
    init_from: str | None = option(
        None,
        "Start from a saved adapter (a directory in PEFT's layout, or a hub id) instead of --init: "
        "continue training on new data, or transfer a prompt from a related task. Its method and number "
        "of virtual tokens must be this job's; one saved by softprompt also brings back its "
        "reparameterisation (MLP/LSTM), a plain PEFT table trains as a table.",
    )
    data: str | None = option(
        None, "Training data: CSV, TSV, JSONL, parquet or phrasebank .txt file, or hf:owner/name."
    )
    validation_data: str | None = option(None, "Validation data file (default: --val-fraction of --data is held out).")
    data_format: str | None = option(
        None,
        "Format of --data/--validation-data when the extension does not tell: csv, tsv, jsonl, parquet, "
        "phrasebank (sentence@label lines) or hf (a hub data set).",
    )
    encoding: str | None = option(
        None, "Text encoding of the data files (default UTF-8; phrasebank files fall back to latin-1)."
    )
    data_split: str = option("train", "Split of a hub --data set to train on.")
    validation_split: str | None = option(
        None,
        "Split of a hub data set to validate on, e.g. validation: of --validation-data when it is a hub "
        "name, else of --data (instead of holding out --val-fraction).",
    )
    text_column: str | None = option(
        None,
        "Column holding the input text, read through the default template '{<text column>}' (default 'text'); "
        "with --template the template names its columns, and a column given here must still exist.",
    )
    label_column: str | None = option(
        None,
        "Column holding the label; without one (or with an empty one) the job is language modelling on the whole text.",
    )
    task_column: str | None = option(
        None,
        "Column holding each row's task id (0 to num_tasks - 1) for a method with tasks (multitask_prompt_tuning); "
        "required by such methods, refused by others.",
    )
    template: str | None = option(
        None, "Prompt template with {column} fields, e.g. 'Tweet: {text} Sentiment: ' (default '{<text column>}')."
    )
    verbalizer: dict[str, str] | None = option(
        None,
        "Raw label -> label text the model learns and scores, e.g. '1=complaint,2=no complaint' "
        "(default: the raw labels themselves).",
    )
    val_fraction: float = option(
        0.1, "Fraction of --data held out for validation when no --validation-data is given (0: none)."
    )
    max_rows: int | None = option(
        None,
        "Use at most N rows of --data (before validation rows are held out), drawn with --seed and stratified "
        "by label, so a file sorted by label still gives every label (default: all rows).",
    )
    context: str | None = option(
        None,
        "Document the adapter stands for (--objective distill): a UTF-8 text file the teacher (the frozen model) "
        "reads whole; without --data, self-study writes the training questions about it.",
    )
    synthetic_queries: int = option(
        64, "Self-study (--context without --data): questions the frozen model writes about chunks of --context."
    )
    chunk_tokens: int = option(512, "Self-study: tokens of --context shown per question-writing prompt.")
    lr: float = option(3e-2, "Peak learning rate (AdamW; each adapter is its own optimizer param group).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    seed: int = option(0, "Seed of the initialisation and the split (the top-level one also orders the data).")


def _spec_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(AdapterSettings)
    own = [(f.name, hints[f.name] | None, field(default=None, metadata=f.metadata)) for f in fields(AdapterSettings)]
    return [
        ("name", str, option("", "Adapter name (letters, digits, '_' or '-'); also its output sub-directory.")),
        *own,
    ]


if typing.TYPE_CHECKING:

    class AdapterSpec:
        """What a type checker sees of the dataclass derived below: the fields read by name."""

        __dataclass_fields__: typing.ClassVar[dict[str, dataclasses.Field[Any]]]
        name: str
        method: str | None
        method_options: dict[str, Any] | None

        def __init__(self, **values: Any) -> None: ...

else:
    #: One adapter of a multi-adapter job: a ``name`` and every `AdapterSettings` field, each None (unset:
    #: inherit the top-level value) unless the adapter sets it. Derived, so a new setting is declared once.
    AdapterSpec = dataclasses.make_dataclass("AdapterSpec", _spec_fields())
    AdapterSpec.__module__ = __name__
    AdapterSpec.__doc__ = "One adapter of a multi-adapter job. Unset (None) fields inherit the top-level value."


@dataclass
class ResolvedAdapter(AdapterSettings):
    """Everything one adapter of a job uses, inheritance applied: ``label_column`` None is language
    modelling, ``template`` is always set, ``method_options`` holds num_virtual_tokens and the method's
    own options as `SoftPromptModel.add_adapter` takes them."""

    name: str = ""
    # always set once resolved (the defaults only keep the dataclass's field order valid)
    data: str = ""
    template: str = ""

    def load_train_rows(self) -> list[dict[str, str]]:
        """Rows of --data (a seeded, label-stratified sample of --max-rows of them when given)."""
        rows = load_rows(self.data, format=self.data_format, split=self.data_split, encoding=self.encoding)
        if self.max_rows is None:
            return rows
        return sample_rows(rows, self.max_rows, self.seed, self.label_column, source=str(self.data))

    def load_validation_rows(self) -> list[dict[str, str]] | None:
        """Rows of --validation-data, or of --validation-split of a hub --data set; None: split --data."""
        if self.validation_data:
            return load_rows(
                self.validation_data,
                format=self.data_format,
                split=self.validation_split or "validation",
                encoding=self.encoding,
            )
        if self.validation_split:
            return load_rows(self.data, format=self.data_format, split=self.validation_split, encoding=self.encoding)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def method_option_listing() -> list[Option]:
    """One `Option` per method option (a field of some method config class), its help naming the methods
    that take it when not all do; ``softprompt train --help`` lists these beside the config's fields."""
    return [_method_option(name) for name in _METHOD_OPTION_FIELDS]


def _method_option(name: str) -> Option:
    declared = _METHOD_OPTION_FIELDS[name]
    helps = list(dict.fromkeys(f.metadata.get("help", "") for _, f, _ in declared))
    if len(declared) == len(METHODS) and len(helps) == 1:
        text = helps[0]
    elif len(helps) == 1:
        text = f"{' / '.join(m for m, _, _ in declared)}: {helps[0]}"
    else:
        text = " ".join(f"{m}: {f.metadata.get('help', '')}" for m, f, _ in declared)
    defaults = list(dict.fromkeys(default_of(f) for _, f, _ in declared))
    return Option(
        name,
        flag(name),
        type_name(declared[0][2]),
        defaults[0] if len(defaults) == 1 else None,
        text,
        tuple(declared[0][1].metadata.get("choices", ())),
    )


def method_name(value: Any, where: str) -> str:
    """The registry key of a method name (``prompt-tuning`` -> ``prompt_tuning``); errors name ``where``."""
    key = normalize_method(value)
    if key not in METHODS:
        raise OptionError(where, f"expected one of {', '.join(METHODS)}, got {value!r}{suggest_method(value)}")
    return key


def check_adapter_numbers(view: Any, prefix: str) -> None:
    """Check the numbers every adapter has (lr, weight_decay, val_fraction, seed, max_rows) on ``view``, an adapter's
    settings or the top level's (which adapters inherit); errors start with ``prefix``."""
    check_number(view.lr, prefix + flag("lr"), above=0.0)
    check_number(view.weight_decay, prefix + flag("weight_decay"), minimum=0.0)
    check_number(view.val_fraction, prefix + flag("val_fraction"), minimum=0.0, below=1.0)
    check_int(view.seed, prefix + flag("seed"), minimum=0)
    if view.max_rows is not None:
        check_int(view.max_rows, prefix + flag("max_rows"), minimum=1)


def _check_data_source(view: Any, prefix: str) -> None:
    if view.data_format is not None:
        name = format_name(view.data_format)
        if name is None:
            raise ConfigError(
                f"{prefix}{flag('data_format')}: expected one of {', '.join(FORMATS)}, got {view.data_format!r}"
            )
        view.data_format = name
    if view.encoding is not None and not is_known_encoding(view.encoding):
        raise ConfigError(
            f"{prefix}{flag('encoding')}: {view.encoding!r} is not a known text encoding (e.g. utf-8, latin-1, cp1252)"
        )
    hub = str(view.data).startswith(HUB_PREFIX) or view.data_format == "hf"
    if view.validation_split and not view.validation_data:
        if not hub:
            raise ConfigError(
                f"{prefix}{flag('validation_split')}: applies to hub data sets (hf:owner/name); "
                f"for a local file give {flag('validation_data')} or {flag('val_fraction')}"
            )
        if view.validation_split == (view.data_split or "train"):
            raise ConfigError(
                f"{prefix}{flag('validation_split')}: is the training split "
                f"({view.validation_split!r}); validation numbers would not be held out"
            )


def _one_of(names: tuple[str, ...]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _resolved_method_options(
    top: AdapterSettings, spec: AdapterSpec, method: str, prefix: str, several: bool
) -> dict[str, Any]:
    """The adapter's own options (which must apply to its method) over the inherited ones that apply;
    checked by the method's config class, the one place that knows their ranges."""
    own, inherited = spec.method_options or {}, top.method_options
    if not several:  # a single adapter: the top-level options are its own
        own, inherited = inherited, {}
    for option_name in own:
        methods = METHOD_OPTIONS.get(option_name)
        if methods is None:
            raise OptionError(
                prefix + flag(option_name), f"unknown method option{did_you_mean(option_name, METHOD_OPTIONS)}"
            )
        if method not in methods:
            raise OptionError(
                prefix + flag(option_name), f"only applies to {flag('method')} {_one_of(methods)}, not {method}"
            )
    options = {
        "num_virtual_tokens": _VIRTUAL_TOKENS_DEFAULT,
        **{k: v for k, v in inherited.items() if method in METHOD_OPTIONS.get(k, ())},
        **own,
    }
    try:
        METHODS[method].config_class.from_dict(dict(options), source=prefix)
    except OptionError as exc:
        raise exc.renamed(prefix + flag(exc.where)) from None
    return options


def _check_task_column(view: Any, prefix: str) -> None:
    """A method with tasks reads each row's task from a column; other methods have no use for one."""
    view.task_column = view.task_column or None
    has_tasks = METHODS[view.method].has_tasks
    if has_tasks and view.task_column is None:
        raise ConfigError(
            f"{prefix}{flag('task_column')}: required by {view.method} (the column of each row's task id)"
        )
    if not has_tasks and view.task_column is not None:
        raise ConfigError(f"{prefix}{flag('task_column')}: only applies to a method with tasks, not {view.method}")


def resolve_adapter(
    top: AdapterSettings, spec: AdapterSpec, prefix: str = "", *, several: bool = False
) -> ResolvedAdapter:
    """The settings of adapter ``spec`` (an `AdapterSpec`) with what it leaves unset taken from ``top`` (the
    job's `TrainConfig`), every value checked; errors start with ``prefix``. ``several``: the job lists
    adapters, so top-level method options that do not apply to this adapter's method are not inherited
    (for a single adapter they are its own, and must apply)."""
    view = types.SimpleNamespace(
        **{
            f.name: getattr(top, f.name) if getattr(spec, f.name) is None else getattr(spec, f.name)
            for f in fields(AdapterSettings)
        }
    )
    view.method = method_name(view.method, prefix + flag("method"))
    if spec.method is not None:
        spec.method = view.method
    view.method_options = _resolved_method_options(top, spec, view.method, prefix, several)
    check_adapter_numbers(view, prefix)
    check_int(view.synthetic_queries, prefix + flag("synthetic_queries"), minimum=2)
    check_int(view.chunk_tokens, prefix + flag("chunk_tokens"), minimum=16)
    if not view.data and not view.context:
        raise ConfigError(
            f"{prefix}{flag('data')}: required (a CSV, TSV, JSONL, parquet or phrasebank file, or hf:owner/name; "
            f"or {flag('context')} FILE with --objective distill, which writes its own questions)"
        )
    if view.validation_data and Path(str(view.validation_data)).resolve() == Path(str(view.data)).resolve():
        raise ConfigError(
            f"{prefix}{flag('validation_data')}: is the same file as {flag('data')}; validation "
            f"numbers would be training numbers, not held-out ones"
        )
    _check_data_source(view, prefix)
    if view.init_from is not None and (not isinstance(view.init_from, str) or not view.init_from.strip()):
        raise ConfigError(
            f"{prefix}{flag('init_from')}: expected an adapter directory or hub id, got {view.init_from!r}"
        )
    view.label_column = view.label_column or None
    _check_task_column(view, prefix)
    if view.text_column == "" and not view.template:
        raise ConfigError(f"{prefix}{flag('text_column')}: required when no {flag('template')} is given")
    if not view.template:
        view.text_column = view.text_column or "text"
        view.template = default_template(view.text_column)
    try:
        Template(view.template)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{flag('template')}: {exc}") from None
    if view.verbalizer is not None and view.label_column is None:
        raise ConfigError(f"{prefix}{flag('verbalizer')}: needs {flag('label_column')} (the column it maps)")
    return ResolvedAdapter(
        **{
            **vars(view),
            "data": str(view.data or ""),
            "val_fraction": float(view.val_fraction),
            "lr": float(view.lr),
            "weight_decay": float(view.weight_decay),
            "seed": int(view.seed),
            "data_split": view.data_split or "train",
        },
        name=spec.name,
    )


__all__ = [
    "METHOD_OPTION_TYPES",
    "AdapterSettings",
    "AdapterSpec",
    "ResolvedAdapter",
    "check_adapter_numbers",
    "method_name",
    "method_option_listing",
    "resolve_adapter",
]
