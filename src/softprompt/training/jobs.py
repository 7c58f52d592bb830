"""The adapters of a training job, each with its rendered training and held-out validation examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from softprompt.adapters.peft_format import load_adapter
from softprompt.data import (
    Example,
    Template,
    Verbalizer,
    build_examples,
    column_names,
    train_val_split,
    verbalizer_for,
    with_tasks,
)
from softprompt.data.heldout import fingerprint, read_train_fingerprints
from softprompt.errors import ConfigError, DataError, SoftPromptError
from softprompt.methods import METHODS, method_class
from softprompt.options import did_you_mean, flag
from softprompt.training.config import ResolvedAdapter


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

    def train_fingerprints(self) -> set[int]:
        """The fingerprints of every text this adapter learnt (saved with it, so evaluation stays held-out)."""
        return {fingerprint(e.text) for e in self.train} | self.inherited_fingerprints


def prepare_job(
    spec: ResolvedAdapter,
    *,
    rows: list[dict] | None = None,
    val_rows: list[dict] | None = None,
    verbalizer: Verbalizer | None = None,
    source: str | None = None,
) -> AdapterJob:
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
    _check_text_column(spec, rows, str(source))
    split_here = val_rows is None  # validation rows are cut from `rows` (or there are none)
    if val_rows is None:
        val_rows = (
            train_val_split(rows, spec.val_fraction, spec.seed, spec.label_column, source=source)[1]
            if spec.val_fraction > 0
            else []
        )
    else:
        val_rows = list(val_rows)
    if spec.label_column is not None and verbalizer is None:
        verbalizer = verbalizer_for(
            spec.verbalizer, rows + ([] if split_here else val_rows), spec.label_column, source=source
        )
    # Render all rows of a file at once, so that error messages count rows as the file does.
    rendered = _with_tasks(
        spec, build_examples(rows, spec.template, spec.label_column, verbalizer, source=source), source
    )
    if split_here:
        in_val = {id(r) for r in val_rows}
        train = [e for e in rendered if id(e.row) not in in_val]
        val = [e for e in rendered if id(e.row) in in_val]
    else:
        train = rendered
        val_source = spec.validation_data or f"{source} (validation rows)"
        val = (
            _with_tasks(
                spec,
                build_examples(val_rows, spec.template, spec.label_column, verbalizer, source=val_source),
                val_source,
            )
            if val_rows
            else []
        )
    if not train:
        raise DataError(f"{source}: no training rows are left after holding out validation rows")
    # Held-out means held-out: a validation text that is also a training text is dropped, including
    # the texts the ``init_from`` adapter was trained on.
    start = Path(spec.init_from).expanduser() if spec.init_from else None  # as load_adapter resolves it
    inherited = frozenset(read_train_fingerprints(start)) if start is not None and start.is_dir() else frozenset()
    seen = {fingerprint(e.text) for e in train} | inherited
    kept = [e for e in val if fingerprint(e.text) not in seen]
    if val and not kept:
        raise DataError(
            f"{spec.validation_data or source}: every validation row also occurs in the training rows; "
            f"there is nothing held-out to validate on"
        )
    return AdapterJob(
        spec, train, kept, verbalizer.texts if verbalizer is not None else None, len(val) - len(kept), inherited
    )


def _check_text_column(spec: ResolvedAdapter, rows: list[dict], source: str) -> None:
    """A --text-column the template does not read is still a promise about the file: fail when it is wrong
    rather than train on other columns without a word (the template's own columns are checked as it renders)."""
    column = spec.text_column
    if not column or column in Template(spec.template).fields or not rows or column in rows[0]:
        return
    available = column_names(rows)
    raise ConfigError(
        f"{flag('text_column')}: {source} has no column {column!r}{did_you_mean(column, available)}; "
        f"its columns are {', '.join(map(repr, available))}"
    )


def _with_tasks(spec: ResolvedAdapter, examples: list[Example], source: str) -> list[Example]:
    """The examples with their rows' tasks from ``spec.task_column`` (unchanged without one)."""
    if spec.task_column is None:
        return examples
    config = METHODS[spec.method].config_class.from_dict(dict(spec.method_options))
    # A method with tasks declares how many (resolve_adapter checked that this one has tasks).
    return with_tasks(examples, spec.task_column, getattr(config, "num_tasks", 0), source=source)


def complete_options(job: AdapterJob, tokenizer) -> None:
    """Let the job's method complete its options from the training examples (CPT builds its context from them)."""
    job.spec.method_options = method_class(job.spec.method).options_from_examples(
        job.spec.method_options,
        job.train,
        Template(job.spec.template),
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
    )


def start_from(model, job: AdapterJob, prefix: str = "") -> None:
    """``init_from``: the job's new adapter takes a saved adapter's weights (and reparameterisation, if
    the save kept one), after checking that it is the same method with as many virtual tokens and tensors of the same shapes."""
    init_from = job.spec.init_from
    assert init_from is not None  # called only for a job that starts from a saved adapter
    fresh = model.adapters[job.name]
    where = f"{prefix}{flag('init_from')} {init_from}"
    try:
        loaded = load_adapter(model, init_from, name=job.name, resume=True)
    except (SoftPromptError, OSError) as exc:  # raised before the fresh adapter was replaced
        raise ConfigError(f"{where}: {exc}") from None
    want = (job.spec.method, job.spec.method_options["num_virtual_tokens"])
    found = (loaded.config.method, loaded.config.num_virtual_tokens)
    problem = ""
    if found != want:
        problem = (
            f"is a {found[0]} adapter with {found[1]} virtual tokens, but this job trains {want[0]} with {want[1]}; "
            f"set {flag('method')} and {flag('num_virtual_tokens')} to match"
        )
    else:  # the same method and length, other options differ (adaption prompt's layers, multitask's task count)
        shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        differ = [
            f"{k} {list(v.shape)} (this job: {list(shapes[k])})"
            for k, v in loaded.state_dict().items()
            if k in shapes and tuple(v.shape) != shapes[k]
        ]
        if differ:
            problem = (
                f"holds {', '.join(differ)}; set this job's {found[0]} options as the saved adapter's config has them"
            )
    if problem:
        model.remove_adapter(job.name)
        model.register(job.name, fresh)  # leave the model as a failed set-up of any other kind does
        raise ConfigError(f"{where}: {problem}")
    loaded.requires_grad_(True)


__all__ = ["AdapterJob", "prepare_job", "start_from"]
