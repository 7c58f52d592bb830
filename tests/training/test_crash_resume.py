"""Training survives faults: SIGKILL at any moment, Ctrl-C, and corrupt or truncated files.

A real `softprompt train` process (tiny checkpoint on disk, small CSV) is killed at several points and
resumed with ``--resume``; the result must be bit for bit the adapter of an uninterrupted run. See
docs/reliability.md.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from softprompt.cli import main

from tiny import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS, STEPS_PER_EPOCH = 6, 9  # 48 rows, 12 held out, batches of 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
LAST = Path("default") / "checkpoints" / "last"
_SCRIPT = Path(sys.executable).with_name("softprompt")
SOFTPROMPT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "softprompt.cli"]
PROGRESS = re.compile(r"\d+%\|")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------ helpers


def train_argv(run, output, *extra) -> list[str]:
    # p-tuning with an LSTM and dropout: the RNG state matters, so an inexact resume would show.
    return [
        "train",
        "--model",
        run.model,
        "--data",
        run.data,
        "--label-column",
        "label",
        "--method",
        "p-tuning",
        "--encoder-type",
        "lstm",
        "--encoder-dropout",
        "0.3",
        "--encoder-hidden-size",
        "8",
        "--num-virtual-tokens",
        "3",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "4",
        "--lr",
        "0.05",
        "--warmup-ratio",
        "0.1",
        "--lr-schedule",
        "cosine",
        "--weight-decay",
        "0.01",
        "--val-fraction",
        "0.25",
        "--log-every",
        "1",
        "--seed",
        "3",
        "--output",
        str(output),
        *extra,
    ]


def checkpoint_step(output: Path) -> int | None:
    """The step of the latest saved state, or None while there is none (or it is being swapped)."""
    try:
        return json.loads((output / LAST / "training_state.json").read_text())["state"]["step"]
    except (OSError, ValueError, KeyError):
        return None


def logged_steps(output: Path) -> int:
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"type": "train"' in line)


def start(argv: list[str], log: Path, command=None, sigint=signal.SIG_DFL) -> subprocess.Popen:
    """The command in a child process, whose SIGINT starts as ``sigint`` (SIG_DFL: as from a terminal;
    SIG_IGN: as a shell without job control starts ``cmd &``), whatever this test process inherited."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            (command or SOFTPROMPT) + argv,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )


