"""The benchmark harness works: its quick mode (tiny random model) writes every section with positive
numbers, ratios computed from its own figures, and the report. No timing target is asserted here."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "research.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_every_section_is_there(quick_run):
    result, _ = quick_run
    for section in ("meta", "training", "inference", "mixed", "classification", "targets"):
        assert section in result, section
    meta = result["meta"]
    assert meta["mode"] == "quick" and meta["settings"]["threads"] >= 1
    for key in ("cpu", "torch", "transformers", "peft", "logical_cpus"):
        assert meta["machine"][key]


def test_training_rows(quick_run):
    rows = quick_run[0]["training"]["rows"]
    configs = {(r["method"], r["num_virtual_tokens"], r["dtype"]) for r in rows}
    assert configs == {
        (m, n, d)
        for m, n in [("prompt_tuning", 8), ("prompt_tuning", 20), ("prefix_tuning", 20)]
        for d in ("fp32", "bf16")
    }
    for r in rows:
        for key in ("softprompt_ms", "peft_ms", "ratio", "softprompt_peak_mib", "peft_peak_mib", "memory_ratio"):
            assert positive(r[key]), (key, r)
        assert close(r["ratio"], r["softprompt_ms"] / r["peft_ms"])
        assert close(r["memory_ratio"], r["softprompt_peak_mib"] / r["peft_peak_mib"])
        assert len(r["softprompt_runs_ms"]) == len(r["peft_runs_ms"]) == quick_run[0]["meta"]["settings"]["repeats"]
        # Median of the timed runs.
        assert close(sorted(r["softprompt_runs_ms"])[len(r["softprompt_runs_ms"]) // 2], r["softprompt_ms"])
        # Both systems did the same computation: same adapter weights, same batch, same first loss.
        assert math.isclose(r["first_loss_softprompt"], r["first_loss_peft"], rel_tol=1e-2)


def test_inference_rows(quick_run):
    rows = quick_run[0]["inference"]["rows"]
    assert {r["task"].split()[0] for r in rows} == {"forward", "generate"}
    for r in rows:
        for key in ("bare_ms", "softprompt_none_ms", "softprompt_ms", "peft_ms", "ratio_vs_peft"):
            assert positive(r[key]), (key, r)
        runs = r["runs_ms"]
        n = r["num_virtual_tokens"]
        assert len({len(v) for v in runs.values()}) == 1  # every system timed in every round

        def paired(a, b, runs=runs):  # median over rounds of the per-round ratio
            return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

        assert close(r["overhead_vs_bare"], paired(f"softprompt_pt{n}", "bare") - 1)
        assert close(r["peft_overhead_vs_bare"], paired(f"peft_pt{n}", "bare") - 1)
        assert close(r["ratio_vs_peft"], paired(f"softprompt_pt{n}", f"peft_pt{n}"))
        assert close(r["overhead_vs_bare_of_medians"], r["softprompt_ms"] / r["bare_ms"] - 1)
        ratios = [x / y - 1 for x, y in zip(runs[f"softprompt_pt{n}"], runs["bare"])]
        low, high = r["overhead_vs_bare_ci95"]  # a bootstrap of the median: inside the observed ratios, around it
        assert min(ratios) - 1e-9 <= low <= r["overhead_vs_bare"] + 1e-9
        assert r["overhead_vs_bare"] - 1e-9 <= high <= max(ratios) + 1e-9
        assert close(statistics.median(runs["bare"]), r["bare_ms"])
    for r in rows:
        if r["task"].startswith("generate"):
            assert r["rows_identical_to_peft"] == 1.0  # same adapter, same greedy tokens as PEFT
            assert r["bare_identical"]


def test_paired_ratio_interval_narrows_with_rounds_and_is_reproducible():
    import random

    from research.harness import paired_ratio, paired_ratio_ci

    rng = random.Random(1)
    base = [1.0 + rng.random() for _ in range(200)]  # slow drift across rounds, cancelled by pairing
    noisy = [b * (1.03 + rng.gauss(0, 0.05)) for b in base]
    few, many = paired_ratio_ci(noisy[:11], base[:11]), paired_ratio_ci(noisy, base)
    assert few == paired_ratio_ci(noisy[:11], base[:11])  # seeded: the same rounds give the same interval
    assert few[0] <= paired_ratio(noisy[:11], base[:11]) <= few[1]
    assert many[0] <= 1.03 <= many[1]  # the true ratio is inside
    assert many[1] - many[0] < (few[1] - few[0]) / 2  # 18x the rounds: a much narrower interval


def test_mixed_rows(quick_run):
    mixed = quick_run[0]["mixed"]
    rows = {r["adapters"]: r for r in mixed["rows"]}
    assert sorted(rows) == [1, 4, 16]
    tokens = mixed["requests"] * mixed["new_tokens"]
    for k, r in rows.items():
        for key in ("softprompt_tokens_per_s", "peft_tokens_per_s", "speedup_vs_peft", "softprompt_vs_single"):
            assert positive(r[key]), (key, r)
        assert close(r["softprompt_tokens_per_s"], tokens / (r["softprompt_ms"] / 1000))
        runs, single = r["runs_ms"], rows[1]["runs_ms"]["softprompt"]
        # throughput ratios: median over rounds of the paired per-round time ratios
        assert close(r["speedup_vs_peft"], statistics.median(p / o for p, o in zip(runs["peft"], runs["softprompt"])))
        assert close(r["softprompt_vs_single"], statistics.median(s / o for s, o in zip(single, runs["softprompt"])))
        assert close(r["speedup_vs_peft_of_medians"], r["softprompt_tokens_per_s"] / r["peft_tokens_per_s"])
        assert close(
            r["softprompt_vs_single_of_medians"], r["softprompt_tokens_per_s"] / rows[1]["softprompt_tokens_per_s"]
        )
        assert r["peft_calls"] == k  # PEFT runs one group per adapter
    assert rows[1]["softprompt_vs_single"] == 1.0


def test_classification_rows(quick_run):
    cls = quick_run[0]["classification"]
    rows = {r["method"]: r for r in cls["rows"]}
    assert set(rows) == {"score", "generate_match"}
    for r in rows.values():
        assert positive(r["ms_per_100"])
        assert 0.0 <= r["accuracy"] <= 1.0
    assert rows["score"]["invalid"] == 0  # scoring always returns one of the labels
    assert close(cls["generate_vs_score"], rows["generate_match"]["ms_per_100"] / rows["score"]["ms_per_100"])


def test_targets_and_report(quick_run):
    result, markdown = quick_run
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 4
    for t in result["targets"]:
        assert isinstance(t["met"], bool) and math.isfinite(t["value"])
    for heading in (
        "## 1. Training step",
        "## 2. Inference",
        "## 3. Mixed adapters",
        "## 4. Classification cost",
        "## Targets",
        "### Decode",
    ):
        assert heading in markdown


def test_decode_rows(quick_run):
    """research.decode: every system it ran has each stream count's figures, consistent with its own runs."""
    result, markdown = quick_run
    dec = result["decode"]
    rows = dec["rows"]
    assert {"softprompt eager", "softprompt static", "transformers generate"} <= set(rows)
    assert "softprompt compiled" in dec["not_available"]  # quick mode compiles nothing
    assert any(name.startswith("softprompt bf16") for name in rows)
    assert any(name.startswith("softprompt int8-weight") for name in [*rows, *dec["not_available"]])
    for name, cells in rows.items():
        assert set(cells) == {str(n) for n in dec["streams"]}, name
        for cell in cells.values():
            for key in ("tokens_per_s", "first_token_ms", "per_token_ms_median", "per_token_ms_p99"):
                assert positive(cell[key]), (name, key)
            assert cell["per_token_ms_p99"] >= cell["per_token_ms_median"]
            assert close(cell["tokens_per_s"], statistics.median(cell["runs_tokens_per_s"]))
    for name in dec["not_available"]:
        assert name not in rows and f"| {name} |" in markdown
    w = dec["weights_read"]
    assert close(w["ratio"], w["eager_float32_per_token_ms"] / w["read_ms"])
    assert w["eager_float32_per_token_ms"] == rows["softprompt eager"]["1"]["per_token_ms_median"]
    assert positive(dec["mixed"]["mixed_over_single"])


