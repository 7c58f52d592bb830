"""`softprompt train` warns, before loading the model, when estimate-memory says the job does not fit its device."""

from __future__ import annotations

import pytest

from softprompt.cli import main
from softprompt.cli import train as cli_train
from softprompt.models.memory import device_memory, estimate_memory

from tiny import save_tiny_checkpoint
from toy_data import toy_rows, write_csv


class Loaded(Exception):
    """Raised in place of training: the model would load here."""


def run_until_load(tmp_path, monkeypatch, memory: int | None) -> str:
    checkpoint = save_tiny_checkpoint("llama", tmp_path / "model")
    data = write_csv(tmp_path / "rows.csv", toy_rows(8))
    monkeypatch.setattr(cli_train, "device_memory", lambda device: memory)

    def loading(config):
        raise Loaded

    monkeypatch.setattr(cli_train, "train", loading)
    with pytest.raises(Loaded):
        main(
            ["train", "--model", checkpoint, "--data", data, "--text-column", "text", "--label-column", "label"]
            + ["--device", "cpu", "--num-virtual-tokens", "4", "--output", str(tmp_path / "out")]
        )
    return checkpoint


def test_train_warns_before_loading_when_the_estimate_exceeds_the_device(tmp_path, monkeypatch, capsys):
    checkpoint = run_until_load(tmp_path, monkeypatch, memory=1 << 20)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    estimate = estimate_memory(checkpoint, num_virtual_tokens=4, device="cpu").total_bytes
    assert lines == [
        f"warning: softprompt estimate-memory predicts {estimate / 2**30:.2f} GiB per process for this job, "
        "above the 0.00 GiB available memory of cpu; it may run out of memory "
        "(see `softprompt estimate-memory --help` for what lowers it)"
    ]


@pytest.mark.parametrize("memory", [1 << 40, None])
def test_train_is_quiet_when_the_job_fits_or_the_memory_is_unknown(tmp_path, monkeypatch, capsys, memory):
    run_until_load(tmp_path, monkeypatch, memory=memory)
    assert "warning:" not in capsys.readouterr().err


def test_device_memory_reads_the_cpu_available_ram():
    available = device_memory("cpu")
    assert available is not None and 0 < available < 1 << 50
    assert device_memory("meta") is None


def test_device_memory_reads_proc_meminfo_without_psutil(monkeypatch):
    import sys
    from pathlib import Path

    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo here")
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    assert abs(device_memory("cpu") - int(line.split()[1]) * 1024) < 1 << 30  # read moments apart