def wait_until(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"{what}: the run ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: timed out waiting for the kill point")
        time.sleep(0.001)


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (model loading, training)."""
    return [line for line in stderr.strip().splitlines() if line.strip() and not PROGRESS.search(line)]


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def assert_same_run(expected: Path, actual: Path) -> None:
    """Best adapter and latest checkpoint: every tensor equal (weights, optimizer, RNG); same metrics log."""
    for sub in (Path("default"), LAST):
        for name in ("adapter_model.safetensors", "training_state.safetensors"):
            a, b = load_file(expected / sub / name), load_file(actual / sub / name)
            assert a.keys() == b.keys(), f"{sub / name}: different tensors {sorted(a)} vs {sorted(b)}"
            for key in a:
                assert torch.equal(a[key], b[key]), f"{sub / name}: tensor {key!r} differs from the uninterrupted run"

    def strip(path: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (path / "metrics.jsonl").read_text().splitlines()
        ]

    assert strip(actual) == strip(expected)


@pytest.fixture
def own_signals():
    """Handlers a test sets for SIGINT and SIGTERM are this test's only: the suite gets its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A tiny checkpoint, a small CSV and the uninterrupted reference run (in-process, same CLI code)."""
    tmp = tmp_path_factory.mktemp("crash")
    rng = random.Random(0)
    with open(tmp / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(48):
            letters = "xyz" if i % 2 else "abc"
            writer.writerow(["".join(rng.choice(letters) for _ in range(rng.randint(4, 8))), "A" if i % 2 else "B"])
    ns = SimpleNamespace(tmp=tmp, model=save_tiny_checkpoint("gpt2", tmp / "model"), data=str(tmp / "train.csv"))
    ns.reference = tmp / "reference"
    assert main(train_argv(ns, ns.reference)) == 0
    assert checkpoint_step(ns.reference) == TOTAL_STEPS
    return ns


# --------------------------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_adapter_bit_for_bit(run, tmp_path):
    out = tmp_path / "killed"
    argv = train_argv(run, out, "--save-every", "1")  # the latest state is saved after every step
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    points = [  # (what, kill once this many steps are saved, then wait up to this many seconds)
        ("after the 1st checkpoint", 1, 0.0),
        ("after the 3rd checkpoint", 3, 0.0),
        ("at a random moment after the 15th checkpoint (mostly inside a checkpoint write)", 15, 0.06),
    ]
    seen = []
    for i, (what, steps, jitter) in enumerate(points):
        log = tmp_path / f"kill{i}.log"
        proc = start(argv + (["--resume"] if i else []), log)
        wait_until(proc, lambda steps=steps: (checkpoint_step(out) or 0) >= steps, log, what)
        time.sleep(rng.uniform(0.0, jitter))
        assert kill(proc) == -signal.SIGKILL, f"{what} (seed {seed}): the run was not cut short"
        step = checkpoint_step(out)
        assert step is not None and steps <= step < TOTAL_STEPS, f"{what} (seed {seed}): no usable checkpoint ({step})"
        seen.append(step)
    assert seen == sorted(seen), seen
    assert main(argv + ["--resume"]) == 0  # the last resume runs to the end
    assert_same_run(run.reference, out)


# A process that SIGKILLs itself at one precise moment of a directory save (fault injection).
KILLER = r"""
import os, signal, sys
import softprompt.fileio as fileio
from softprompt.cli import main

mode, nth = sys.argv[1], int(sys.argv[2])
calls = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "before-swap":  # the new directory is complete in its temporary sibling, the old one untouched
    exchange = fileio._exchange
    def patched(a, b):
        global calls
        calls += 1
        if calls == nth:
            die()
        return exchange(a, b)
    fileio._exchange = patched
elif mode == "between-renames":  # no atomic exchange: the old directory moved aside, the new one not yet in
    fileio._RENAMEAT2 = None
    replace = os.replace
    def patched(src, dst):
        global calls
        replace(src, dst)
        if ".old-" in os.fspath(dst):
            calls += 1
            if calls == nth:
                die()
    os.replace = patched
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("mode", ["between-renames"])
def test_sigkill_inside_a_directory_swap_is_recovered_by_resume(run, tmp_path, mode):
    out = tmp_path / mode
    argv = train_argv(run, out, "--save-every", "2")
    log = tmp_path / "killer.log"
    proc = start([mode, "13", *argv], log, command=[sys.executable, "-c", KILLER])
    assert proc.wait(timeout=120) == -signal.SIGKILL, log.read_text()[-2000:]
    if mode == "between-renames":  # the fault hit the window: a directory is missing, its old copy aside
        aside = [p for p in out.rglob(".*.old-*")]
        assert aside and not (aside[0].parent / aside[0].name[1:].split(".old-")[0]).exists()
    assert main(argv + ["--resume"]) == 0
    assert_same_run(run.reference, out)
    assert not list(out.rglob(".*.old-*"))  # the old copy was put back, nothing left aside


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_the_latest_state_exits_130_and_resume_is_bit_identical(run, tmp_path, capsys):
    out = tmp_path / "ctrl-c"
    argv = train_argv(run, out)  # no --save-every: without Ctrl-C the state is saved only once per epoch
    log = tmp_path / "sigint.log"
    proc = start(argv, log)
    wait_until(proc, lambda: logged_steps(out) >= 3, log, "Ctrl-C")
    assert kill(proc, signal.SIGINT) == 130
    err = log.read_text()
    assert "Traceback" not in err
    (message,) = error_lines(err)
    step = checkpoint_step(out)
    assert message == (
        f"softprompt train: interrupted; stopped after step {step}; the latest state is saved in "
        f"{out / 'default' / 'checkpoints' / 'last'}; continue with --resume"
    )
    assert 3 <= step < TOTAL_STEPS and step == logged_steps(out)  # saved where it stopped, not at an epoch end
    capsys.readouterr()
    assert main(["inspect", str(out / LAST), "--json"]) == 0  # the checkpoint loads
    assert json.loads(capsys.readouterr().out)["num_virtual_tokens"] == 3
    assert main(argv + ["--resume"]) == 0
    assert_same_run(run.reference, out)


def test_ctrl_c_reaches_a_run_started_in_the_background_by_a_script(run, tmp_path):
    """``softprompt train ... &`` (or ``nohup``) in a script starts with SIGINT ignored; ``kill -INT`` still saves
    at a step boundary and stops."""
    out = tmp_path / "background"
    log = tmp_path / "background.log"
    proc = start(train_argv(run, out), log, sigint=signal.SIG_IGN)
    wait_until(proc, lambda: logged_steps(out) >= 3, log, "kill -INT")
    assert kill(proc, signal.SIGINT) == 130
    (message,) = error_lines(log.read_text())
    step = checkpoint_step(out)
    assert message == (
        f"softprompt train: interrupted; stopped after step {step}; the latest state is saved in "
        f"{out / 'default' / 'checkpoints' / 'last'}; continue with --resume"
    )
    assert 3 <= step < TOTAL_STEPS and step == logged_steps(out)


@pytest.mark.parametrize(
    "signum, default, step",
    [
        (signal.SIGINT, signal.default_int_handler, 5),  # Ctrl-C
        (signal.SIGTERM, signal.SIG_DFL, 4),  # `kill PID`, what job schedulers send before SIGKILL
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_in_process_saves_at_a_step_boundary(run, tmp_path, signum, default, step, own_signals):
    """The same through the library: a signal arriving mid-step is deferred to the end of the step."""
    from softprompt.training.config import load_config
    from softprompt.training.loop import TrainingInterrupted, train

    signal.signal(signum, default)  # as a process started from a terminal has it, whatever this one inherited
    out = tmp_path / "lib"
    config = load_config(None, train_argv(run, out)[1:])

    def on_step(info):
        if info.step == step:
            os.kill(os.getpid(), signum)  # delivered now, inside the loop

    with pytest.raises(TrainingInterrupted, match=f"stopped after step {step}"):
        train(config, on_step=on_step, progress=False)
    assert checkpoint_step(out) == step
    assert signal.getsignal(signum) is default  # the handler is given back
    resumed = train(load_config(None, train_argv(run, out, "--resume")[1:]), progress=False)
    assert resumed.steps == TOTAL_STEPS
    assert_same_run(run.reference, out)


def test_an_inherited_ignored_sigint_is_taken_over_and_an_ignored_sigterm_left_alone(run, tmp_path, own_signals):
    """A process started with SIGINT ignored (``cmd &`` in a script) still stops on it; an ignored SIGTERM is
    someone's choice and stays ignored. Both are given back ignored."""
    from softprompt.training.config import load_config
    from softprompt.training.loop import TrainingInterrupted, train

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = tmp_path / "ignored"

    def on_step(info):
        if info.step in (2, 3):
            os.kill(os.getpid(), signal.SIGTERM if info.step == 2 else signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped after step 3"):
        train(load_config(None, train_argv(run, out)[1:]), on_step=on_step, progress=False)
    assert checkpoint_step(out) == 3
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_half_written_metrics_line_after_the_checkpoint_does_not_stop_resume(run, tmp_path):
    out = tmp_path / "metrics"
    argv = train_argv(run, out, "--epochs", "1", "--eval-every", "1")
    assert main(argv) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 99, "lo')  # a crash (or a full disk) mid-append
    assert main(argv + ["--resume"]) == 0
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_a_checkpoint_saved_with_flat_method_options_resumes(run, tmp_path, capsys):
    """Runs saved before method options were nested (``num_virtual_tokens: 3`` at the top of the saved config)
    resume: the saved config is read in today's layout, so it differs from this run in nothing."""
    out = tmp_path / "flat"
    argv = train_argv(run, out, "--epochs", "1")
    assert main(argv) == 0
    state_file = out / LAST / "training_state.json"
    state = json.loads(state_file.read_text())
    nested = state["config"].pop("method_options")
    assert nested["num_virtual_tokens"] == 3
    state["config"].update(nested)
    state_file.write_text(json.dumps(state))
    assert main(argv + ["--resume"]) == 0
    state["config"]["num_virtual_tokens"] = 4  # a real change is still refused
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    assert "the config differs from the run being resumed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ corrupt files


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, past the (still valid) safetensors header
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _bad_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])  # a header length far past the end


