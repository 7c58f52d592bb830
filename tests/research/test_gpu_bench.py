"""research.gpu (the GPU benchmark of scripts/gpu_check.sh): its pure parts, and that it refuses without CUDA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from research import gpu

ROOT = Path(__file__).resolve().parents[2]


def test_training_batch_carries_loss_on_the_last_label_tokens_only():
    ids, labels = gpu.training_batch(vocab=50, batch=3, length=10, label_tokens=4, seed=1)
    assert ids.shape == labels.shape == (3, 10)
    assert (labels[:, :6] == -100).all() and torch.equal(labels[:, 6:], ids[:, 6:])
    assert ids.min() >= 3 and ids.max() < 50  # clear of the special ids
    assert torch.equal(ids, gpu.training_batch(50, 3, 10, 4, seed=1)[0])


def test_mixed_names_spread_rows_over_every_adapter():
    names = gpu.mixed_names(64, 8)
    assert len(names) == 64 and set(names) == {f"a{i}" for i in range(8)}
    assert all(len(set(names[i : i + 8])) == 8 for i in range(0, 64, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_benchmark_refuses_without_cuda(tmp_path):
    assert gpu.main(["--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_the_decode_part_times_every_system_against_one_read_of_the_weights():
    """The decode part on a tiny llama on the CPU (no compiling: that is the GPU's run)."""
    from tiny import tiny_base

    base = tiny_base("llama")
    table = gpu.decode_table(
        base, modes=("eager", "static"), new_tokens=4, repeats=1, transformers_compiled=False, bandwidth_gib=0.01
    )
    assert set(table["rows"]) == {"softprompt eager", "softprompt static", "transformers generate"}
    assert table["weights_read_ms"] > 0 and table["new_tokens"] == 4
    for row in table["rows"].values():
        assert row["per_token_ms_p99"] >= row["per_token_ms_median"] > 0
        assert row["over_weights_read"] == pytest.approx(row["per_token_ms_median"] / table["weights_read_ms"])
