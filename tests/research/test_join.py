"""research.join: a joining request's two calls (today) beside the padded fused call, on a tiny model."""

import pytest

from research import join

from tiny import tiny_model


def test_each_shape_times_todays_join_step_and_the_padded_fused_call():
    model = tiny_model("llama")
    row = join.measure(model, running=3, prompt=5, repeats=1, context=4)
    assert row["running"] == 3 and row["prompt_tokens"] == 5
    assert row["join_step_ms"] > row["step_ms"] > 0  # today: the prefill comes on top of the step
    assert row["fused_over_today"] == pytest.approx(row["fused_lower_bound_ms"] / row["join_step_ms"])
    table = join.markdown({"rows": [row]})
    assert table.splitlines()[2].startswith("| 3 | 5 |")
