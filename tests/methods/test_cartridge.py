"""Cartridges (PEFT's CARTRIDGE): parity with PEFT, frozen attention-sink tokens, mixed batches, CLI, bad input."""

import json

import httpx
import pytest
import torch
from peft import CartridgeConfig, TaskType
from safetensors.torch import load_file

from peft_parity import (
    INPUT,
    MASK,
    assert_greedy_matches_peft,
    decoder_ids,
    halve_prompt,
    labels_for,
    ours_over,
    peft_forward,
    peft_from,
    peft_pair,
)
from softprompt.adapters.peft_format import CONFIG_FILE
from softprompt.cli.app import main
from softprompt.engine.activations import text_kv
from softprompt.engine.tokens import pad_batch
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.methods import PEFT_TYPES
from softprompt.server import ServerSettings, create_app
from softprompt.training.loop import train

from serving import ServerThread, lively_model, offline_model, run_concurrently
from tiny import FAMILIES, save_tiny_checkpoint, tiny_base, tiny_model
from toy_data import assert_resume_is_bit_identical, toy_job, toy_rows, write_csv

N_TOKENS, N_FROZEN = 5, 2


def peft_cartridge(family, tmp_path):
    """A PEFT cartridge (saved by PEFT, reloaded) and ours loaded from PEFT's files."""
    task = TaskType.SEQ_2_SEQ_LM if family == "t5" else TaskType.CAUSAL_LM
    config = CartridgeConfig(task_type=task, num_virtual_tokens=N_TOKENS, num_frozen_tokens=N_FROZEN)
    return peft_pair(tiny_base(family), family, config, tmp_path, "c", halve_prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_cartridge_loads_with_its_logits_and_loss(family, tmp_path):
    peft_model, ours = peft_cartridge(family, tmp_path)
    adapter = ours.get_adapter("c")
    assert adapter.config.num_frozen_tokens == N_FROZEN and adapter.frozen.shape[0] == N_FROZEN
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="c", decoder_input_ids=decoder_ids(family)).logits
    torch.testing.assert_close(got, peft_forward(peft_model, family).logits, atol=1e-5, rtol=1e-5)
    labels = labels_for(family)
    expected = peft_forward(peft_model, family, labels=labels).loss
    with torch.no_grad():
        loss = ours(INPUT, MASK, adapters="c", labels=labels).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_greedy_decoding_of_peft_forward(family, tmp_path):
    peft_model, ours = peft_cartridge(family, tmp_path)
    assert_greedy_matches_peft(peft_model, ours, "c", family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["random", "text"])
def test_our_cartridge_loads_in_peft(family, init, tmp_path):
    base = tiny_base(family)
    ours = ours_over(base, family)
    text = {"init_text": "the long document"} if init == "text" else {}
    ours.add_adapter(
        "c", method="cartridge", num_virtual_tokens=N_TOKENS, num_frozen_tokens=N_FROZEN, seed=3, init=init, **text
    )
    ours.save_adapter("c", tmp_path / "c")
    written = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    assert (written["peft_type"], written["num_frozen_tokens"]) == ("CARTRIDGE", N_FROZEN)
    peft_model = peft_from(base, tmp_path / "c")
    assert peft_model.prompt_encoder["default"].num_frozen_tokens == N_FROZEN
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="c", decoder_input_ids=decoder_ids(family)).logits
    torch.testing.assert_close(got, peft_forward(peft_model, family).logits, atol=1e-5, rtol=1e-5)
    # and back: the file we wrote loads in softprompt to the same adapter
    again = ours_over(base, family)
    again.load_adapter(str(tmp_path / "c"), name="c")
    torch.testing.assert_close(again.get_adapter("c").materialized(), ours.get_adapter("c").materialized().cpu())


