"""The search space of ``softprompt sweep``: a base recipe, the choices to try, and how the sweep runs.

A sweep file is a training recipe (every key ``softprompt train`` takes, or ``recipe: PATH`` to start
from one) plus two sections::

    recipe: recipes/offline/raft_twitter_complaints.yaml
    epochs: 5
    space:                       # each key: a list of choices (a grid over all keys)
      lr: [1.0e-2, 3.0e-2]
      num_virtual_tokens: [8, 20]
      prompt:                    # a key that is no option: a list of bundles, each set together
        - {template: "Tweet: {Tweet text}\\nSentiment:", verbalizer: {1: " negative", 2: " positive"}}
        - {template: "Tweet text : {Tweet text} Label : ", verbalizer: {1: complaint, 2: no complaint}}
    sweep: {outer_folds: 5, inner_folds: 3, ensemble: 3, samples: 6, seed: 0}

Per-adapter settings (template, label words, method, its options, init_from, lr, ...) vary between the
adapters of ONE multi-adapter job; job-wide settings (base model, epochs, batch size, ...) make one job
per combination. Every bad entry is reported at once, one line each (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from softprompt.data import HUB_PREFIX
from softprompt.errors import ConfigError
from softprompt.methods import METHOD_OPTIONS
from softprompt.options import check_choice, check_int, check_number, coerce, did_you_mean, option
from softprompt.training.adapter_config import AdapterSettings, AdapterSpec
from softprompt.training.config import TrainConfig, read_yaml

METRICS = ("macro_f1", "accuracy")
SELECTIONS = ("nested", "validation")
# Data settings are the sweep's, never a choice: every setting must see the same rows.
_FIXED = {"data", "validation_data", "data_format", "encoding", "data_split", "validation_split", "text_column"}
_FIXED |= {"label_column", "max_rows", "val_fraction", "method_options"}
#: Space keys each adapter of a multi-adapter job may set for itself.
ADAPTER_KEYS = tuple(f.name for f in fields(AdapterSettings) if f.name not in _FIXED)
#: Space keys that are job-wide: settings differing in them train in separate jobs.
JOB_KEYS = tuple(
    f.name
    for f in fields(TrainConfig)
    if f.name not in {*(g.name for g in fields(AdapterSettings)), "name", "kfold", "output", "resume", "adapters"}
    and f.name not in {"device", "log_every", "save_every", "eval_zero_shot"}
)
SPACE_KEYS = (*ADAPTER_KEYS, *METHOD_OPTIONS, *JOB_KEYS)


@dataclass
class SweepSettings:
    """The ``sweep:`` section: how settings are sampled, selected and estimated."""

    samples: int | None = option(None, "Try this many settings drawn (seeded) from the grid (default: all of it).")
    seed: int = option(0, "Seed of the sampling, the folds and the bootstrap.")
    outer_folds: int = option(5, "Outer folds: each estimates the choice its inner folds made (>= 2).")
    inner_folds: int = option(3, "Inner folds: the settings are scored on these to choose (>= 2).")
    ensemble: int = option(
        0,
        "Also try the average of the top k settings as one candidate (0: off); they may differ in base model, "
        "template and label words.",
    )
    metric: str = option("macro_f1", "What chooses: macro_f1 or accuracy.", choices=METRICS)
    selection: str | None = option(
        None,
        "nested (cross-validation on the labelled rows) or validation (choose on the recipe's validation rows: "
        "validation_data, validation_split or a val_fraction split); default: validation when the recipe has "
        "validation data, else nested.",
        choices=SELECTIONS,
    )
    test_data: str | None = option(
        None, "Labelled test data (a file, or hf:owner/name with test_split), scored once, for the final choice alone."
    )
    test_split: str | None = option(
        None,
        "Split of a hub data set to test on, e.g. test: of test_data when it names one, else of the recipe's hub "
        "data; never its training or validation split (a hub test_data without it reads its train split).",
    )
    test_fraction: float | None = option(
        None,
        "For data without a test file: hold out this seeded (sweep.seed), label-stratified fraction of the rows "
        "before anything else sees them (max_rows samples the rest); scored once, for the final choice alone.",
    )
    bootstrap: int = option(1000, "Bootstrap resamples of the pooled outer predictions (the interval).")
    compare: str | None = option(
        None,
        "A space key (method, say): with nested selection, also a nested estimate for each of its values, the "
        "inner folds choosing among that value's settings only.",
    )


@dataclass
class Sweep:
    """A parsed sweep file: the base config, the settings to try (each a mapping of space keys to values)."""

    base: TrainConfig
    base_values: dict[str, Any]  # the recipe's keys as written (the chosen recipe starts from them)
    settings: list[dict[str, Any]]
    options: SweepSettings
    source: str

    def value_of(self, index: int, key: str) -> Any:
        """Setting ``index``'s value of space key ``key`` (the recipe's where the setting leaves it)."""
        setting = self.settings[index]
        if key in setting:
            return setting[key]
        return self.base.method_options.get(key) if key in METHOD_OPTIONS else getattr(self.base, key, None)

    @property
    def selection_on_validation(self) -> bool:
        if self.options.selection is not None:
            return self.options.selection == "validation"
        return bool(self.base.validation_data or self.base.validation_split)


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Sweep:
    """Read a sweep file (see the module docstring); ``overrides`` replace recipe keys (e.g. ``output``)."""
    source = str(path)
    values = read_yaml(path)
    return parse_sweep(values, source=source, overrides=overrides)


def parse_sweep(
    values: Mapping[str, Any], *, source: str = "sweep", overrides: Mapping[str, Any] | None = None
) -> Sweep:
    values = dict(values)
    space = values.pop("space", None)
    settings_values = values.pop("sweep", None) or {}
    recipe = values.pop("recipe", None)
    base_values = {**(read_yaml(recipe) if recipe else {}), **values, **(overrides or {})}
    base = TrainConfig.from_dict(base_values, source=source).validate()
    if base.kfold is not None or base.adapters:
        raise ConfigError(f"{source}: a sweep's recipe trains one adapter; remove 'kfold' and 'adapters'")
    if base.label_column is None:
        raise ConfigError(f"{source}: key 'label_column': required; a sweep chooses among classifiers")
    options = _sweep_settings(settings_values, source)
    _check_test_split(options, base, source)
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{source}: key 'space': expected a mapping of option -> list of choices, got {space!r}")
    errors: list[str] = []
    axes = [_axis(base_values, str(key), choices, source, errors) for key, choices in space.items()]
    if errors:
        raise ConfigError("\n".join(errors))
    grid = [_merge(combo) for combo in itertools.product(*axes)]
    if options.samples is not None and options.samples < len(grid):
        picked = sorted(random.Random(options.seed).sample(range(len(grid)), options.samples))
        grid = [grid[i] for i in picked]
    for i, setting in enumerate(grid):  # combinations a single entry cannot show (an option of another method)
        try:
            job_config(base, [(f"s{i}", setting)])
        except ConfigError as exc:
            errors.append(f"{source}: space: setting {describe(setting)}: {exc}")
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    if options.compare is not None and not any(options.compare in setting for setting in grid):
        raise ConfigError(f"{source}: sweep.compare: {options.compare!r} is not varied by the space (nor its bundles)")
    sweep = Sweep(base, base_values, grid, options, source)
    if sweep.selection_on_validation and not (base.validation_data or base.validation_split):
        if any("seed" in setting for setting in grid):  # the val_fraction split follows each adapter's seed
            raise ConfigError(
                f"{source}: space.seed: with selection on a val_fraction split every setting needs the same rows; fix 'seed' or give validation_data"
            )
        if base.val_fraction <= 0:
            raise ConfigError(f"{source}: sweep.selection: validation needs validation_data or a val_fraction above 0")
    return sweep


def _sweep_settings(values: Any, source: str) -> SweepSettings:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: key 'sweep': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(SweepSettings)
    known = [f.name for f in fields(SweepSettings)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{source}: sweep: unknown key {key!r}{did_you_mean(str(key), known)}; expected some of: {', '.join(known)}"
            )
        kwargs[key] = coerce(value, hints[key], text=False, where=f"{source}: sweep.{key}")
    out = SweepSettings(**kwargs)
    for name, low in (("outer_folds", 2), ("inner_folds", 2), ("ensemble", 0), ("seed", 0), ("bootstrap", 0)):
        check_int(getattr(out, name), f"{source}: sweep.{name}", minimum=low)
    if out.samples is not None:
        check_int(out.samples, f"{source}: sweep.samples", minimum=1)
    check_choice(out.metric, f"{source}: sweep.metric", METRICS)
    if out.test_fraction is not None:
        check_number(out.test_fraction, f"{source}: sweep.test_fraction", above=0.0, below=1.0)
        if out.test_data:
            raise ConfigError(f"{source}: sweep.test_fraction: give it or sweep.test_data, not both")
    if out.selection is not None:
        check_choice(out.selection, f"{source}: sweep.selection", SELECTIONS)
    if out.compare is not None and out.compare not in SPACE_KEYS:
        raise ConfigError(
            f"{source}: sweep.compare: {out.compare!r} is not an option a sweep can vary"
            f"{did_you_mean(out.compare, SPACE_KEYS)}"
        )
    return out


def _check_test_split(opts: SweepSettings, base: TrainConfig, source: str) -> None:
    """The test rows of a hub data set must be a split of their own: not the rows that train or choose."""
    where = f"{source}: sweep.test_split"
    data = opts.test_data or base.data
    hub = str(data).startswith(HUB_PREFIX) or base.data_format == "hf"
    if opts.test_split is None:
        # load_rows reads a hub set's train split: the recipe's own data there would be its training rows
        if opts.test_data and hub and data == base.data and (base.data_split or "train") == "train":
            raise ConfigError(
                f"{source}: sweep.test_data: is the recipe's hub data, read at its training split; give sweep.test_split"
            )
        return
    if not opts.test_split.strip():
        raise ConfigError(f"{where}: expected a split name (e.g. test), got {opts.test_split!r}")
    if opts.test_fraction is not None:
        raise ConfigError(f"{where}: give it or sweep.test_fraction, not both")
    if not hub:
        named = "sweep.test_data" if opts.test_data else "the recipe's data"
        raise ConfigError(
            f"{where}: applies to hub data sets (hf:owner/name), not {named} {data!r}; "
            "for local files give sweep.test_data or sweep.test_fraction"
        )
    if data == base.data and opts.test_split == (base.data_split or "train"):
        raise ConfigError(f"{where}: is the training split ({opts.test_split!r}); test numbers would not be held out")
    validation = base.validation_data or (base.data if base.validation_split else None)
    if data == validation and opts.test_split == (base.validation_split or "validation"):
        raise ConfigError(
            f"{where}: is the validation split ({opts.test_split!r}); test rows must be held out of the choice"
        )


def _axis(base: dict, key: str, choices: Any, source: str, errors: list[str]) -> list[dict[str, Any]]:
    """One space entry as a list of partial settings; problems are appended to ``errors``."""
    where = f"{source}: space.{key}"
    if not isinstance(choices, list) or not choices:
        errors.append(f"{where}: expected a non-empty list of choices, got {choices!r}")
        return []
    if key not in SPACE_KEYS:
        if all(isinstance(c, Mapping) for c in choices):  # a bundle: several keys chosen together
            return [_choice(base, dict(c), f"{where}[{i}]", errors) for i, c in enumerate(choices)]
        hint = did_you_mean(key, SPACE_KEYS)
        errors.append(
            f"{where}: not an option a sweep can vary{hint}; expected one of {', '.join(SPACE_KEYS)}, "
            f"or a list of mappings (options chosen together)"
        )
        return []
    return [_choice(base, {key: c}, f"{where}[{i}]", errors) for i, c in enumerate(choices)]


def _choice(base: dict, values: dict[str, Any], where: str, errors: list[str]) -> dict[str, Any]:
    """``values`` coerced to their options' types, checked as a recipe with them would be."""
    for key in values:
        if key not in SPACE_KEYS:
            errors.append(f"{where}: {key!r} is not an option a sweep can vary{did_you_mean(str(key), SPACE_KEYS)}")
            return {}
    try:
        config = TrainConfig.from_dict({**for_method(base, values.get("method")), **values}, source=where).validate()
    except ConfigError as exc:
        errors.append(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc))
        return {}
    return {k: config.method_options[k] if k in METHOD_OPTIONS else getattr(config, k) for k in values}


