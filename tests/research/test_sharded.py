"""research.sharded: each sharding's launch config and estimate, and result rows kept per (sharding, case)."""

import json

import pytest

from research import sharded


def test_each_sharding_launches_the_tests_cpu_config():
    assert {s: p.name for s, p in sharded.CONFIGS.items()} == {
        "fsdp": "cpu_gloo_fsdp_2proc.yaml",
        "zero3": "cpu_gloo_deepspeed_2proc.yaml",
    }
    assert all(p.exists() for p in sharded.CONFIGS.values())


@pytest.mark.parametrize("sharding", sharded.SHARDINGS)
def test_the_estimate_is_the_per_process_job_of_its_sharding(sharding):
    job = sharded.estimate("60m", sharding).job
    assert (job["sharding"], job["processes"], job["device"]) == (sharding, 2, "cpu")


def test_zero3_rows_are_added_beside_the_fsdp_rows_and_fsdp_rows_keep_their_form():
    fsdp = {"case": "60m"}  # as written before ZeRO-3 was measured: no "sharding" key
    rows = {sharded.row_key(r): r for r in [{"sharding": "zero3", "case": "60m"}, {"case": "150m"}, fsdp]}
    assert [sharded.row_key(r) for r in sharded.ordered(rows)] == [("fsdp", "60m"), ("fsdp", "150m"), ("zero3", "60m")]
    assert sharded.ordered(rows)[0] == fsdp


def test_the_stored_results_have_both_shardings():
    rows = json.loads((sharded.ROOT / "research" / "results" / "sharded.json").read_text())
    assert {sharded.row_key(r) for r in rows} >= {("fsdp", "60m"), ("zero3", "60m")}
