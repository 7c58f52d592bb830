"""``softprompt sweep``: choose template, label words, method, length, lr ... by nested cross-validation.

The search space is `softprompt.training.sweep_space`. With the labelled rows alone (a few dozen, say):

* **outer folds estimate.** For each outer fold, every setting is trained on the inner folds' training
  rows and scored on their held-out rows (pooled over the inner folds); the best setting (or the average
  of the top k, ``ensemble: k``, scored the same way) is the fold's choice. That choice is then trained on
  the outer fold's training rows and scored once on its held-out rows, which no choice has seen. The
  estimate is the outer folds' mean ± std and a bootstrap interval of the pooled outer predictions.
* **final choice.** The same inner cross-validation over all rows chooses the setting reported, saved as
  ``chosen.yaml`` (a recipe for ``softprompt train``) and trained on all rows into ``final/``.

An ensemble's members may differ in base model, template and label words (every probability is per raw
label): its final predictions and test score then come from `ensemble_probabilities`, one base model loaded
at a time, and ``chosen.yaml`` lists each member's own recipe under ``members:``.

All settings of one base model (every setting, inner fold) of a stage train as adapters of ONE
multi-adapter job, in the same batches. A space of several base models holds one of them at a time (besides a
``model`` the caller passes): the one loaded before is let go first. With validation data
(``validation_data``/``validation_split``, or ``selection: validation`` on a ``val_fraction`` split) the
settings are chosen on validation alone. Test rows (``sweep.test_data``; ``sweep.test_split`` of a hub data
set; or ``sweep.test_fraction`` of --data held out first) are scored once, for the final choice.

Every (fold, setting) result is written atomically to ``<output>/results/``; a rerun skips what is there.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from softprompt.data import Template, Verbalizer, kfold, load_rows, sample_rows, train_val_split, verbalizer_for
from softprompt.errors import ConfigError
from softprompt.fileio import atomic_write_json, atomic_write_yaml
from softprompt.training import sweep_report
from softprompt.training.adapter_config import ResolvedAdapter
from softprompt.training.config import TrainConfig
from softprompt.training.ensemble import EnsembleMember, ensemble_probabilities, predict_ensemble_file
from softprompt.training.evaluate import prompt_budget
from softprompt.training.jobs import AdapterJob, prepare_job
from softprompt.training.loop import StepInfo, TrainResult, load_model, train_jobs
from softprompt.training.metrics import classification_report
from softprompt.training.predict import label_probabilities, predict_file
from softprompt.training.signals import stop_at_step_boundary_on_signals
from softprompt.training.sweep_space import Sweep, describe, job_config, job_groups, job_key, load_sweep, recipe_values

REPORT_FILE = "sweep_report.json"
ALL = 0  # the "outer fold" that is every labelled row: its inner folds make the final choice


@dataclasses.dataclass
class SweepResult:
    output: Path
    report: dict  # what sweep_report.json holds
    adapters: dict[str, Path]  # the final adapter(s), by name
    predictions: Path | None = None

    def format(self) -> str:
        return sweep_report.format_report(self.report)


def sweep(
    path_or_sweep: str | Path | Sweep,
    *,
    output: str | None = None,
    predict: str | None = None,
    id_column: str | None = None,
    predict_output: str | None = None,
    model=None,
    progress: bool = True,
) -> SweepResult:
    """Run a sweep file (or a parsed `Sweep`); see the module docstring. ``predict``: an unlabelled file the
    final choice labels (``<output>/predictions.csv`` unless ``predict_output``). ``model``: a loaded
    `SoftPromptModel` for the recipe's base model (others the space names are loaded by name)."""
    overrides = {"output": output} if output else None
    spec = path_or_sweep if isinstance(path_or_sweep, Sweep) else load_sweep(path_or_sweep, overrides)
    if output and isinstance(path_or_sweep, Sweep):
        spec = dataclasses.replace(spec, base=dataclasses.replace(spec.base, output=output))
    run = _Run(spec, model, progress)
    with stop_at_step_boundary_on_signals():
        report = run.validation_sweep() if spec.selection_on_validation else run.nested()
    adapters = {name: Path(p) for name, p in report["final"]["adapters"].items()}
    result = SweepResult(run.out, report, adapters)
    if predict:
        target = Path(predict_output or run.out / "predictions.csv")
        members = report["final"]["members"]
        if _all_share_inputs(members):  # one base model, template and label words: predict's own average
            result.predictions = predict_file(
                run.model_for(members[0]), adapters, predict, target, id_column=id_column, progress=progress
            )
        else:
            result.predictions = predict_ensemble_file(
                run.ensemble_members(members, adapters),
                predict,
                target,
                id_column=id_column,
                load=run.model_by_name,
                progress=progress,
            )
    return result


