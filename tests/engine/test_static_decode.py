"""Static decoding (a preallocated slot pool, optionally compiled) gives exactly the eager path's tokens.

`SoftPromptModel.decode` picks the path; "eager" is transformers' growing cache (`SoftPromptModel.advance`).
Every case decodes twice, eager and static, on the same model, and compares tokens, texts and finish reasons.
The model compiles only once in this file (`test_compiled_equals_eager`).
"""

import logging

import pytest
import torch

from softprompt import SoftPromptError
from softprompt.engine import static_decode
from softprompt.engine.decode import DecodeState, feed_next, next_tokens
from softprompt.engine.tokens import encode_texts
from softprompt.models.loading import load

from serving import lively_model
from tiny import save_tiny_checkpoint

STATIC = ["gpt2", "llama"]  # the causal tiny families a slot pool holds (gemma3: sliding layers; bloom: ALiBi)
PROMPTS = ["The first prompt, a long one", "a", "hello there", "x y z", "good morning to you", "q"]
ROWS = ["pt", None, "px", "mt:1", "cart", "ptu"]  # every input and kv method, a task of a multitask adapter, a bare row


def _model(family):
    model = lively_model(family)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    model.add_adapter("px", method="prefix_tuning", num_virtual_tokens=3, seed=2)
    model.add_adapter("ptu", method="p_tuning", num_virtual_tokens=5, seed=3)
    model.add_adapter("cart", method="cartridge", num_virtual_tokens=6, seed=4)
    model.add_adapter("mt", method="multitask_prompt_tuning", num_virtual_tokens=4, num_tasks=2, num_ranks=1, seed=5)
    model.decode = "static"
    return model


@pytest.fixture(scope="module", params=STATIC)
def model(request):
    return _model(request.param)


def _both(model, prompts, adapters, **options):
    """``generate`` eager and static; (eager, static) details."""
    out = []
    for mode in ("eager", "static"):
        model.decode = mode
        out.append(
            [
                (g.text, g.token_ids, g.finish_reason)
                for g in model.generate(prompts, adapters, return_details=True, **options)
            ]
        )
    model.decode = "static"
    return out


def _state(model, prompts, adapters, reserve=0):
    ids, mask = encode_texts(model.tokenizer, prompts, side="left")
    return static_decode.start(model, model.prefill(ids, mask, adapters), reserve)


def test_mixed_batch_greedy_equals_eager(model):
    assert isinstance(_state(model, PROMPTS, ROWS), static_decode.SlotState)  # the batch takes the slot pool
    eager, static = _both(model, PROMPTS, ROWS, max_new_tokens=12)
    assert static == eager
    assert len({tuple(t) for _, t, _ in eager}) > 1  # rows differ: a broken row mapping would show


def test_rows_finishing_at_different_times_and_stop_strings(model):
    model.decode = "eager"
    texts = model.generate(PROMPTS, ROWS, max_new_tokens=16)
    stop = [texts[0][3:5], texts[2][6:8]]  # stop strings that end two rows early, at different steps
    eager, static = _both(model, PROMPTS, ROWS, max_new_tokens=16, stop=stop)
    assert static == eager
    assert len({len(t) for _, t, _ in eager}) > 1  # rows left the batch at different steps


def test_sampling_equal_under_a_seed(model):
    eager, static = _both(model, PROMPTS[:4], ROWS[:4], max_new_tokens=10, do_sample=True, temperature=1.3, seed=5)
    assert static == eager


def _greedy(model, state, steps):
    """Greedy tokens of every row for ``steps`` steps, feeding them with `feed_next` (a row leaves after step 2)."""
    tokens = []
    for step in range(steps):
        picked = next_tokens(state.logits, None)
        tokens.append(picked.tolist())
        keep = list(range(state.rows)) if step != 2 else list(range(1, state.rows))
        feed_next(model, state, keep, picked[keep])
    return tokens