def for_method(values: Mapping[str, Any], method: str | None) -> dict[str, Any]:
    """A recipe's ``values`` without the method options that do not apply to ``method`` (None: all kept): a
    setting that changes the method drops them, as an adapter of a multi-adapter job does (the recipe's
    ``init_text`` means nothing to CPT)."""
    if method is None:
        return dict(values)
    return {k: v for k, v in values.items() if k not in METHOD_OPTIONS or method in METHOD_OPTIONS[k]}


def _merge(parts: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        out.update(part)
    return out


def describe(setting: Mapping[str, Any]) -> str:
    """``lr=0.01, template='Tweet: {x}'`` (a setting as people read it)."""
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in setting.items()) or "(the recipe)"


def job_key(setting: Mapping[str, Any]) -> tuple:
    """Settings with equal job keys train as adapters of one job."""
    return tuple(sorted((k, repr(v)) for k, v in setting.items() if k in JOB_KEYS))


def job_config(base: TrainConfig, adapters: list[tuple[str, dict[str, Any]]], output: str | None = None) -> TrainConfig:
    """The multi-adapter job training ``adapters`` (name, setting), all of one job key, on ``base``."""
    # An adapter's None inherits the job's value, so a setting's null (init_from: null against a recipe's
    # init_from) is set on the job, and every adapter that does not set that key gets the recipe's value.
    nulls = {k for _, s in adapters for k, v in s.items() if k in ADAPTER_KEYS and v is None}
    job_values: dict[str, Any] = {k: v for k, v in adapters[0][1].items() if k in JOB_KEYS} | dict.fromkeys(nulls)
    specs = []
    for name, setting in adapters:
        options = {k: v for k, v in setting.items() if k in METHOD_OPTIONS}
        own = {k: getattr(base, k) for k in nulls if k not in setting}
        own |= {k: v for k, v in setting.items() if k in ADAPTER_KEYS and v is not None}
        specs.append(AdapterSpec(name=name, **own, method_options=options or None))
    config = dataclasses.replace(
        base, **job_values, adapters=specs, resume=False, output=output or base.output, eval_zero_shot=False
    )
    return config.validate()


