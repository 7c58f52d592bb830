"""--quantize int8-weight: torchao's int8 weight-only quantization of a tiny llama's linear layers. It loads, computes
what the float32 base computes with torchao's dequantized weights (so greedy tokens match), stays close to the
unquantized base, passes gradients to a float32 adapter, saves and loads quantized; errors are one line."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt import load
from softprompt.cli import main
from softprompt.errors import SoftPromptError

from tiny import VOCAB, tiny_tokenizer

torchao = pytest.importorskip("torchao", reason="the quantize extra is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = 14  # 2 layers x (4 attention + 3 MLP projections); the LM head too over a 16-bit base (one more)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama", tie=False)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "tied", tie=True)


def tiny_llama(path, tie: bool) -> str:
    """A tiny llama with weights large enough for a prompt to move its outputs (tests/tiny.py's init is near-flat)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=tie,
    )
    base = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in base.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    base.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """Each int8 weight-only linear's weight as torchao restores it (int8 rows times one scale each)."""
    return {
        name: module.weight.dequantize().float()
        for name, module in model.base.named_modules()
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, torchao.quantization.Int8Tensor)
    }


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_weight_computes_the_dequantized_base_and_stays_close_to_float32(checkpoint, tmp_path):
    """Logits within 1e-4 of the float32 base holding torchao's dequantized weights (its kernel dequantizes inside
    the product), greedy tokens equal; against the unquantized base within 8% (measured 4.1%: each weight row is
    rounded to 1/127 of its largest value, 0.6% of the weight, compounding over the layers), and the adapter's
    gradient within 15% of the unquantized one (measured 11%)."""
    plain, quantized, reference = load(checkpoint), load(checkpoint, quantize="int8-weight"), load(checkpoint)
    weights = quantized_weights(quantized)
    assert len(weights) == LINEARS and quantized_weights(plain) == {}
    layers = dict(reference.base.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            assert 0 < distance(weight, layers[name].weight) < 0.01
            layers[name].weight.copy_(weight)
    plain.add_adapter("pt", num_virtual_tokens=4, seed=0)
    plain.save_adapter("pt", str(tmp_path / "pt"))
    ids = torch.randint(3, 250, (3, 12), generator=torch.Generator().manual_seed(0))
    logits, grads = {}, {}
    for key, model in (("plain", plain), ("quantized", quantized), ("reference", reference)):
        if key != "plain":
            model.load_adapter(str(tmp_path / "pt"), name="pt")
        with torch.no_grad():
            logits[key] = model(ids, adapters=["pt", None, "pt"]).logits
        model(ids, adapters="pt", labels=ids).loss.backward()
        grads[key] = model.get_adapter("pt").embedding.grad
    torch.testing.assert_close(logits["quantized"], logits["reference"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads["quantized"], grads["reference"], rtol=1e-3, atol=1e-5)
    assert 0 < distance(logits["quantized"], logits["plain"]) < 0.08
    assert 0 < distance(grads["quantized"], grads["plain"]) < 0.15
    prompts, adapters = ["xyz", "abc", "hello"], ["pt", None, "pt"]
    expected = reference.generate(prompts, adapters=adapters, max_new_tokens=6, return_details=True)
    got = quantized.generate(prompts, adapters=adapters, max_new_tokens=6, return_details=True)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]


def test_int8_weight_over_bfloat16_stays_close_to_float32(checkpoint):
    """The weights int8, everything else bfloat16: logits within 5% of float32 (measured 1%)."""
    plain, quantized = load(checkpoint), load(checkpoint, dtype="bfloat16", quantize="int8-weight")
    assert len(quantized_weights(quantized)) == LINEARS + 1
    assert quantized.base.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert distance(quantized(ids).logits.float(), plain(ids).logits) < 0.05


def test_a_checkpoint_saved_int8_weight_loads_quantized(checkpoint, tmp_path, monkeypatch, capsys):
    model = load(checkpoint, quantize="int8-weight")
    saved = tmp_path / "int8-weight"
    model.base.save_pretrained(saved)
    model.tokenizer.save_pretrained(saved)
    again = load(str(saved))  # no --quantize: config.json's quantization_config says how
    assert len(quantized_weights(again)) == LINEARS
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(SoftPromptError, match=r"^--quantize nf4: --model '.*' is already quantized \(torchao\)"):
        load(str(saved), quantize="nf4")
    assert main(["generate", "--model", str(saved), "--max-new-tokens", "2", "xyz"]) == 0
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: `import torchao` fails
    with pytest.raises(SoftPromptError, match=r"saved quantized by torchao\): needs torchao"):
        load(str(saved))


def test_a_tied_lm_head_is_untied_and_quantized_and_saves_that_way(tied_checkpoint, tmp_path):
    """transformers' torchao path leaves a head tied to the input embeddings unquantized; over a 16-bit base load
    unties it and quantizes it too, the input embeddings staying plain (prompt embeddings read them). Saved, it
    reloads the same way: logits equal. Over float32 the head stays tied and float."""
    tied = load(tied_checkpoint, quantize="int8-weight").base
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert type(tied.get_output_embeddings().weight) is torch.nn.Parameter
    plain, model = (
        load(tied_checkpoint, dtype="bfloat16"),
        load(tied_checkpoint, dtype="bfloat16", quantize="int8-weight"),
    )
    assert plain.base.get_output_embeddings().weight is plain.base.get_input_embeddings().weight
    head, embeddings = model.base.get_output_embeddings(), model.base.get_input_embeddings()
    assert isinstance(head.weight, torchao.quantization.Int8Tensor)
    assert type(embeddings.weight) is torch.nn.Parameter and embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(embeddings.weight, plain.base.get_input_embeddings().weight)
    assert 0 < distance(head.weight.dequantize().float(), plain.base.get_output_embeddings().weight.float()) < 0.01
    model.add_adapter("pt", num_virtual_tokens=4, seed=0)  # prompt tuning initialises from the embeddings
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        logits = model(ids, adapters=["pt", None]).logits
        assert 0 < distance(logits[1:].float(), plain(ids[1:]).logits.float()) < 0.08
    saved = tmp_path / "tied-int8-weight"
    model.base.save_pretrained(saved)
    model.tokenizer.save_pretrained(saved)
    model.save_adapter("pt", str(tmp_path / "pt"))
    again = load(str(saved), dtype="bfloat16")
    again.load_adapter(str(tmp_path / "pt"), name="pt")
    assert isinstance(again.base.get_output_embeddings().weight, torchao.quantization.Int8Tensor)
    assert again.base.get_output_embeddings().weight is not again.base.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(again(ids, adapters=["pt", None]).logits, logits)


def test_without_torchao_one_line_says_how_to_install(checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(SoftPromptError) as error:
        load(checkpoint, quantize="int8-weight")
    assert str(error.value) == (
        "--quantize int8-weight: needs torchao, which is not installed; pip install 'softprompt[quantize]'"
    )
    assert main(["generate", "--model", checkpoint, "--quantize", "int8-weight", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--quantize int8-weight" in err and "softprompt[quantize]" in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_estimate_memory_counts_the_int8_head_and_the_untied_embeddings(checkpoint, tied_checkpoint, tied, dtype):
    """estimate-memory's int8-weight weights equal the bytes the loaded base holds (int8 data + a scale per row for
    every linear layer, the LM head included over bfloat16, a tied head's embeddings kept beside it)."""
    from transformers import AutoConfig

    from softprompt import estimate_memory

    path = tied_checkpoint if tied else checkpoint
    model = load(path, dtype=dtype, quantize="int8-weight")
    held = 0
    for param in {id(p): p for p in model.base.parameters()}.values():
        if isinstance(param, torchao.quantization.Int8Tensor):
            held += param.qdata.numel() + param.scale.numel() * 4  # the estimate counts float32 scales
        else:
            held += param.numel() * param.element_size()
    held += sum(b.numel() * b.element_size() for b in model.base.buffers())
    estimate = estimate_memory(AutoConfig.from_pretrained(path), dtype=dtype, quantize="int8-weight", device="cpu")
    assert estimate.weights_bytes == pytest.approx(held, rel=0.01)
