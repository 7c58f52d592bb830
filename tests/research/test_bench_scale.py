"""research.scale: the scale section covers issue 23's cases, and its table's ratios come from its own rows."""

from research import scale


def test_the_scale_section_has_the_issues_shape_and_every_kind_of_run():
    assert scale.SHAPES["300m"][:4] == (1024, 24, 16, 8) and scale.SHAPES["300m"][5] == 32000
    cases = {name: case for name, case in scale.SCALE.items() if case.shape == "300m"}
    kinds = {(c.system, c.method, c.dtype, c.checkpointing) for c in cases.values()}
    assert {
        ("softprompt", "prompt_tuning", "float32", False),
        ("softprompt", "prompt_tuning", "float32", True),
        ("softprompt", "prompt_tuning", "bfloat16", False),
        ("peft", "prompt_tuning", "float32", False),
        ("peft", "prompt_tuning", "float32", True),
        ("peft", "prefix_tuning", "float32", True),  # PEFT refuses this one
    } <= kinds
    assert {c.shape for c in scale.SCALE.values()} == {"300m", "1b"}


def row(case: str, peak_mib: float, estimate_mib: float, **extra) -> dict:
    spec = scale.CASES[case]
    return {
        "case": case,
        "system": spec.system,
        "method": spec.method,
        "dtype": spec.dtype,
        "checkpointing": spec.checkpointing,
        "shape_name": spec.shape,
        "measured": {"tensors": {"total_bytes": peak_mib * scale.MIB}},
        "estimate": {"total_bytes": estimate_mib * scale.MIB},
        "step_seconds": {"tensors": 2.0},
        **extra,
    }


def test_the_table_reports_ratios_to_the_plain_run_and_the_estimates_error():
    rows = [
        row("300m-prompt", 1000, 1100),
        row("300m-prompt-ckpt", 400, 380),
        row("300m-peft-prompt", 2000, 1100),
        row("300m-peft-prompt-ckpt", 1000, 380),
    ]
    refused = row("300m-peft-prefix-ckpt", 0, 0, refused="PREFIX_TUNING does not work with gradient checkpointing.")
    table = scale.markdown([*rows, refused]).splitlines()
    assert len(table) == 2 + 5
    assert "| 1100 (+10.0%) |" in table[2] and table[2].endswith("|  |")  # the plain run: no ratio to itself
    assert "| 380 (-5.0%) | 0.40x |" in table[3]
    assert "| n/a | 0.50x |" in table[5]  # PEFT's rows: no estimate (it models softprompt), ratio to PEFT's plain
    assert "refused: `PREFIX_TUNING does not work with gradient checkpointing.`" in table[6]


def test_quantized_bases_are_cases_of_the_scale_section_beside_peft_on_the_same_base():
    quantized = {(c.shape, c.system, c.quantize) for c in scale.SCALE.values() if c.quantize != "none"}
    assert {("300m", system, q) for system in ("softprompt", "peft") for q in ("int8", "nf4")} <= quantized
    assert {c.quantize for c in scale.QUANTIZED.values()} == {"int8", "nf4"}
    rows = [row("300m-prompt", 1000, 1100), row("300m-prompt-nf4", 500, 520, quantize="nf4")]
    assert "| 300m-prompt-nf4 | softprompt | nf4 | no | 500 |" in scale.markdown(rows)


def test_one_case_builder_serves_plain_quantized_and_peft_cases(monkeypatch, tmp_path):
    """`scale.build` gives a loss whose gradient reaches only the adapter, for each system, plain and int8."""
    import pytest

    pytest.importorskip("bitsandbytes")
    import torch

    monkeypatch.setitem(scale.SHAPES, "tiny", (64, 2, 4, 2, 128, 100))
    for case in (
        scale.Case("tiny"),
        scale.Case("tiny", checkpointing=True),
        scale.Case("tiny", system="peft"),
        scale.Case("tiny", quantize="int8"),
        scale.Case("tiny", system="peft", quantize="int8"),
    ):
        folder = None
        if case.quantize != "none":
            folder = str(tmp_path / f"{case.system}-{case.quantize}")
            scale.save_base(case, folder)
        loss_fn, params, _ = scale.build(case, folder)
        ids, labels = scale.job_batch(100)
        loss_fn(ids, labels).backward()
        assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), case
        assert sum(p.numel() for p in params) == scale.TOKENS * 64, case  # the prompt's embeddings only