def test_text_init_is_the_frozen_model_s_cache_of_that_text():
    model = tiny_model("llama")
    model.add_adapter("c", method="cartridge", num_virtual_tokens=4, init_text="abcd")
    ids = model._tokenize_plain("abcd")[:4]
    assert len(ids) == 4
    cache = text_kv(model.base, model.quirks, model.cache_arg, ids)
    for (key, value), (k, v) in zip(model.get_adapter("c").kv_prefix(), cache):
        torch.testing.assert_close(key, k)
        torch.testing.assert_close(value, v)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_frozen_tokens_get_no_gradient_and_do_not_move(family):
    model = tiny_model(family)
    adapter = model.add_adapter(
        "c", method="cartridge", num_virtual_tokens=N_TOKENS, num_frozen_tokens=N_FROZEN, seed=0
    )
    adapter.requires_grad_(True)  # what --init-from does to a loaded adapter: the frozen rows must stay frozen
    before = adapter.materialized().clone()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.1, weight_decay=0.1)
    loss = model(INPUT, MASK, adapters="c", labels=labels_for(family)).loss
    loss.backward()
    assert [name for name, _ in adapter.named_parameters()] == ["trainable"]
    assert not adapter.frozen.requires_grad and adapter.frozen.grad is None
    assert adapter.trainable.grad is not None and adapter.trainable.grad.abs().sum() > 0
    optimizer.step()
    after = adapter.materialized()
    assert torch.equal(after[:N_FROZEN], before[:N_FROZEN])
    assert not torch.equal(after[N_FROZEN:], before[N_FROZEN:])


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_with_prompt_and_prefix_tuning_gives_each_row_its_solo_result(family):
    model = tiny_model(family)
    model.add_adapter("cart", method="cartridge", num_virtual_tokens=6, num_frozen_tokens=1, seed=1)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, init_text="classify", seed=2)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=3, seed=3)
    rows = [[20, 30, 40, 50, 60], [21, 31, 41], [22, 32, 42, 52], [23, 33]]
    names = ["cart", "pt", "prefix", "cart"]
    ids, mask = pad_batch(rows, pad=0, side="left")
    decoder = torch.tensor([[0, 5, 6]] * len(rows)) if family == "t5" else None
    with torch.no_grad():
        together = model(ids, mask, adapters=names, decoder_input_ids=decoder).logits
        for i, (row, name) in enumerate(zip(rows, names)):
            alone = model(
                torch.tensor([row]), adapters=name, decoder_input_ids=None if decoder is None else decoder[:1]
            ).logits[0]
            got = together[i] if family == "t5" else together[i][mask[i] == 1]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
    texts = ["hello there", "a", "soft prompts", "xyz!"]
    generated = model.generate(texts, adapters=names, max_new_tokens=5)
    assert generated == [model.generate([t], adapters=[n], max_new_tokens=5)[0] for t, n in zip(texts, names)]


