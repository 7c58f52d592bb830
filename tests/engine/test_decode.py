"""The decoding rules `generate` and the server share: next token, stop rule, merging running batches."""

import pytest
import torch

from softprompt.adapters.peft_format import read_adapter
from softprompt.engine.adapter_name import ADAPTER_NAME_RULE, check_adapter_name
from softprompt.engine.decode import (
    MIN_SAMPLING_TEMPERATURE,
    Continuation,
    StopRule,
    feed_next,
    make_sampler,
    next_tokens,
)
from softprompt.engine.tokens import pad_batch

from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    m.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    m.add_adapter("p", method="prefix_tuning", num_virtual_tokens=5, seed=1)
    return m


def test_the_text_ends_before_the_earliest_stop_string_even_when_stops_overlap():
    rule = StopRule(None, frozenset(), 10, ("cd", "bc"))
    assert rule.cut("abcd") == ("a", True)
    assert rule.cut("abxd") == ("abxd", False)


def test_eos_ends_a_row_without_being_kept_and_max_new_tokens_ends_it_with_length():
    rule = StopRule(None, frozenset({0}), 2)
    row = Continuation()
    assert rule.add(row, 5) and row.finish is None
    assert not rule.add(row, 0) and row.finish == "stop" and row.tokens == [5]
    row = Continuation()
    rule.add(row, 5)
    rule.add(row, 6)
    assert row.finish == "length" and row.tokens == [5, 6]


def test_a_stop_string_wins_over_the_length_limit_and_cuts_the_text(model):
    tokenizer = model.tokenizer
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    rule = StopRule(tokenizer, frozenset(), len(ids), (text[-2:],))
    row = Continuation()
    for token in ids:
        rule.add(row, token)
    assert row.finish == "stop" and row.text == text[: text.index(text[-2:])]


def test_greedy_is_the_argmax_and_sampling_below_the_minimum_temperature_is_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert next_tokens(logits, None).tolist() == [1, 0]
    assert make_sampler(MIN_SAMPLING_TEMPERATURE / 2, seed=0) is None


def test_seeded_sampling_repeats_and_a_row_with_non_finite_logits_takes_its_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    first = next_tokens(logits, make_sampler(1.3, top_p=0.9, top_k=20, seed=5))
    assert torch.equal(first, next_tokens(logits, make_sampler(1.3, top_p=0.9, top_k=20, seed=5)))
    broken = logits.clone()
    broken[1] = float("nan")
    broken[1, 7] = 1.0
    got = next_tokens(broken, make_sampler(1.3, top_p=0.9, top_k=20, seed=5))
    assert int(got[1]) == int(broken[1].argmax())
    assert got[[0, 2, 3]].tolist() == first[[0, 2, 3]].tolist()  # the other rows' draws do not shift


def test_merged_states_decode_as_each_batch_alone(model):
    first = [[5, 6, 7, 8, 9, 10], [11, 12]]
    second = [[13, 14, 15]]
    ids_a, mask_a = pad_batch(first, 0, side="left")
    ids_b, mask_b = pad_batch(second, 0, side="left")
    a = model.prefill(ids_a, mask_a, ["a", "p"])
    b = model.prefill(ids_b, mask_b, [None])
    alone = model.prefill(ids_b, mask_b, [None])
    assert a.mergeable and b.mergeable
    a.merge(b)
    assert a.rows == 3
    torch.testing.assert_close(a.logits[2], alone.logits[0])
    tokens = torch.tensor([20, 21, 22])
    feed_next(model, a, [1, 2], tokens[[1, 2]], trim=True)  # the first row finished; its columns go
    feed_next(model, alone, [0], tokens[[2]])
    assert a.rows == 2
    torch.testing.assert_close(a.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_adapter_names_follow_one_rule():
    assert check_adapter_name("quotes-v2_1") is None
    for bad in ("", "-x", "a/b", "a" * 65, "nl\n", 5, None):
        assert check_adapter_name(bad).endswith(f"expected {ADAPTER_NAME_RULE}")
    assert len(check_adapter_name("/" * 5000)) < 200  # a client's name is cut in messages


def test_read_adapter_needs_only_the_model_shape(model, tmp_path):
    model.save_adapter("p", tmp_path / "p")
    adapter = read_adapter(tmp_path / "p", model.shape)
    assert adapter.adds == "kv" and adapter.num_virtual_tokens == 5
    assert "p" in model.adapters and len(model.adapters) == 2  # nothing registered
