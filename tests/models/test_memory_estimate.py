"""`softprompt.estimate_memory` and ``softprompt estimate-memory``: the arithmetic on small configs, what
autograd really saves on a tiny model, the JSON output and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import softprompt
from softprompt.cli import main
from softprompt.models.memory import layer_activation_bytes

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
)


def small(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SMALL, **overrides})


def estimate(config=None, **job):
    return softprompt.estimate_memory(config or small(), **{"device": "cpu", **job})


def test_weights_are_every_parameter_and_buffer_at_the_dtype_size():
    model = LlamaForCausalLM(small())
    count = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert estimate().parameters == count
    assert estimate(dtype="float32").weights_bytes == 4 * count
    assert estimate(dtype="bfloat16").weights_bytes == 2 * count
    assert estimate(dtype="float16").weights_bytes == 2 * count


def test_total_is_the_sum_of_the_parts_and_adapters_cost_16_bytes_per_parameter():
    e = estimate(num_virtual_tokens=10)
    assert e.adapter_parameters == 10 * 64  # prompt tuning: one hidden-size row per virtual token
    assert e.adapter_bytes == 16 * 10 * 64  # float32 parameters, gradients and AdamW's two moments
    assert e.total_bytes == e.weights_bytes + e.activations_bytes + e.adapter_bytes + e.runtime_bytes
    cuda = estimate(num_virtual_tokens=10, device="cuda")
    assert cuda.runtime_bytes - e.runtime_bytes == 512 << 20  # the CUDA context


def test_activations_scale_linearly_in_batch():
    # prefix tuning has no batch-1 prompt pass, so every term is proportional to the batch
    one, two = (estimate(method="prefix_tuning", batch_size=b, max_length=32).activations_bytes for b in (2, 4))
    assert two == 2 * one


def test_activations_scale_linearly_in_length_apart_from_the_mask():
    dims = dict(batch=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, dtype_bytes=4)
    short = sum(layer_activation_bytes(queries=64, keys=64, masked=False, **dims))
    long = sum(layer_activation_bytes(queries=128, keys=128, masked=False, **dims))
    assert long == 2 * short
    # the attention mask is queries x keys: a little more than linear
    short_m, long_m = (sum(layer_activation_bytes(queries=t, keys=t, **dims)) for t in (64, 128))
    assert 2 * short_m < long_m < 2.3 * short_m
    # and the job's activations grow with the length
    a, b = (estimate(max_length=t).activations_bytes for t in (64, 128))
    assert 1.5 * a < b < 2.3 * a


def test_checkpointing_lowers_activations_and_bfloat16_halves_them_roughly():
    plain = estimate(batch_size=8, max_length=256)
    checkpointed = estimate(batch_size=8, max_length=256, gradient_checkpointing=True)
    assert checkpointed.activations_bytes < 0.5 * plain.activations_bytes
    half = estimate(batch_size=8, max_length=256, dtype="bfloat16")
    assert 0.5 * plain.activations_bytes < half.activations_bytes < 0.8 * plain.activations_bytes  # norms stay fp32


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharding_divides_the_weights_by_the_process_count(sharding):
    full = estimate().weights_bytes
    assert estimate(processes=4, sharding=sharding).weights_bytes == -(-full // 4)
    assert estimate(processes=4, sharding="none").weights_bytes == full  # DDP: every process holds them all
    assert estimate(processes=4, sharding=sharding).runtime_bytes > estimate().runtime_bytes  # gathered units


@pytest.mark.parametrize("vocab", [256, 8192])
def test_sharding_gathers_the_largest_unit_twice(vocab):
    """A sharded step holds the largest unit whole twice at once (all-gather buffer + unsharded copy), and with a
    large vocabulary that unit is the embedding or head, not a layer: at 60M parameters (hidden 512, vocabulary
    32000) modelling two layers left the estimate 17% under the measured FSDP peak (research/sharded.py)."""
    config = small(vocab_size=vocab)
    layer = sum(t.numel() for t in LlamaForCausalLM(config).model.layers[0].state_dict().values())
    gathered = 2 * 4 * max(layer, vocab * SMALL["hidden_size"])
    assert (vocab * SMALL["hidden_size"] > layer) == (vocab == 8192)  # both cases: a layer, then the table
    sharded = estimate(config, processes=2, sharding="fsdp").runtime_bytes
    assert sharded - estimate(config, processes=2).runtime_bytes == gathered


def test_zero3_keeps_every_linear_input():
    """DeepSpeed's ZeRO-3 swaps F.linear for an autograd function that saves each linear's input even when its weight
    is frozen: per layer the attention norm's output (q/k/v), the MLP norm's (gate/up) and the down projection's, in
    the text pass and the prompt's own pass. Modelled as FSDP, the estimate was 11% under the measured ZeRO-3 peak at
    60M parameters (research/sharded.py --sharding zero3)."""
    job = dict(batch_size=3, max_length=32, num_virtual_tokens=5, processes=2)
    fsdp, zero3 = estimate(**job, sharding="fsdp"), estimate(**job, sharding="zero3")
    per_token = (2 * SMALL["hidden_size"] + SMALL["intermediate_size"]) * 4
    assert zero3.activations_bytes - fsdp.activations_bytes == SMALL["num_hidden_layers"] * (3 * 32 + 5) * per_token
    assert zero3.runtime_bytes - fsdp.runtime_bytes == 3 * 32 * per_token  # one text layer's backward transients
    assert zero3.weights_bytes == fsdp.weights_bytes
    one = {**job, "processes": 1}  # one process shards nothing: no DeepSpeed linear
    assert estimate(**one, sharding="zero3").activations_bytes == estimate(**one).activations_bytes


def test_int8_and_nf4_store_the_linear_weights_at_a_quarter_and_an_eighth():
    # a small vocabulary so that the quantized linear layers hold nearly all parameters
    config = small(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=32)
    full = estimate(config).weights_bytes
    assert 0.24 < estimate(config, quantize="int8").weights_bytes / full < 0.27
    assert 0.12 < estimate(config, quantize="nf4").weights_bytes / full < 0.14


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_activations_match_what_autograd_saves(method):
    """The formula against the bytes autograd saves in softprompt's own training forward (multi-head
    attention, so the key/value cache is the saved keys/values)."""
    config = small(num_key_value_heads=4)
    batch, length, labels_per_row, tokens = 2, 48, 8, 6
    torch.manual_seed(0)
    model = softprompt.SoftPromptModel(LlamaForCausalLM(config))
    model.add_adapter("a", method=method, num_virtual_tokens=tokens, init="random")
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    labels = torch.full_like(ids, -100)
    labels[:, -labels_per_row:] = ids[:, -labels_per_row:]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, adapters="a", labels=labels)
    predicted = estimate(
        config,
        method=method,
        num_virtual_tokens=tokens,
        batch_size=batch,
        max_length=length,
        label_tokens=labels_per_row,
    ).activations_bytes
    assert predicted == pytest.approx(sum(saved.values()), rel=0.05)


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def model_dir(tmp_path):
    small().save_pretrained(tmp_path)
    return str(tmp_path)


def test_cli_json_has_the_total_and_each_part(model_dir, capsys):
    assert (
        main(
            [
                "estimate-memory",
                "--model",
                model_dir,
                "--batch-size",
                "4",
                "--max-length",
                "64",
                "--dtype",
                "bfloat16",
                "--gradient-checkpointing",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    parts = ("weights_bytes", "activations_bytes", "adapter_bytes", "runtime_bytes")
    assert out["total_bytes"] == sum(out[p] for p in parts)
    assert out["fits"] == {"24GB": True, "40GB": True, "48GB": True, "80GB": True, "141GB": True}
    assert out["job"]["dtype"] == "bfloat16" and out["job"]["gradient_checkpointing"] is True
    expected = softprompt.estimate_memory(
        model_dir, batch_size=4, max_length=64, dtype="bfloat16", gradient_checkpointing=True
    )
    assert out["total_bytes"] == expected.total_bytes


def test_cli_text_lists_the_parts_and_the_gpus(model_dir, capsys):
    assert main(["estimate-memory", "--model", model_dir]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "total" in out
    assert "fits: 24 GB yes" in out and "141 GB yes" in out


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--dtype", "fp8"], "--dtype"),
        (["--method", "lora"], "--method"),
        (["--quantize", "int4"], "--quantize"),
        (["--sharding", "ddp"], "--sharding"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_flags_fail_in_one_line_naming_the_flag(model_dir, capsys, args, named):
    assert main(["estimate-memory", "--model", model_dir, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_a_folder_without_config_json_is_one_line_naming_the_file(tmp_path, capsys):
    assert main(["estimate-memory", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err


def test_a_cached_builtin_name_reads_its_checkpoint_config(tmp_path, monkeypatch, capsys):
    small().save_pretrained(tmp_path)
    monkeypatch.setattr("softprompt.models.memory.is_cached", lambda name: True)
    monkeypatch.setattr("softprompt.models.memory.model_dir", lambda name: tmp_path)
    assert main(["estimate-memory", "--model", "smollm2-135m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == estimate().parameters


def test_an_uncached_builtin_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("softprompt.models.memory.is_cached", lambda name: False)
    monkeypatch.setattr("softprompt.models.memory.hub_answers", lambda repo: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    assert main(["estimate-memory", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model 'smollm2-135m'" in err and "not reachable" in err
