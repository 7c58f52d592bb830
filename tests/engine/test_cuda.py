"""The engine on a CUDA GPU (``-m cuda``; scripts/gpu_check.sh runs them): CPU/CUDA parity, bfloat16 weights,
mixed-adapter batches, checkpointing and server generation. Every test skips where CUDA is unavailable."""

from __future__ import annotations

import pytest
import torch

from softprompt import SoftPromptModel
from softprompt.engine.tokens import pad_batch

from serving import ServerThread, lively_model
from tiny import CAUSAL

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]

ROWS = [[20, 30, 40, 50, 60, 70, 80], [21, 31, 41], [22, 32, 42, 52, 62], [23, 33, 43, 53]]
NAMES = ["pt", "prefix", "ptune", None]


def with_adapters(family: str, device: str, dtype: torch.dtype = torch.float32) -> SoftPromptModel:
    """A lively tiny model (large logit gaps: greedy choices survive float noise) with one adapter per method."""
    model = lively_model(family)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=3, seed=2)
    model.add_adapter("ptune", method="p_tuning", num_virtual_tokens=2, seed=3)
    model.base.to(dtype)
    return model.to(device)


@pytest.mark.parametrize("family", CAUSAL)
def test_cuda_logits_equal_cpu_logits(family):
    ids, mask = pad_batch(ROWS, pad=0, side="left")
    with torch.no_grad():
        cpu = with_adapters(family, "cpu")(ids, mask, adapters=NAMES).logits
        cuda = with_adapters(family, "cuda")(ids, mask, adapters=NAMES).logits
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu()[mask == 1], cpu[mask == 1], atol=1e-4, rtol=1e-4)


def test_bfloat16_weights_train_float32_adapters_on_cuda():
    ids, mask = pad_batch(ROWS, pad=0, side="left")
    labels = ids.masked_fill(mask == 0, -100)
    full = with_adapters("llama", "cuda")
    half = with_adapters("llama", "cuda", torch.bfloat16)
    assert next(half.base.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        reference = full(ids, mask, adapters=NAMES).logits
        got = half(ids, mask, adapters=NAMES).logits.float()
    assert (got - reference)[mask == 1].abs().max() <= 0.05 * reference.abs().max()
    half(ids, mask, adapters=NAMES, labels=labels).loss.backward()
    for name in ("pt", "prefix", "ptune"):
        grads = [p.grad for p in half.adapters[name].parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and g.device.type == "cuda" for g in grads)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", CAUSAL)
def test_mixed_adapter_generation_on_cuda_equals_rows_alone_and_the_cpu(family):
    texts = ["hello there", "a", "soft prompts", "xyz!"]
    model = with_adapters(family, "cuda")
    together = model.generate(texts, adapters=NAMES, max_new_tokens=6)
    alone = [model.generate([t], adapters=[n], max_new_tokens=6)[0] for t, n in zip(texts, NAMES)]
    assert together == alone
    assert together == with_adapters(family, "cpu").generate(texts, adapters=NAMES, max_new_tokens=6)


@pytest.mark.skipif(
    not hasattr(SoftPromptModel, "gradient_checkpointing"), reason="this engine has no gradient checkpointing"
)
@pytest.mark.parametrize("family", CAUSAL)
def test_checkpointed_gradients_equal_plain_ones_on_cuda(family):
    ids, mask = pad_batch(ROWS, pad=0, side="left")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = with_adapters(family, "cuda")
        model.train()
        model.gradient_checkpointing = checkpointing
        model(ids, mask, adapters=NAMES, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.adapters.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_server_generates_on_cuda_as_the_model_does():
    from softprompt.server import ServerSettings, create_app

    model = with_adapters("gpt2", "cuda")
    expected = model.generate(["served on a gpu"], adapters=["prefix"], max_new_tokens=6)[0]
    with ServerThread(create_app(model, ServerSettings(batch_window_ms=1))) as server, server.client() as client:
        body = {"model": "prefix", "prompt": "served on a gpu", "max_tokens": 6, "temperature": 0}
        got = client.post("/v1/completions", json=body).json()
    assert got["choices"][0]["text"] == expected
    assert model.device.type == "cuda"
