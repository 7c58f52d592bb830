"""Resident adapters bounded by bytes (--max-adapter-bytes) as well as by count."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from softprompt.errors import ConfigError
from softprompt.server import ServerSettings, create_app
from softprompt.server.metrics import Metrics
from softprompt.server.registry import AdapterRegistry, adapter_bytes, read_frozen
from softprompt.server.schemas import APIError

from serving import ServerThread, lively_model, offline_model, save_adapters

C = "/v1/completions"


def costs(paths: dict[str, str]) -> dict[str, int]:
    model = lively_model()
    return {name: adapter_bytes(read_frozen(model, path), model.shape, model.dtype) for name, path in paths.items()}


def test_adapter_bytes_counts_parameters_and_prompt_keys_values():
    model = lively_model()  # gpt2: 2 layers, hidden 32, 4 heads (kv heads 4, head_dim 8), float32
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=5)
    params = 5 * 32 * 4
    kv = 2 * 2 * 4 * 8 * 5 * 4
    assert adapter_bytes(model.adapters["pt"], model.shape, model.dtype) == params + kv
    assert adapter_bytes(model.adapters["pt"], model.shape, torch.bfloat16) == params + kv // 2


def test_least_recently_used_adapters_are_evicted_down_to_the_byte_bound(tmp_path):
    paths = save_adapters(tmp_path, names=("a", "b", "c"))  # prompt tuning, 2, 3 and 4 virtual tokens
    cost = costs(paths)
    assert cost["a"] < cost["b"] < cost["c"]
    reference = offline_model(paths)
    settings = ServerSettings(adapter_dir=str(tmp_path), max_adapter_bytes=cost["b"] + cost["c"], batch_window_ms=1)
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:

        def ask(name):
            got = client.post(C, json={"model": name, "prompt": "bytes", "max_tokens": 4, "temperature": 0}).json()
            assert got["choices"][0]["text"] == reference.generate(["bytes"], adapters=[name], max_new_tokens=4)[0]
            cards = client.get("/v1/models").json()["data"]
            text = client.get("/metrics").text
            samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
            held = {s.name: s.value for s in samples if not s.labels}
            per_adapter = {
                s.labels["adapter"]: s.value for s in samples if s.name == "softprompt_adapter_resident_bytes"
            }
            resident = {c["id"] for c in cards if c["parent"] and c["resident"]}
            assert held["softprompt_adapter_bytes"] == sum(cost[n] for n in resident)
            assert per_adapter == {n: cost[n] for n in resident}  # one series per resident adapter, evicted ones gone
            return resident

        assert ask("a") == {"a", "b"}  # c did not fit beside them at start
        assert ask("c") == {"a", "c"}  # b was the least recently used; a + c fit
        assert ask("b") == {"b", "c"}  # b + c is the bound exactly: a leaves
        assert ask("a") == {"a", "b"}  # c leaves (the least recently used), b + a fit


def test_an_adapter_in_use_is_never_evicted_for_bytes(tmp_path):
    paths = save_adapters(tmp_path, names=("a", "b", "c"))
    cost = costs(paths)
    settings = ServerSettings(adapter_dir=str(tmp_path), max_adapter_bytes=cost["a"] + cost["c"], adapter_wait_s=0.05)
    registry = AdapterRegistry(lively_model(), settings, "base", Metrics())
    registry.bootstrap()
    a, b, c = (registry.entries[n] for n in "abc")
    assert (a.resident, b.resident, c.resident) == (True, True, False)

    async def scenario():
        await registry.acquire(a)
        await registry.acquire(b)
        with pytest.raises(APIError) as busy:  # both pinned: c waits, then 503
            await registry.acquire(c)
        assert busy.value.status == 503 and "--max-adapter-bytes" in busy.value.message
        assert a.resident and b.resident and not c.resident
        registry.release(b)
        await registry.acquire(c)  # b is idle now: evicted; a (in use) stays
        assert a.resident and c.resident and not b.resident

    asyncio.run(scenario())


def test_an_adapter_above_the_byte_bound_is_refused_naming_the_flag(tmp_path):
    paths = save_adapters(tmp_path, names=("a", "b"))
    cost = costs(paths)
    settings = ServerSettings(adapters={"b": paths["b"]}, max_adapter_bytes=cost["a"])
    with pytest.raises(ConfigError, match=r"--adapter b: needs \d+ bytes resident, above --max-adapter-bytes"):
        create_app(lively_model(), settings)
    # From --adapter-dir it is skipped with a warning; the one that fits is served.
    registry = AdapterRegistry(
        lively_model(), ServerSettings(adapter_dir=str(tmp_path), max_adapter_bytes=cost["a"]), "x"
    )
    registry.bootstrap()
    assert set(registry.entries) == {"a"}
    with pytest.raises(ConfigError, match="--max-adapter-bytes: expected a positive number of bytes"):
        ServerSettings(max_adapter_bytes=0).validate()
