"""Hostile and broken input catalogue: every case gives one clear error line, a non-zero exit, no traceback,
and leaves existing files alone. See docs/reliability.md for the table of categories.

Every case runs the real command line (`softprompt.cli.main`) in-process on a tiny checkpoint on disk; a
few run through a real `softprompt` process too. Train cases point ``--output`` at a finished run and
check afterwards that every file there kept its bytes and modification time.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from softprompt import SoftPromptModel
from softprompt.adapters.peft_format import MAX_JSON_BYTES
from softprompt.cli import main
from softprompt.data import MAX_FILE_BYTES
from softprompt.training.config import MAX_CONFIG_BYTES

from tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROGRESS = re.compile(r"\d+%\|")


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("hostile")
    e = SimpleNamespace(tmp=tmp, model=save_tiny_checkpoint("gpt2", tmp / "model"), data=str(tmp / "train.csv"))
    with open(e.data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(
            [[("abc" if i % 2 else "xyz") * (1 + i % 3) + str(i), "A" if i % 2 else "B"] for i in range(24)]
        )
    model = tiny_model("gpt2")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    e.adapter = tmp / "adapter"
    model.save_adapter("a", e.adapter)
    for name, config in [
        (
            "wide",
            GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=259, bos_token_id=2, eos_token_id=1),
        ),  # other width
        ("vocab", GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, bos_token_id=2, eos_token_id=1)),
    ]:  # other vocabulary
        other = SoftPromptModel(GPT2LMHeadModel(config), tiny_tokenizer(), name_or_path=f"other-{name}")
        other.add_adapter(name, method="prompt_tuning", num_virtual_tokens=3, seed=0)
        other.save_adapter(name, tmp / name)
        setattr(e, name, tmp / name)
    e.run = tmp / "run"  # a finished run that failed runs must leave alone
    assert (
        main(
            [
                "train",
                "--model",
                e.model,
                "--data",
                e.data,
                "--label-column",
                "label",
                "--epochs",
                "1",
                "--num-virtual-tokens",
                "2",
                "--output",
                str(e.run),
            ]
        )
        == 0
    )
    return e


# ------------------------------------------------------------------------------------------ builders


def train(e, t, *extra, data=None) -> list[str]:
    return [
        "train",
        "--model",
        e.model,
        "--data",
        str(data or e.data),
        "--label-column",
        "label",
        "--epochs",
        "1",
        "--num-virtual-tokens",
        "2",
        "--output",
        str(t / "run"),
        *extra,
    ]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def sparse(path: Path, size: int) -> Path:
    """A file that reports ``size`` bytes but takes no disk space."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def config_file(t, text: str) -> str:
    return str(write(t / "run.yaml", text))


def adapter_copy(e, t, name="adapter", source=None) -> Path:
    target = t / name
    shutil.copytree(source or e.adapter, target)
    return target


def edit_json(path: Path, **changes) -> None:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