def test_pool_grows_when_a_row_passes_capacity_and_freed_slots_are_reused(model, monkeypatch):
    monkeypatch.setattr(static_decode, "MIN_CAPACITY", 16)
    prompts, rows = ["hi", "a", "yo"], ROWS[:3]
    model.decode = "eager"
    want = _greedy(model, _state(model, prompts, rows), 20)
    model.decode = "static"
    state = _state(model, prompts, rows)  # no reserve: the smallest capacity bucket
    assert isinstance(state, static_decode.SlotState)
    assert state.pool.capacity == 16
    assert _greedy(model, state, 20) == want
    assert state.pool.capacity == 32  # grew by copying
    # a freed slot takes a new row; the others decode on unchanged
    ids, mask = encode_texts(model.tokenizer, ["joining"], side="left")
    joining = model.prefill(ids, mask, ["px"])
    assert state.accepts(joining)
    state.merge(joining)
    assert state.slots == [1, 2, 0] and state.rows == 3


def test_unsupported_states_keep_the_eager_path():
    gemma = lively_model("gemma3")
    gemma.decode = "static"
    assert isinstance(_state(gemma, ["hi"], [None]), DecodeState)  # sliding-window cache layers
    bloom = lively_model("bloom")
    bloom.decode = "static"
    assert isinstance(_state(bloom, ["hi"], [None]), DecodeState)  # ALiBi: no position ids
    llama = lively_model("llama")
    llama.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=3, adapter_layers=1, seed=0)
    llama.decode = "static"
    assert isinstance(_state(llama, ["hi", "yo"], ["ap", None]), DecodeState)  # gated rows
    eager, static = _both(llama, ["hi", "yo"], ["ap", None], max_new_tokens=6)
    assert static == eager


def test_decode_option_is_validated(tmp_path):
    model = lively_model("llama")
    assert model.decode == "eager"  # the default (docs/engine.md: static was not measurably faster)
    with pytest.raises(SoftPromptError, match=r"^decode: expected one of eager, static, compiled, got 'fast'$"):
        model.decode = "fast"
    path = save_tiny_checkpoint("llama", tmp_path / "m")
    assert load(path, decode="compiled").decode == "compiled"
    with pytest.raises(SoftPromptError, match=r"^--decode: expected one of eager, static, compiled, got 'x'$"):
        load(path, decode="x")


def test_compile_failure_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    model = lively_model("llama")

    def broken(fn, **_):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    eager, _ = _both(model, PROMPTS[:3], None, max_new_tokens=6)
    model.decode = "compiled"
    with caplog.at_level(logging.WARNING, logger="softprompt.engine"):
        for _ in range(2):
            got = [
                (g.text, g.token_ids, g.finish_reason)
                for g in model.generate(PROMPTS[:3], return_details=True, max_new_tokens=6)
            ]
            assert got == eager
    lines = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert lines == ["decode=compiled: torch.compile failed (RuntimeError: no compiler here); decoding eagerly"]


def test_compiled_equals_eager(caplog):
    model = _model("llama")
    eager, _ = _both(model, PROMPTS, ROWS, max_new_tokens=8)
    model.decode = "compiled"
    ids, mask = encode_texts(model.tokenizer, PROMPTS, side="left")
    with caplog.at_level(logging.WARNING, logger="softprompt.engine"):
        state = static_decode.start(model, model.prefill(ids, mask, ROWS), 8)
        assert isinstance(state, static_decode.SlotState)
        tokens = _greedy(model, state, 8)
        got = model.generate(PROMPTS, ROWS, max_new_tokens=8, return_details=True)  # the same bucket: no recompiling
    failed = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    if state.pool.compiled:
        assert not failed  # compiled and ran
    else:
        assert len(failed) == 1  # no working compiler: eager, said once
    assert [(g.text, g.token_ids, g.finish_reason) for g in got] == eager
    model.decode = "eager"
    assert tokens == _greedy(model, static_decode.start(model, model.prefill(ids, mask, ROWS)), 8)