@pytest.fixture(scope="module")
def finished(run):
    out = run.tmp / "finished"
    argv = train_argv(run, out, "--epochs", "1")
    assert main(argv) == 0
    return out, argv


@pytest.mark.parametrize(
    "file, damage, expected",
    [
        (LAST / "adapter_model.safetensors", _flip_byte, "checksum does not match softprompt.json"),
        (LAST / "adapter_model.safetensors", _truncate, "checksum does not match softprompt.json"),
        (LAST / "training_state.safetensors", _flip_byte, "checksum does not match softprompt.json"),
        (LAST / "training_state.safetensors", _truncate, "checksum does not match softprompt.json"),
        (LAST / "training_state.json", _truncate, "not valid JSON"),
        (LAST / "softprompt.json", _truncate, "not valid JSON"),
        (LAST / "adapter_config.json", lambda p: p.write_bytes(b"\x00\xff" * 10), "not valid JSON"),
    ],
)
def test_resume_from_a_corrupt_checkpoint_names_the_file(finished, file, damage, expected, capsys):
    out, argv = finished
    path = out / file
    original = path.read_bytes()
    try:
        damage(path)
        capsys.readouterr()
        assert main(argv + ["--resume"]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("softprompt train: error: ") and "Traceback" not in err[0]
        assert str(path) in err[0] and expected in err[0], err[0]
    finally:
        path.write_bytes(original)
    assert main(argv + ["--resume"]) == 0  # intact again: resumes (the run is finished, nothing to do)


@pytest.mark.parametrize(
    "damage, without_checksum, expected",
    [
        (_flip_byte, False, "checksum does not match softprompt.json"),
        (_truncate, False, "checksum does not match softprompt.json"),
        (_truncate, True, "not a readable safetensors file"),
        (_bad_header, True, "not a readable safetensors file"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "eval", "generate"])
def test_corrupt_adapter_is_named_by_every_command(
    finished, run, damage, without_checksum, expected, command, tmp_path, capsys
):
    out, _ = finished
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "default", adapter, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    if without_checksum:  # a PEFT adapter has no softprompt.json: the safetensors header must catch it
        (adapter / "softprompt.json").unlink()
    damage(adapter / "adapter_model.safetensors")
    argv = {
        "inspect": ["inspect", str(adapter)],
        "eval": ["eval", "--model", run.model, "--adapter", str(adapter), "--data", run.data],
        "generate": ["generate", "--model", run.model, "--adapter", str(adapter), "hello"],
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(adapter / "adapter_model.safetensors") in err[0] and expected in err[0], err
