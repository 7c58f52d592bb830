"""`softprompt.load`: built-in names and local paths first, a suggestion for a typo, a quick failure offline.

No test here reaches the network: name resolution is blocked by a fake `socket.getaddrinfo`, which
either records the call (and fails it as a machine without network would) or, where no network call is
allowed at all, is checked to have been called never.
"""

from __future__ import annotations

import socket
import time

import huggingface_hub
import pytest
import torch

import softprompt
from softprompt.errors import SoftPromptError
from softprompt.models import loading

from tiny import save_tiny_checkpoint


@pytest.fixture
def lookups(monkeypatch) -> list[str]:
    """Host names the code under test tried to resolve; every lookup fails as it does without network."""
    seen: list[str] = []

    def no_network(host, *args, **kwargs):
        seen.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return seen


@pytest.fixture
def hub_calls(monkeypatch) -> list[str]:
    """Names passed to the hub probe or to transformers' loaders (neither is reached for a typo)."""
    calls: list[str] = []

    def probe(repo_id: str) -> bool:
        calls.append(repo_id)
        return False

    def from_pretrained(path, *args, **kwargs):
        calls.append(str(path))
        raise OSError("not expected here")

    monkeypatch.setattr(loading, "hub_answers", probe)
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", from_pretrained)
    return calls


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("smollm2", "smollm2-135m"),
        ("SmolLM2-135M", "smollm2-135m"),
        ("gemma3", "gemma3-270m"),
        ("gemma-3-270m", "gemma3-270m"),
    ],
)
def test_a_typo_of_a_built_in_name_is_suggested_without_asking_the_hub(typo, meant, lookups, hub_calls):
    start = time.monotonic()
    with pytest.raises(SoftPromptError) as e:
        softprompt.load(typo)
    assert str(e.value) == (
        f"--model {typo!r}: not a built-in model, local directory or hub id; did you mean {meant!r}?"
    )
    assert time.monotonic() - start < 1
    assert hub_calls == [] and lookups == []


def test_a_real_hub_id_still_goes_to_the_hub(hub_calls):
    with pytest.raises(SoftPromptError, match="the Hugging Face hub .* is not reachable"):
        softprompt.load("HuggingFaceTB/SmolLM2-135M")
    assert hub_calls == ["HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"]  # the probe, then the cache


def test_a_typo_that_names_an_existing_directory_loads_the_directory(tmp_path, monkeypatch, lookups):
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint("gpt2", tmp_path / "smollm2")
    assert softprompt.load("smollm2").base.config.model_type == "gpt2"
    assert lookups == []


@pytest.mark.parametrize("name", ["softprompt-tests/no-such-model", "gpt2"])
def test_an_unreachable_hub_fails_at_once_on_one_line(name, lookups, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(SoftPromptError) as e:
        softprompt.load(name)
    assert time.monotonic() - start < 5  # huggingface_hub's own retries take about half a minute
    assert str(e.value) == (
        f"--model {name!r}: not a built-in model (smollm2-135m, gemma3-270m), local directory "
        "or cached hub model, and the Hugging Face hub (https://huggingface.co) is not reachable"
    )
    assert set(lookups) == {"huggingface.co"}  # the probe asked, once and without retries (they sleep 1+2+4+8 s)


def test_offline_mode_fails_at_once_without_a_lookup(lookups, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SoftPromptError, match=r"is not reachable \(HF_HUB_OFFLINE is set\)$"):
        softprompt.load("softprompt-tests/no-such-model")
    assert lookups == []


def test_a_model_in_the_hub_cache_loads_while_the_hub_is_unreachable(lookups, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--softprompt-tests--tiny"
    save_tiny_checkpoint("llama", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = softprompt.load("softprompt-tests/tiny")
    assert model.base.config.model_type == "llama"
    assert set(lookups) == {"huggingface.co"}


def test_a_local_checkpoint_directory_loads_without_the_network(tmp_path, lookups):
    path = save_tiny_checkpoint("t5", tmp_path / "tiny-t5")
    model = softprompt.load(path, dtype="bf16")
    assert model.base.config.is_encoder_decoder and model.base.dtype == torch.bfloat16
    assert lookups == []


def test_a_missing_local_path_names_it(lookups, tmp_path):
    with pytest.raises(SoftPromptError, match=r"--model '.*/absent': no such local directory"):
        softprompt.load(str(tmp_path / "absent"))
    assert lookups == []