def test_train_method_cartridge_from_the_command_line(tmp_path, capsys):
    path = save_tiny_checkpoint("llama", tmp_path / "model")
    rows = ["text,label"] + [
        f"{'sunny happy' if i % 2 else 'rain sad'} {i},{'pos' if i % 2 else 'neg'}" for i in range(24)
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", path, "--method", "cartridge", "--data", str(tmp_path / "train.csv")]
    args += [
        "--label-column",
        "label",
        "--num-virtual-tokens",
        "4",
        "--num-frozen-tokens",
        "1",
        "--init-text",
        "weather",
    ]
    args += ["--epochs", "1", "--batch-size", "8", "--lr", "0.1", "--seed", "0", "--output", str(out)]
    assert main(args) == 0
    saved = out / "default"
    assert json.loads((saved / CONFIG_FILE).read_text())["peft_type"] == "CARTRIDGE"
    model = tiny_model("llama")
    model.add_adapter(
        "start", method="cartridge", num_virtual_tokens=4, num_frozen_tokens=1, init_text="weather", seed=0
    )
    trained = model.load_adapter(str(saved), name="trained")
    start, end = model.get_adapter("start").materialized(), trained.materialized()
    assert torch.equal(end[:1], start[:1]) and not torch.equal(end[1:], start[1:])
    capsys.readouterr()
    assert main(["inspect", str(saved)]) == 0
    assert "cartridge stores keys/values per layer" in capsys.readouterr().out


@pytest.mark.parametrize("frozen", [-1, 4])
def test_num_frozen_tokens_out_of_range_names_the_flag(frozen, tmp_path, capsys):
    model = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="num_frozen_tokens"):
        model.add_adapter("c", method="cartridge", num_virtual_tokens=4, num_frozen_tokens=frozen)
    path = save_tiny_checkpoint("gpt2", tmp_path / "model")
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    capsys.readouterr()  # the checkpoint's save progress
    args = ["train", "--model", path, "--method", "cartridge", "--data", str(tmp_path / "train.csv")]
    assert main([*args, "--num-virtual-tokens", "4", "--num-frozen-tokens", str(frozen)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-frozen-tokens" in err[0], err


def test_unsupported_peft_type_names_it_and_the_supported_ones(tmp_path, capsys):
    model = tiny_model("llama")
    model.add_adapter("c", method="cartridge", num_virtual_tokens=4)
    model.save_adapter("c", tmp_path / "c")
    config = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(SoftPromptError) as err:
        model.load_adapter(str(tmp_path / "c"), name="d")
    message = str(err.value)
    assert "\n" not in message and "'LORA'" in message
    assert all(t in message for t in PEFT_TYPES) and len(PEFT_TYPES) == 7  # every supported one, named
    path = save_tiny_checkpoint("llama", tmp_path / "model")
    capsys.readouterr()
    assert main(["generate", "--model", path, "--adapter", str(tmp_path / "c"), "hi"]) == 2  # one line here too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peft_type='LORA'" in err[0] and "MULTITASK_PROMPT_TUNING" in err[0], err


def test_server_batches_cartridges_with_other_adapters_each_row_as_offline(tmp_path):
    model = lively_model()
    model.add_adapter("cart", method="cartridge", num_virtual_tokens=6, init_text="a long document", seed=1)
    model.add_adapter("cart2", method="cartridge", num_virtual_tokens=3, num_frozen_tokens=0, init="random", seed=2)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=3)
    paths = {name: str(tmp_path / name) for name in ("cart", "cart2", "pt")}
    for name, path in paths.items():
        model.save_adapter(name, path)
    reference = offline_model(paths)
    settings = ServerSettings(adapters=paths, max_batch_size=8, batch_window_ms=5, max_tokens_limit=50)
    names = ["cart", "cart2", "pt", "tiny-gpt2"] * 2
    bodies = [
        {"model": name, "prompt": f"Request {i}: tell me", "max_tokens": 6, "temperature": 0}
        for i, name in enumerate(names)
    ]
    with ServerThread(create_app(lively_model(), settings)) as server:
        cards = {card["id"]: card for card in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert cards["cart"]["method"] == "cartridge"
        responses = run_concurrently(server.url, [("POST", "/v1/completions", b) for b in bodies], concurrency=8)
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        adapter = None if body["model"] == "tiny-gpt2" else body["model"]
        want = reference.generate([body["prompt"]], adapters=[adapter], max_new_tokens=6)[0]
        assert response.json()["choices"][0]["text"] == want


def cartridge_run(tmp_path, output, **extra):
    data = write_csv(tmp_path / "toy.csv", toy_rows(24))
    return toy_job(
        data,
        output,
        {
            "method": "cartridge",
            "num_virtual_tokens": 4,
            "num_frozen_tokens": 1,
            "init_text": "xyz abc",
            "weight_decay": 0.01,
        },
        **extra,
    )


@pytest.mark.usefixtures("one_thread")  # bit-identical resume
def test_resume_and_init_from_keep_the_frozen_tokens(tmp_path):
    full = train(cartridge_run(tmp_path, tmp_path / "full"), model=tiny_model("llama"), progress=False)

    assert_resume_is_bit_identical(
        lambda out, **kw: cartridge_run(tmp_path, out, **kw), full, lambda: tiny_model("llama")
    )
    weights = "default/adapter_model.safetensors"

    source = load_file(tmp_path / "full" / weights)["prompt_embeddings"]
    warm = train(
        cartridge_run(tmp_path, tmp_path / "warm", init_from=str(tmp_path / "full" / "default")),
        model=tiny_model("llama"),
        progress=False,
    )
    table = load_file(warm.adapters["default"].path / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(table[:1], source[:1]) and not torch.equal(table[1:], source[1:])