def test_attention_alternatives_are_exact_and_the_table_prints(capsys):
    """research.attention: the exact ways to attend to a prefix agree with the masked call; no mask does not."""
    from research import attention

    calls = attention.variants(batch=2, heads=6, length=8, prefix=4, head_dim=16, kv_heads=2)
    errors = attention.check_exact(calls)
    assert "grouped (softprompt)" in errors and max(errors.values()) < 1e-5
    assert float((calls["unmasked"]() - calls["masked"]()).abs().max()) > 1e-3
    assert (
        attention.main(
            [
                "--batch",
                "2",
                "--heads",
                "3",
                "--kv-heads",
                "1",
                "--length",
                "8",
                "--prefix",
                "4",
                "--head-dim",
                "16",
                "--threads",
                "1",
                "--rounds",
                "2",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| masked |" in table and "| padded queries |" in table and "| grouped (softprompt) |" in table
    assert "1.00x" in table
    assert (
        attention.main(
            [
                "--sweep",
                "--lengths",
                "4,8",
                "--batch",
                "2",
                "--heads",
                "3",
                "--kv-heads",
                "1",
                "--prefix",
                "4",
                "--head-dim",
                "16",
                "--threads",
                "1",
                "--rounds",
                "1",
            ]
        )
        == 0
    )
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
    ]
    assert len(rows) == 4  # 1 and 2 rows x 2 lengths
    with pytest.raises(SystemExit) as exit_info:
        attention.main(["--heads", "9", "--kv-heads", "2"])
    assert exit_info.value.code == 2 and "--kv-heads: expected a divisor of --heads (9)" in capsys.readouterr().err