def job_groups(members: list[dict[str, Any]]) -> list[list[int]]:
    """The indices of ``members`` grouped by job key (one multi-adapter job each), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for n, member in enumerate(members):
        groups.setdefault(job_key(member), []).append(n)
    return list(groups.values())


def recipe_values(sweep: Sweep, members: list[dict[str, Any]], output: str) -> dict[str, Any]:
    """The chosen settings as a recipe ``softprompt train`` loads: one adapter, or the ensemble's members as the
    adapters of one job. Members that cannot share a job (another base model, say) give ``members:``, each
    member's own recipe (adapter ``member<n>`` in ``<output>/job<g>``, where the sweep trains it)."""
    values = {**sweep.base_values, "output": output}
    if len(members) == 1:
        return {**for_method(values, members[0].get("method")), **members[0]}
    groups = job_groups(members)
    if len(groups) > 1:
        job_of = {n: g for g, group in enumerate(groups) for n in group}
        return {
            "members": [
                {**recipe_values(sweep, [m], f"{output}/job{job_of[n]}"), "name": f"member{n}"}
                for n, m in enumerate(members)
            ]
        }
    values.update({k: v for k, v in members[0].items() if k in JOB_KEYS})
    values["adapters"] = [
        {"name": f"member{i}", **{k: v for k, v in m.items() if k not in JOB_KEYS}} for i, m in enumerate(members)
    ]
    return values


__all__ = [
    "ADAPTER_KEYS",
    "JOB_KEYS",
    "METRICS",
    "SELECTIONS",
    "SPACE_KEYS",
    "Sweep",
    "SweepSettings",
    "describe",
    "job_config",
    "job_groups",
    "job_key",
    "load_sweep",
    "parse_sweep",
    "recipe_values",
]