class _Run:
    def __init__(self, spec: Sweep, model, progress: bool):
        self.spec, self.base, self.opts = spec, spec.base, spec.options
        self.out = Path(spec.base.output)
        # base model name -> loaded model: the caller's (kept) and at most one other (see `model_for`)
        self.given = (self.base.model or "") if model is not None else None
        self.models = {self.given: model} if self.given is not None else {}
        self.progress = progress
        base_spec = self.base.resolved_adapters()[0]
        self.column = self.base.label_column or ""
        self.rows, self.test_rows = self._labelled_rows(base_spec)
        # selection on validation: validation_data's rows, or None (prepare_job cuts a val_fraction split)
        self.val_rows = base_spec.load_validation_rows() if spec.selection_on_validation else None
        self.truth = Verbalizer.from_rows(self.rows, self.column, source=base_spec.data)
        self.raws = self.truth.raws  # every probability list is in this label order
        self.verbalizers = [
            verbalizer_for(s.get("verbalizer", self.base.verbalizer), self.rows, self.column, source=base_spec.data)
            for s in spec.settings
        ]
        self._check_space_file()
        self.bar = tqdm(
            total=self._planned(),
            desc="sweep",
            unit="adapter",
            disable=not progress,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total} adapters [{elapsed}<{remaining}{postfix}]",
        )

    # ------------------------------------------------------------------------------ bookkeeping
    def _labelled_rows(self, spec: ResolvedAdapter) -> tuple[list[dict], list[dict] | None]:
        """(the rows the sweep trains and chooses on, the test rows scored once for the final choice or None).
        ``test_fraction`` is cut from all of --data first, so max_rows samples only what is left."""
        opts = self.opts
        if opts.test_data or opts.test_split:
            # test_split: a split of the hub test_data, else of the recipe's hub data (parse_sweep checked it)
            source, split = opts.test_data or spec.data, opts.test_split or "train"  # load_rows' default split
            test = load_rows(source, format=self.base.data_format, split=split, encoding=self.base.encoding)
            return spec.load_train_rows(), test
        if opts.test_fraction is None:
            return spec.load_train_rows(), None
        rows = dataclasses.replace(spec, max_rows=None).load_train_rows()
        rows, test = train_val_split(rows, opts.test_fraction, opts.seed, self.column, source=spec.data)
        if spec.max_rows is not None:
            rows = sample_rows(rows, spec.max_rows, spec.seed, self.column, source=f"{spec.data} (training rows)")
        return rows, test

    def _check_space_file(self) -> None:
        """Results on disk belong to this space and these folds; another space must not reuse them."""
        key = {
            "settings": self.spec.settings,
            "outer_folds": self.opts.outer_folds,
            "inner_folds": self.opts.inner_folds,
        }
        key |= {"seed": self.opts.seed, "recipe": {k: str(v) for k, v in self.spec.base_values.items()}}
        if self.opts.test_fraction is not None:  # it decides which rows train
            key["test_fraction"] = self.opts.test_fraction
        path = self.out / "results" / "space.json"
        if path.exists():
            if json.loads(path.read_text()) != json.loads(json.dumps(key, default=str)):
                raise ConfigError(
                    f"--output {self.out}: holds results of another sweep (space, folds or recipe differ); "
                    f"choose another --output or delete {self.out / 'results'}"
                )
        else:
            atomic_write_json(path, key)

    def _planned(self) -> int:
        n = len(self.spec.settings)
        if self.spec.selection_on_validation:
            return n
        compared = len({self.spec.value_of(i, self.opts.compare) for i in range(n)}) if self.opts.compare else 0
        return (self.opts.outer_folds + 1) * (self.opts.inner_folds * n + 1) + self.opts.outer_folds * compared

    def _result_path(self, tag: str, index: int) -> Path:
        return self.out / "results" / f"{tag}-s{index}.json"

    def model_name(self, setting: dict[str, Any]) -> str:
        return setting.get("model", self.base.model) or ""

    def model_for(self, setting: dict[str, Any]):
        """The base model of ``setting``. Bases the space names are loaded one at a time, as
        `ensemble_probabilities` loads them: the one held before is dropped (callers keep no reference)."""
        name = self.model_name(setting)
        if name not in self.models:
            for other in [n for n in self.models if n != self.given]:
                del self.models[other]
            gc.collect()  # before the next base loads
            self.models[name] = load_model(dataclasses.replace(self.base, model=name))
        return self.models[name]

    def model_by_name(self, name: str):
        return self.model_for({"model": name})

    def ensemble_members(self, settings: Sequence[dict], adapters: dict[str, Any]) -> list[EnsembleMember]:
        """The final choice as `EnsembleMember`: each setting's base model and trained adapter (which records
        its template and label words)."""
        return [EnsembleMember(self.model_name(s), str(path)) for s, path in zip(settings, adapters.values())]

    # ------------------------------------------------------------------------------ train + score
    def train_and_score(self, units: list[tuple[str, Sequence[dict], Sequence[dict] | None, int]]) -> None:
        """Train each unit ``(tag, train rows, scored rows, setting)`` whose result is not on disk, as
        adapters of one job per base model and job-wide settings, and save each one's probabilities
        (scored rows None: the job's validation rows)."""
        todo = [u for u in units if not self._result_path(u[0], u[3]).exists()]
        self.bar.update(len(units) - len(todo))
        groups: dict[tuple, list] = {}
        for unit in todo:
            groups.setdefault(job_key(self.spec.settings[unit[3]]), []).append(unit)
        # the base already loaded trains first: one load fewer (each job seeds itself, so order changes nothing)
        loaded = [self.model_name(self.spec.settings[g[0][3]]) in self.models for g in groups.values()]
        for _, group in sorted(zip(loaded, groups.values()), key=lambda pair: not pair[0]):
            self._train_group(group)

    def _train_group(self, group: list[tuple[str, Sequence[dict], Sequence[dict] | None, int]]) -> None:
        """One job of `train_and_score` (its own function: the model is let go on return, before the next base)."""
        names = [f"{tag}-s{i}" for tag, _, _, i in group]
        config = job_config(
            self.base,
            [(name, self.spec.settings[i]) for name, (_, _, _, i) in zip(names, group)],
            str(self.out / "work" / group[0][0]),
        )
        jobs = [
            prepare_job(
                spec,
                rows=list(train),
                val_rows=self.val_rows if scored is None else None,
                verbalizer=self.verbalizers[i],
                source=f"{self.base.data} ({tag} training rows)",
            )
            for spec, (tag, train, scored, i) in zip(config.resolved_adapters(), group)
        ]
        model = self.model_for(self.spec.settings[group[0][3]])
        self.bar.set_postfix_str(f"{len(jobs)} adapters in one job ({group[0][0]}...)")
        result = self._train(config, model, jobs)
        for job, (tag, _, scored, i) in zip(jobs, group):
            rows = scored if scored is not None else [e.row for e in job.val]  # selection on validation
            probs = self.probabilities(model, job.name, i, rows, job.spec.template, config)
            atomic_write_json(
                self._result_path(tag, i),
                {"tag": tag, "setting": i, "path": str(result.adapters[job.name].path), **self.record(rows, probs)},
            )
            model.remove_adapter(job.name)

    def _train(self, config: TrainConfig, model, jobs: list[AdapterJob]) -> TrainResult:
        """One multi-adapter job; the bar moves by its adapters as its optimizer steps go (the time estimate)."""
        rows = sum(len(job.train) for job in jobs)  # the bar's estimate of the job's steps, as the loop counts them
        steps = config.epochs * math.ceil(math.ceil(rows / config.batch_size) / config.grad_accum)
        steps = max(1, min(steps, config.max_steps or steps))
        start = self.bar.n

        def moved(info: StepInfo) -> None:
            self.bar.update(start + len(jobs) * min(info.step, steps) / steps - self.bar.n)

        result = train_jobs(config, model, jobs, progress=False, on_step=moved)
        self.bar.update(start + len(jobs) - self.bar.n)
        return result

    def probabilities(
        self, model, name: str, index: int, rows: Sequence[dict], template: str, config: TrainConfig
    ) -> list[list[float]]:
        """Each row's label probabilities (in ``self.raws`` order) from adapter ``name`` of setting ``index``."""
        verbalizer = self.verbalizers[index]
        texts = [Template(template).render(r) for r in rows]
        budget = prompt_budget(model, verbalizer.texts, config.max_length)
        probs = label_probabilities(
            model, texts, verbalizer.texts, [name], batch_size=2 * config.batch_size, max_input_tokens=budget
        )
        order = [verbalizer.raws.index(raw) for raw in self.raws]
        return [[p[j] for j in order] for p in probs]

    def record(self, rows: Sequence[dict], probs: list[list[float]]) -> dict:
        ids = {id(r): i for i, r in enumerate(self.rows)}
        return {
            "labels": self.raws,  # the order of each row's probabilities
            "rows": [ids.get(id(r), -1) for r in rows],
            "truth": [self.truth.to_text(r[self.column]) for r in rows],
            "probs": probs,
        }

    def load(self, tag: str, index: int) -> dict:
        return json.loads(self._result_path(tag, index).read_text())

    # ------------------------------------------------------------------------------ choosing
    def choose(self, tags: list[str], among: Sequence[int] | None = None) -> dict:
        """Score every setting (of ``among``, default all) pooled over ``tags`` (inner folds or validation) and
        choose; with ``ensemble: k`` the average of the top k settings is one more candidate."""
        among = range(len(self.spec.settings)) if among is None else among
        pooled = {i: _pool([self.load(t, i) for t in tags]) for i in among}
        scores = {f"s{i}": self.score(*pooled[i]) for i in pooled}
        ranked = sorted(pooled, key=lambda i: -scores[f"s{i}"])  # stable: ties keep the space's order
        candidates = {f"s{i}": [i] for i in pooled}
        k = min(self.opts.ensemble, len(ranked))
        if k >= 2:
            # any settings: every probability is per raw label, whatever base model, template or words gave it
            top = ranked[:k]
            truth, probs = pooled[top[0]][0], _mean([pooled[i][1] for i in top])
            scores[f"top{k}"], candidates[f"top{k}"] = self.score(truth, probs), top
        best = max(scores, key=lambda c: (scores[c], -list(scores).index(c)))
        return {"scores": scores, "chosen": best, "members": candidates[best]}

    def score(self, truth: list[str], probs: list[list[float]]) -> float:
        return float(classification_report(truth, sweep_report.argmax(probs, self.raws), self.raws)[self.opts.metric])

    # ------------------------------------------------------------------------------ protocols
    def nested(self) -> dict:
        opts = self.opts
        outer = kfold(self.rows, opts.outer_folds, opts.seed, self.column, source=str(self.base.data))
        stages = [(o, train, test) for o, (train, test) in enumerate(outer, 1)] + [(ALL, self.rows, None)]
        compared: dict[Any, list[dict]] = {}
        groups: dict[Any, list[int]] = {}  # sweep.compare: each value's settings
        if (key := opts.compare) is not None:
            for i in range(len(self.spec.settings)):
                groups.setdefault(self.spec.value_of(i, key), []).append(i)
        for o, train, held_out in stages:
            inner = kfold(train, opts.inner_folds, opts.seed, self.column, source=f"{self.base.data} (outer fold {o})")
            tags = [f"o{o}i{j}" for j in range(1, len(inner) + 1)]
            self.train_and_score(
                [(tag, fit, held, i) for tag, (fit, held) in zip(tags, inner) for i in range(len(self.spec.settings))]
            )
            choice = self.choose(tags)
            atomic_write_json(self.out / "results" / f"o{o}-choice.json", choice)
            if o == ALL:
                final = self.final(choice)
                test = self.test_record(choice["members"], final["adapters"])
                continue
            # Each compared value's own choice, made on the same inner folds, is scored on the same outer fold.
            choices = {None: choice} | {v: self.choose(tags, among) for v, among in groups.items()}
            members = sorted({i for c in choices.values() for i in c["members"]})
            self.train_and_score([(f"o{o}test", train, held_out, i) for i in members])
            for value, c in choices.items():
                outer_probs = _pool([self.load(f"o{o}test", i) for i in c["members"]], average=True)
                compared.setdefault(value, []).append(
                    {"fold": o, **c, "truth": outer_probs[0], "probs": outer_probs[1]}
                )
        self.bar.close()
        folds = compared.pop(None)
        report = sweep_report.nested_report(self.spec, folds, final, test, self.raws, self.out, compared)
        atomic_write_json(self.out / REPORT_FILE, report)
        sweep_report.write_outputs(report, self.out)
        return report

    def validation_sweep(self) -> dict:
        self.train_and_score([("val", self.rows, None, i) for i in range(len(self.spec.settings))])
        choice = self.choose(["val"])
        adapters = {f"member{n}": Path(self.load("val", i)["path"]) for n, i in enumerate(choice["members"])}
        final = self.final(choice, adapters)
        test = self.test_record(choice["members"], final["adapters"])
        self.bar.close()
        report = sweep_report.validation_report(self.spec, choice, final, test, self.raws, self.out)
        atomic_write_json(self.out / REPORT_FILE, report)
        sweep_report.write_outputs(report, self.out)
        return report

    def test_record(self, members: list[int], adapters: dict[str, str]) -> dict | None:
        """The test rows (test_data / test_fraction) scored once by the final choice: its members' label
        probabilities averaged; None without test rows."""
        if self.test_rows is None:
            return None
        settings = [self.spec.settings[i] for i in members]
        if not _all_share_inputs(settings):  # scored as --predict scores them
            result = ensemble_probabilities(
                self.ensemble_members(settings, adapters),
                self.test_rows,
                labels=self.raws,
                batch_size=2 * self.base.batch_size,
                load=self.model_by_name,
                source=f"{self.base.data} (test rows)",
            )
            return self.record(self.test_rows, result.probs)
        probs = []
        for n, (i, path) in enumerate(zip(members, adapters.values())):
            model = self.model_for(self.spec.settings[i])
            model.load_adapter(str(path), name=f"test{n}")
            config = job_config(self.base, [(f"test{n}", self.spec.settings[i])])
            template = config.resolved_adapters()[0].template
            probs.append(self.probabilities(model, f"test{n}", i, self.test_rows, template, config))
            model.remove_adapter(f"test{n}")
        return self.record(self.test_rows, _mean(probs))

    def final(self, choice: dict, trained: dict[str, Path] | None = None) -> dict:
        """The chosen recipe (``chosen.yaml``) and its adapter(s): trained on all labelled rows, unless
        ``trained`` (selection on validation: the adapters already trained on the training rows)."""
        members = [self.spec.settings[i] for i in choice["members"]]
        recipe = recipe_values(self.spec, members, str(self.out / "final"))
        atomic_write_yaml(self.out / "chosen.yaml", recipe)
        if trained is None:
            names = ["default"] if len(members) == 1 else [f"member{n}" for n in range(len(members))]
            done = self.out / "results" / "final.json"
            if not done.exists():
                groups = job_groups(members)  # members of other base models (job-wide settings) train apart
                paths: dict[str, str] = {}
                for g, group in enumerate(groups):
                    output = self.out / "final" / (f"job{g}" if len(groups) > 1 else "")
                    paths |= self._train_final([(names[n], members[n]) for n in group], output)
                atomic_write_json(done, {n: paths[n] for n in names})
            trained = {n: Path(p) for n, p in json.loads(done.read_text()).items()}
        return {
            **choice,
            "settings": [describe(m) for m in members],
            "members": members,
            "adapters": {n: str(p) for n, p in trained.items()},
            "recipe": str(self.out / "chosen.yaml"),
        }

    def _train_final(self, adapters: list[tuple[str, dict[str, Any]]], output: Path) -> dict[str, str]:
        """One job of `final`: adapter name -> trained path (the model is let go on return, before the next base)."""
        config = job_config(self.base, adapters, str(output))
        model = self.model_for(adapters[0][1])
        result = self._train(config, model, [prepare_job(s) for s in config.resolved_adapters()])
        for name, _ in adapters:
            model.remove_adapter(name)
        return {name: str(result.adapters[name].path) for name, _ in adapters}


def _all_share_inputs(settings: Sequence[dict]) -> bool:
    """Whether one base model renders the rows one way for every setting (`predict_file` averages them)."""
    keys = ("model", "template", "verbalizer")
    first = settings[0]
    return all(job_key(s) == job_key(first) and all(s.get(k) == first.get(k) for k in keys) for s in settings)


def _pool(results: list[dict], average: bool = False) -> tuple[list[str], list[list[float]]]:
    """Concatenate results over folds, or (``average``) average results over the same rows."""
    if average:
        return results[0]["truth"], _mean([r["probs"] for r in results])
    return [t for r in results for t in r["truth"]], [p for r in results for p in r["probs"]]


def _mean(probs: list[list[list[float]]]) -> list[list[float]]:
    return [[statistics.fmean(v) for v in zip(*rows)] for rows in zip(*probs)]


__all__ = ["REPORT_FILE", "SweepResult", "sweep"]