class Boom:
    """Unpickling this would create the file it names: proof that nothing was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_adapter(e, t, filename: str) -> Path:
    folder = adapter_copy(e, t)
    for name in ("adapter_model.safetensors", "softprompt.json", "training_state.safetensors"):
        (folder / name).unlink()
    (folder / filename).write_bytes(pickle.dumps(Boom(str(t / "executed"))))
    return folder


def generate(e, adapter) -> list[str]:
    return ["generate", "--model", e.model, "--adapter", f"x={adapter}", "--max-new-tokens", "2", "hello"]


def evaluate(e, adapter, *extra) -> list[str]:
    return [
        "eval",
        "--model",
        e.model,
        "--adapter",
        f"x={adapter}",
        "--data",
        e.data,
        "--label-column",
        "label",
        *extra,
    ]


def nothing_executed(e, t) -> None:
    assert not (t / "executed").exists(), "a pickle or a YAML python tag was executed"


@dataclass
class Case:
    id: str
    build: Callable  # (env, tmp_path) -> argv
    expect: tuple[str, ...]  # fragments of the one error line; "{t}" is the test's tmp_path
    check: Callable | None = None  # (env, tmp_path) -> None, extra assertions afterwards


def _yaml_python_tag(e, t):
    return [
        "train",
        config_file(t, f'model: !!python/object/apply:builtins.open ["{t / "executed"}", "w"]\n'),
        "--data",
        e.data,
        "--output",
        str(t / "run"),
    ]


CASES = [
    # ---------------------------------------------------------------- flags
    Case(
        "flag-wrong-type",
        lambda e, t: train(e, t, "--batch-size", "abc"),
        ("--batch-size", "expected an integer", "'abc'"),
    ),
    Case("flag-missing-value", lambda e, t: train(e, t, "--lr"), ("--lr", "expects a value")),
    Case(
        "flag-unknown-did-you-mean",
        lambda e, t: train(e, t, "--epoch", "2"),
        ("--epoch", "unknown option", "did you mean 'epochs'"),
    ),
    Case("flag-out-of-range", lambda e, t: train(e, t, "--val-fraction", "1.5"), ("--val-fraction", "below 1", "1.5")),
    Case(
        "flag-bad-choice",
        lambda e, t: train(e, t, "--lr-schedule", "exponential"),
        ("--lr-schedule", "linear, cosine, constant", "'exponential'"),
    ),
    Case("flag-bool-garbage", lambda e, t: train(e, t, "--bf16", "maybe"), ("--bf16", "true or false", "'maybe'")),
    Case("flag-unknown-method", lambda e, t: train(e, t, "--method", "lora"), ("--method", "prompt_tuning", "'lora'")),
    Case(
        "flag-stray-word",
        lambda e, t: ["train", config_file(t, f"data: {e.data}\n"), "stray"],
        ("'stray'", "expected an option"),
    ),
    Case(
        "generate-int-flag-not-a-number",
        lambda e, t: generate(e, e.adapter) + ["--max-new-tokens", "many"],
        ("--max-new-tokens", "invalid int value", "'many'"),
    ),
    Case(
        "generate-negative-temperature",
        lambda e, t: generate(e, e.adapter) + ["--temperature", "-1"],
        ("temperature", "above 0", "-1"),
    ),
    Case("generate-unknown-dtype", lambda e, t: generate(e, e.adapter) + ["--dtype", "float8"], ("--dtype", "float8")),
    Case(
        "inspect-top-k-zero",
        lambda e, t: ["inspect", str(e.adapter), "--model", e.model, "--top-k", "0"],
        ("--top-k", "at least 1", "0"),
    ),
    Case(
        "eval-without-adapter",
        lambda e, t: ["eval", "--model", e.model, "--data", e.data],
        ("--adapter", "at least one adapter"),
    ),
    Case(
        "eval-batch-size-zero", lambda e, t: evaluate(e, e.adapter, "--batch-size", "0"), ("--batch-size", "at least 1")
    ),
    Case(
        "eval-unknown-flag", lambda e, t: evaluate(e, e.adapter, "--shots", "3"), ("unrecognised arguments", "--shots")
    ),
    Case(
        "adapter-spec-without-name",
        lambda e, t: generate(e, e.adapter)[:3] + ["--adapter", f"={e.adapter}", "hi"],
        ("--adapter", "NAME=PATH"),
    ),
    Case(
        "model-missing-directory",
        lambda e, t: ["generate", "--model", str(t / "no-model"), "hi"],
        ("--model", "no-model", "no such local directory"),
    ),
    # ---------------------------------------------------------------- config files
    Case("yaml-python-tag", _yaml_python_tag, ("{t}/run.yaml", "not a readable YAML file"), nothing_executed),
    Case(
        "config-unknown-key",
        lambda e, t: ["train", config_file(t, f"data: {e.data}\nlrr: 0.1\n")],
        ("{t}/run.yaml", "unknown key 'lrr'", "did you mean 'lr'"),
    ),
    Case(
        "config-wrong-type",
        lambda e, t: ["train", config_file(t, f"data: {e.data}\nepochs: three\n")],
        ("{t}/run.yaml", "'epochs'", "expected an integer", "'three'"),
    ),
    Case(
        "config-top-level-list",
        lambda e, t: ["train", config_file(t, "- lr\n- epochs\n")],
        ("{t}/run.yaml", "expected a mapping"),
    ),
    Case(
        "config-missing-field",
        lambda e, t: ["train", config_file(t, "label_column: label\n"), "--model", e.model, "--output", str(t / "run")],
        ("--data", "required"),
    ),
    Case(
        "config-adapters-not-mappings",
        lambda e, t: ["train", config_file(t, f"data: {e.data}\nadapters: [1, 2]\n")],
        ("{t}/run.yaml", "adapters", "item 0"),
    ),
    Case(
        "config-verbalizer-wrong-type",
        lambda e, t: ["train", config_file(t, f"data: {e.data}\nverbalizer: [a, b]\n")],
        ("{t}/run.yaml", "'verbalizer'", "mapping"),
    ),
    Case(
        "config-is-a-directory",
        lambda e, t: ["train", str((t / "cfg.yaml").mkdir() or t / "cfg.yaml")],
        ("{t}/cfg.yaml", "is a directory", "YAML config file"),
    ),
    Case("config-missing", lambda e, t: ["train", str(t / "absent.yaml")], ("{t}/absent.yaml", "no such config file")),
    Case(
        "config-undecodable",
        lambda e, t: ["train", str(write(t / "run.yaml", b"lr: \xff\xfe\x00\n"))],
        ("{t}/run.yaml", "not a readable YAML file"),
    ),
    Case(
        "config-huge",
        lambda e, t: ["train", str(sparse(t / "run.yaml", MAX_CONFIG_BYTES + 1))],
        ("{t}/run.yaml", "a config file is at most"),
    ),
    Case(
        "config-symlink-to-device",
        lambda e, t: ["train", str((t / "run.yaml").symlink_to("/dev/zero") or t / "run.yaml")],
        ("{t}/run.yaml", "not a regular file"),
    ),
    # ---------------------------------------------------------------- data files
    Case("data-missing", lambda e, t: train(e, t, data=t / "nope.csv"), ("{t}/nope.csv", "no such file")),
    Case(
        "data-is-a-directory",
        lambda e, t: train(e, t, data=(t / "d.csv").mkdir() or t / "d.csv"),
        ("{t}/d.csv", "is a directory"),
    ),
    Case("data-empty", lambda e, t: train(e, t, data=write(t / "empty.csv", "")), ("{t}/empty.csv", "is empty")),
    Case(
        "data-undecodable",
        lambda e, t: train(e, t, data=write(t / "bad.csv", b"text,label\ncaf\xe9,A\nok,B\n")),
        ("{t}/bad.csv", "byte 0xe9", "line 2", "--encoding"),
    ),
    Case(
        "data-binary-file",
        lambda e, t: train(e, t, data=write(t / "img.csv", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))),
        ("{t}/img.csv", "not valid UTF-8"),
    ),
    Case(
        "data-label-column-absent",
        lambda e, t: train(e, t, "--label-column", "lable"),
        ("train.csv", "no column 'lable'", "did you mean 'label'"),
    ),
    Case(
        "data-template-names-absent-column",
        lambda e, t: train(e, t, "--template", "Tweet: {txt} =>"),
        ("template", "'txt'", "train.csv"),
    ),
    Case(
        "data-template-without-column",
        lambda e, t: train(e, t, "--template", "constant text"),
        ("template", "uses no column"),
    ),
    Case(
        "data-label-outside-verbalizer",
        lambda e, t: train(e, t, "--verbalizer", "A=yes"),
        ("train.csv", "column 'label'", "label 'B'", "not one of the expected labels"),
    ),
    Case(
        "data-empty-label",
        lambda e, t: train(e, t, data=write(t / "l.csv", "text,label\nabc,A\nxyz,\n")),
        ("{t}/l.csv", "row 2", "label is empty"),
    ),
    Case(
        "data-single-10mb-line",
        lambda e, t: train(e, t, data=write(t / "big.csv", "text,label\n" + "a" * 10_000_000 + ",A\nb,B\n")),
        ("{t}/big.csv", "row 1", "'text'", "10,000,000 characters", "limit"),
    ),
    Case(
        "data-over-size-limit",
        lambda e, t: train(e, t, data=sparse(t / "huge.csv", MAX_FILE_BYTES + 1)),
        ("{t}/huge.csv", "limit for a data file"),
    ),
    Case(
        "data-symlink-to-device",
        lambda e, t: train(e, t, data=(t / "z.csv").symlink_to("/dev/zero") or t / "z.csv"),
        ("{t}/z.csv", "not a regular file"),
    ),
    Case(
        "data-jsonl-line-not-object",
        lambda e, t: train(e, t, data=write(t / "d.jsonl", '["text", "A"]\n')),
        ("{t}/d.jsonl", "line 1", "JSON object"),
    ),
    Case(
        "data-ragged-csv",
        lambda e, t: train(e, t, data=write(t / "r.csv", "text,label\nabc,A\na,b,B\n")),
        ("{t}/r.csv", "row 2", "3 fields"),
    ),
    Case(
        "data-unclosed-quote",
        lambda e, t: train(e, t, data=write(t / "q.csv", 'text,label\n"abc,A\nxyz,B\n')),
        ("{t}/q.csv", "malformed CSV"),
    ),
    Case(
        "data-unknown-extension",
        lambda e, t: train(e, t, data=write(t / "data.xlsx", "x")),
        ("{t}/data.xlsx", "'.xlsx'", "--format"),
    ),
    # ---------------------------------------------------------------- output
    Case(
        "output-is-a-file",
        lambda e, t: train(e, t, "--output", str(write(t / "out", "keep me"))),
        ("--output", "{t}/out", "exists and is not a directory"),
        lambda e, t: (t / "out").read_text() == "keep me" or pytest.fail("the file was changed"),
    ),
    Case(
        "output-parent-is-a-file",
        lambda e, t: train(e, t, "--output", str(write(t / "out", "keep me") / "run")),
        ("--output", "{t}/out", "is not a directory"),
    ),
    Case(
        "output-adapter-directory-is-a-file",
        lambda e, t: train(e, t, "--output", str(t / "o")) if write(t / "o" / "default", "keep me") else None,
        ("--output", "{t}/o/default", "exists and is not a directory"),
    ),
    Case(
        "resume-with-another-config", lambda e, t: train(e, t, "--resume", "--lr", "0.5"), ("--resume", "--lr", "0.5")
    ),
    Case(
        "early-stopping-without-validation-rows",
        lambda e, t: train(e, t, "--val-fraction", "0", "--early-stopping-patience", "2"),
        ("--early-stopping-patience", "no validation rows"),
    ),
    # ---------------------------------------------------------------- adapter files
    Case(
        "adapter-for-a-wider-model",
        lambda e, t: generate(e, e.wide),
        ("adapter_config.json", "token width", "48", "this model has 32"),
    ),
    Case(
        "adapter-for-another-vocabulary",
        lambda e, t: evaluate(e, e.vocab),
        ("softprompt.json", "vocabulary size", "300", "this model has 259"),
    ),
    Case(
        "adapter-truncated-safetensors",
        lambda e, t: ["inspect", str(_truncated(e, t))],
        ("{t}/adapter/adapter_model.safetensors", "truncated or corrupt"),
    ),
    Case(
        "adapter-trust-remote-code",
        lambda e, t: generate(e, _edited(e, t, auto_map={"x": "y"}, trust_remote_code=True)),
        ("{t}/adapter/adapter_config.json", "trust_remote_code"),
    ),
    Case(
        "adapter-pickled-bin-only",
        lambda e, t: generate(e, pickled_adapter(e, t, "adapter_model.bin")),
        ("{t}/adapter/adapter_model.bin", "pickled weights are never loaded", "safetensors"),
        nothing_executed,
    ),
    Case(
        "adapter-pickled-pt-only",
        lambda e, t: ["inspect", str(pickled_adapter(e, t, "adapter_model.pt"))],
        ("{t}/adapter/adapter_model.pt", "pickled weights are never loaded"),
        nothing_executed,
    ),
    Case(
        "adapter-path-is-a-file",
        lambda e, t: evaluate(e, write(t / "adapter.json", "{}")),
        ("{t}/adapter.json", "got a file"),
    ),
    Case("adapter-missing", lambda e, t: generate(e, t / "gone"), ("{t}/gone", "no such adapter directory")),
    Case(
        "adapter-config-is-a-directory",
        lambda e, t: ["inspect", str(_config_replaced_by_directory(e, t))],
        ("{t}/adapter/adapter_config.json", "is a directory"),
    ),
    Case(
        "adapter-config-wrong-type",
        lambda e, t: generate(e, _edited(e, t, num_virtual_tokens="many")),
        ("{t}/adapter/adapter_config.json", "malformed"),
    ),
    Case(
        "adapter-config-json-array",
        lambda e, t: ["inspect", str(_config_text(e, t, b"[1, 2]"))],
        ("{t}/adapter/adapter_config.json", "expected a JSON object"),
    ),
    Case(
        "adapter-config-empty",
        lambda e, t: generate(e, _config_text(e, t, b"")),
        ("{t}/adapter/adapter_config.json", "not valid JSON"),
    ),
    Case(
        "adapter-config-huge",
        lambda e, t: ["inspect", str(_huge_config(e, t))],
        ("{t}/adapter/adapter_config.json", "too large"),
    ),
    Case(
        "adapter-meta-config-not-an-object",
        lambda e, t: generate(e, _meta_edited(e, t, config=5)),
        ("{t}/adapter/softprompt.json", "'config' must be a JSON object"),
    ),
    Case(
        "adapter-weights-symlink-to-device",
        lambda e, t: generate(e, _weights_to_device(e, t)),
        ("{t}/adapter/adapter_model.safetensors",),
    ),
    Case(
        "adapter-weights-is-a-directory",
        lambda e, t: ["inspect", str(_weights_directory(e, t))],
        ("{t}/adapter/adapter_model.safetensors", "is a directory"),
    ),
]


def _truncated(e, t):
    folder = adapter_copy(e, t)
    (folder / "softprompt.json").unlink()  # a PEFT adapter: no checksum, the safetensors header must catch it
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:60])
    return folder


def _edited(e, t, **changes):
    folder = adapter_copy(e, t)
    edit_json(folder / "adapter_config.json", **changes)
    return folder


def _meta_edited(e, t, **changes):
    folder = adapter_copy(e, t)
    edit_json(folder / "softprompt.json", **changes)
    return folder


def _config_text(e, t, content: bytes):
    folder = adapter_copy(e, t)
    (folder / "adapter_config.json").write_bytes(content)
    return folder


def _huge_config(e, t):
    folder = adapter_copy(e, t)
    sparse(folder / "adapter_config.json", MAX_JSON_BYTES + 1)
    return folder


def _config_replaced_by_directory(e, t):
    folder = adapter_copy(e, t)
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()
    return folder


def _weights_to_device(e, t):
    folder = adapter_copy(e, t)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to("/dev/zero")
    return folder


def _weights_directory(e, t):
    folder = adapter_copy(e, t)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    return folder


# --------------------------------------------------------------------------------------------- checks


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: bytes and modification time of files, link targets, directories."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_file():
            out[key] = ("file", path.read_bytes(), path.stat().st_mtime_ns)
        else:
            out[key] = ("dir",)
    return out


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    lines = [line for line in lines if not line.startswith(("usage:", " "))]  # argparse prints its usage first
    assert len(lines) == 1, lines
    return lines[0]


def test_the_catalogue_is_large_and_its_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input_gives_one_clear_line_and_changes_nothing(case, env, tmp_path, capsys):
    shutil.copytree(env.run, tmp_path / "run")  # copy2: bytes and modification times come along
    argv = [str(word) for word in case.build(env, tmp_path)]
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (a flag that is not a number)
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {captured.err[-1000:]}"
    line = one_error_line(captured.err)
    assert line.startswith(f"softprompt {argv[0]}: error: "), line
    for fragment in case.expect:
        assert fragment.replace("{t}", str(tmp_path)) in line, f"{fragment!r} not in {line!r}"
    assert snapshot(tmp_path / "run") == before, "a failed run changed files of an existing run"
    if case.check is not None:
        case.check(env, tmp_path)


@pytest.mark.parametrize("case_id", ["yaml-python-tag", "adapter-pickled-bin-only"])
def test_a_real_process_prints_no_traceback(case_id, env, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    argv = [str(word) for word in case.build(env, tmp_path)]
    script = Path(sys.executable).with_name("softprompt")
    proc = subprocess.run(
        [str(script), *argv], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert all(fragment.replace("{t}", str(tmp_path)) in line for fragment in case.expect), line
    nothing_executed(env, tmp_path)


def test_symlinks_in_the_output_are_replaced_or_kept_never_written_through(env, tmp_path):
    """Files of a run that are symlinks elsewhere (config.yaml, metrics.jsonl, loss_curve.png, an extra file
    in the adapter directory) are replaced by the run's own files or kept as links; their targets stay as
    they were."""
    victims = tmp_path / "victims"
    victims.mkdir()
    out = tmp_path / "out"
    (out / "default").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png"):
        (out / name).symlink_to(write(victims / name, f"victim {name}"))
    (victims / "tree").mkdir()
    write(victims / "tree" / "secret", "victim tree")
    (out / "default" / "notes").symlink_to(
        victims / "tree"
    )  # saving the adapter keeps other files: not this one's target
    before = snapshot(victims)
    assert main(train(env, tmp_path, "--output", str(out))) == 0
    assert snapshot(victims) == before
    assert not (out / "config.yaml").is_symlink() and "label_column: label" in (out / "config.yaml").read_text()
    assert not (out / "metrics.jsonl").is_symlink()
    assert (out / "default" / "notes").is_symlink() and os.readlink(out / "default" / "notes") == str(victims / "tree")


def test_inspect_top_k_beyond_the_vocabulary_lists_the_whole_vocabulary(env, capsys):
    assert main(["inspect", str(env.adapter), "--model", env.model, "--top-k", "100000", "--json"]) == 0
    nearest = json.loads(capsys.readouterr().out)["nearest_tokens"]
    assert len(nearest) == 3 and all(len(row) == 259 for row in nearest)