def test_every_bucket_compiles_past_dynamos_default_limit_of_eight(monkeypatch):
    """Every pool's step is one code object, which dynamo compiles at most 8 times by default and then runs eagerly
    with only a warning: ten buckets (slots 1-16 x two capacities) must each get their own compiled graph. The
    backend only counts graphs (dynamo's tracing and guards are real; inductor's code generation is left out)."""
    graphs: list[int] = []

    def counting(gm, _inputs):
        graphs.append(1)
        return gm.forward

    _count_graphs(monkeypatch, counting)
    model = lively_model("llama")
    model.decode = "compiled"
    long_prompt = " ".join(["abc"] * 30)  # past the first capacity bucket (64 columns)
    for prompt in ("xyz", long_prompt):
        for rows in (1, 2, 4, 8, 16):
            model.generate([prompt] * rows, max_new_tokens=2)
    assert len(graphs) >= 10


def test_models_never_share_a_compiled_step(monkeypatch):
    """The step skips dynamo's guards on the model's modules (they cost 3 ms a step), so each model must compile
    its own copy of the step: two models of one shape, one with a different normalisation epsilon (a module
    attribute the graph bakes in, guarded only by a module guard), each decode exactly as they do eagerly."""
    graphs: list[int] = []

    def counting(gm, _inputs):
        graphs.append(1)
        return gm.forward

    _count_graphs(monkeypatch, counting)
    models = [lively_model("llama"), lively_model("llama")]
    for module in models[1].base.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 5.0
    runs = {}
    for mode in ("eager", "compiled"):
        for i, model in enumerate(models):
            model.decode = mode
            runs[mode, i] = model.generate(PROMPTS[:3], max_new_tokens=6)
    assert runs["eager", 0] != runs["eager", 1]  # the epsilon changes the tokens
    assert runs["compiled", 0] == runs["eager", 0]
    assert runs["compiled", 1] == runs["eager", 1]
    assert len(graphs) == 4  # per model: its step (one bucket) and its prefill's head


def _count_graphs(monkeypatch, backend) -> None:
    """Compile with ``backend`` (dynamo's tracing and guards are real) from a fresh dynamo state."""
    real = torch.compile

    def compile_with(fn, mode=None, dynamic=None, options=None):
        return real(fn, backend=backend, dynamic=dynamic, options=options)

    monkeypatch.setattr(torch, "compile", compile_with)
    torch._dynamo.reset()


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_the_compile_options_are_ones_inductor_knows(device_type):
    """torch.compile checks inductor option names when it wraps the function (no device needed): CUDA's
    ``triton.cudagraphs`` (what ``mode="reduce-overhead"`` sets, which cannot be named beside options)."""
    assert callable(static_decode.compile_step(device_type))
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):
        torch.compile(lambda x: x, options={"triton.cudagraph": True})


def test_the_prefill_head_is_compiled_and_equals_the_eager_head(monkeypatch):
    """With decode="compiled" the prefill's last-position logits come from the model's compiled head (torchao's
    eager int8 head converts its whole weight per call), equal to the eager head's, for any number of rows."""
    graphs: list[int] = []

    def counting(gm, _inputs):
        graphs.append(1)
        return gm.forward

    _count_graphs(monkeypatch, counting)
    model = lively_model("llama")
    ids, mask = encode_texts(model.tokenizer, PROMPTS, side="left")
    eager = model.prefill(ids, mask, None).logits
    model.decode = "compiled"
    for rows in (6, 2, 3):  # a second shape marks the rows dynamic; the third reuses that graph
        torch.testing.assert_close(model.prefill(ids[:rows], mask[:rows], None).logits, eager[:rows])
    assert len(graphs) == 2  # the first row count's graph, then one with dynamic rows
