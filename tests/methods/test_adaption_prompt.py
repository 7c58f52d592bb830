"""Adaption prompts (PEFT's ADAPTION_PROMPT, LLaMA-Adapter): parity with PEFT on every family it supports, files
both ways, zero-init gates, mixed batches with the other methods, decoding, training, CLI, server, bad input."""

import json

import httpx
import pytest
import torch
from peft import AdaptionPromptConfig, TaskType
from safetensors.torch import load_file
from transformers import MistralConfig, MistralForCausalLM

from peft_parity import INPUT, MASK, assert_greedy_matches_peft, ours_over, peft_forward, peft_from, peft_pair
from softprompt import SoftPromptModel
from softprompt.adapters.export import prompt_embeddings
from softprompt.adapters.peft_format import CONFIG_FILE
from softprompt.cli.app import main
from softprompt.engine.decode import feed_next
from softprompt.engine.scoring import score_ids
from softprompt.engine.tokens import pad_batch
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.server import ServerSettings, create_app
from softprompt.training.loop import train

from serving import ServerThread, lively_model, offline_model, run_concurrently
from tiny import VOCAB, save_tiny_checkpoint, tiny_base, tiny_model, tiny_tokenizer
from toy_data import assert_resume_is_bit_identical, toy_job, toy_rows, write_csv

PEFT_FAMILIES = ["llama", "mistral", "gpt2"]  # PEFT's TRANSFORMERS_MODEL_CONFIG for adaption prompts
N_TOKENS, N_LAYERS = 3, 2
LABELS = INPUT.masked_fill(INPUT < 40, -100)


def base_of(family: str):
    if family != "mistral":
        return tiny_base(family)
    torch.manual_seed(0)
    config = MistralConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return MistralForCausalLM(config).eval()


def set_gates(adapter, values) -> None:
    with torch.no_grad():
        adapter.gates.copy_(torch.tensor(values, dtype=adapter.gates.dtype))


def open_gates(peft_model) -> None:
    """PEFT starts its gates at zero, where every adapter is the base model."""
    for name, param in peft_model.named_parameters():
        if name.endswith("adaption_gate"):
            param.fill_(0.7)


def peft_ap_pair(family, tmp_path, layers=N_LAYERS):
    """A PEFT adaption prompt with open gates (saved by PEFT, reloaded) and ours loaded from PEFT's files."""
    base = base_of(family)
    config = AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=N_TOKENS, adapter_layers=layers)
    return (base, *peft_pair(base, family, config, tmp_path, "ap", open_gates))


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_peft_adaption_prompt_loads_with_its_logits_and_loss(family, tmp_path):
    base, peft_model, ours = peft_ap_pair(family, tmp_path)
    adapter = ours.get_adapter("ap")
    assert (adapter.config.num_virtual_tokens, adapter.config.adapter_layers) == (N_TOKENS, N_LAYERS)
    expected = peft_forward(peft_model, family).logits
    peft_loss = peft_forward(peft_model, family, labels=LABELS).loss
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="ap").logits
        bare = ours(INPUT, MASK).logits
        loss = ours(INPUT, MASK, adapters="ap", labels=LABELS).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (bare - expected).abs().max() > 1e-2  # the gated prompts do change the output
    torch.testing.assert_close(loss, peft_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_greedy_generation_matches_greedy_decoding_of_peft_forward(family, tmp_path):
    _, peft_model, ours = peft_ap_pair(family, tmp_path)
    assert_greedy_matches_peft(peft_model, ours, "ap", family)


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_our_adaption_prompt_loads_in_peft_and_back(family, tmp_path):
    base = base_of(family)
    ours = ours_over(base, family)
    adapter = ours.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=N_TOKENS, adapter_layers=1, seed=3)
    set_gates(adapter, [0.9])
    ours.save_adapter("ap", tmp_path / "ap")
    written = json.loads((tmp_path / "ap" / CONFIG_FILE).read_text())
    assert (written["peft_type"], written["adapter_len"], written["adapter_layers"]) == ("ADAPTION_PROMPT", 3, 1)
    assert "num_virtual_tokens" not in written
    expected = peft_forward(peft_from(base, tmp_path / "ap"), family).logits
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="ap").logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    again = ours_over(base, family)
    loaded = again.load_adapter(str(tmp_path / "ap"), name="ap")
    assert torch.equal(loaded.prompts, adapter.prompts.detach()) and torch.equal(loaded.gates, adapter.gates.detach())


def test_a_new_adapter_is_the_base_model_and_its_gates_learn_first():
    model = tiny_model("llama")
    adapter = model.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=4, adapter_layers=2, seed=0)
    assert adapter.prompts.shape == (2, 4, 32) and torch.equal(adapter.gates, torch.zeros(2))
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT, MASK, adapters="ap").logits, model(INPUT, MASK).logits)
    model(INPUT, MASK, adapters="ap", labels=LABELS).loss.backward()
    # zero-init attention: a closed gate passes no gradient to its prompt, but gets one itself
    assert adapter.gates.grad is not None and bool((adapter.gates.grad != 0).all())
    assert adapter.prompts.grad is not None and not adapter.prompts.grad.any()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_batch_with_every_method_gives_each_row_its_solo_result(family):
    model = tiny_model(family)
    set_gates(
        model.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=3, adapter_layers=2, seed=1), [0.5, -0.8]
    )
    set_gates(model.add_adapter("ap1", method="adaption_prompt", num_virtual_tokens=5, adapter_layers=1, seed=4), [1.0])
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, init_text="classify", seed=2)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=3, seed=3)
    model.add_adapter("cart", method="cartridge", num_virtual_tokens=2, seed=5)
    rows = [[20, 30, 40, 50, 60], [21, 31, 41], [22, 32, 42, 52], [23, 33], [24, 34, 44], [25, 35, 45, 55]]
    names = ["ap", "pt", "ap1", "prefix", None, "cart"]
    ids, mask = pad_batch(rows, pad=0, side="left")
    with torch.no_grad():
        together = model(ids, mask, adapters=names).logits
        for i, (row, name) in enumerate(zip(rows, names)):
            alone = model(torch.tensor([row]), adapters=name).logits[0]
            torch.testing.assert_close(together[i][mask[i] == 1], alone, atol=1e-5, rtol=1e-4)
    texts = ["hello there", "a", "soft prompts", "xyz!", "bare", "cart"]
    generated = model.generate(texts, adapters=names, max_new_tokens=5)
    assert generated == [model.generate([t], adapters=[n], max_new_tokens=5)[0] for t, n in zip(texts, names)]
    assert generated[0] != model.generate([texts[0]], max_new_tokens=5)[0]  # the gated prompt is attended throughout


def test_decode_states_with_gated_rows_select_repeat_and_merge_as_each_row_alone():
    model = tiny_model("llama")
    set_gates(
        model.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=3, adapter_layers=2, seed=1), [0.7, 0.9]
    )
    set_gates(model.add_adapter("ap1", method="adaption_prompt", num_virtual_tokens=5, adapter_layers=1, seed=2), [1.2])
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=2, seed=3)
    rows, names = [[5, 6, 7, 8], [11, 12], [13, 14, 15]], ["ap", "pt", "ap1"]

    def alone(i):
        ids, mask = pad_batch([rows[i]], 0, side="left")
        return model.prefill(ids, mask, [names[i]])

    ids, mask = pad_batch(rows[:2], 0, side="left")
    state = model.prefill(ids, mask, names[:2])
    ids, mask = pad_batch(rows[2:], 0, side="left")
    state.merge(model.prefill(ids, mask, names[2:]))  # rows without (pt) and with another layer set (ap1) join
    singles = [alone(i) for i in range(3)]
    for step in (20, 21):
        feed_next(model, state, [0, 1, 2], torch.tensor([step] * 3))
        for single in singles:
            feed_next(model, single, [0], torch.tensor([step]))
        for i, single in enumerate(singles):
            torch.testing.assert_close(state.logits[i], single.logits[0], atol=1e-5, rtol=1e-5)
    feed_next(model, state, [0, 2], torch.tensor([30, 30]))  # the pt row leaves
    feed_next(model, singles[2], [0], torch.tensor([30]))
    torch.testing.assert_close(state.logits[1], singles[2].logits[0], atol=1e-5, rtol=1e-5)
    # scoring repeats each row's state once per candidate label
    ids, mask = pad_batch(rows, 0, side="left")
    together = score_ids(model, ids, mask, names, [[40], [41, 42]])
    for i in range(3):
        one = score_ids(model, torch.tensor([rows[i]]), torch.ones(1, len(rows[i])), [names[i]], [[40], [41, 42]])
        torch.testing.assert_close(together[i], one[0], atol=1e-5, rtol=1e-5)


def test_inspect_names_an_adaption_prompt_and_export_refuses_it(tmp_path, capsys):
    model = tiny_model("llama")
    set_gates(model.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=3, adapter_layers=2), [0.25, -0.5])
    model.save_adapter("ap", tmp_path / "ap")
    assert main(["inspect", str(tmp_path / "ap")]) == 0
    out = capsys.readouterr().out
    assert "adaption_prompt" in out and "3 virtual tokens, 194 parameters" in out
    assert "adaption prompt in the top 2 layers; gates 0.25, -0.5" in out
    for source in (tmp_path / "ap", model):
        with pytest.raises(SoftPromptError, match="adds gated attention inside layers"):
            prompt_embeddings(source, "ap")


def test_unsupported_family_and_too_many_layers_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SoftPromptError) as err:
        tiny_model("bloom").add_adapter("ap", method="adaption_prompt")
    message = str(err.value)
    assert "'bloom'" in message and all(f in message for f in PEFT_FAMILIES) and "\n" not in message
    with pytest.raises(ConfigError, match="adapter_layers: 3 exceeds the model's 2 layers"):
        tiny_model("llama").add_adapter("ap", method="adaption_prompt", adapter_layers=3)
    eager = tiny_base("llama")
    eager.set_attn_implementation("eager")
    with pytest.raises(SoftPromptError, match="attention interface"):
        SoftPromptModel(eager, tiny_tokenizer()).add_adapter("ap", method="adaption_prompt")
    path = save_tiny_checkpoint("bloom", tmp_path / "model")
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    capsys.readouterr()
    args = ["train", "--model", path, "--method", "adaption_prompt", "--data", str(tmp_path / "train.csv")]
    assert main([*args, "--output", str(tmp_path / "run")]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bar
    assert len(err) == 1 and "'bloom'" in err[0] and "llama" in err[0], err


def test_train_method_adaption_prompt_from_the_command_line(tmp_path):
    path = save_tiny_checkpoint("llama", tmp_path / "model")
    data = write_csv(tmp_path / "toy.csv", toy_rows(16))
    out = tmp_path / "run"
    args = ["train", "--model", path, "--method", "adaption-prompt", "--data", data, "--label-column", "label"]
    args += ["--num-virtual-tokens", "4", "--adapter-layers", "2", "--epochs", "1", "--batch-size", "8"]
    assert main([*args, "--lr", "0.1", "--seed", "0", "--output", str(out)]) == 0
    saved = out / "default"
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert (config["peft_type"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 2)
    gates = [t for k, t in load_file(saved / "adapter_model.safetensors").items() if k.endswith("adaption_gate")]
    assert len(gates) == 2 and all(bool(g.abs().sum() > 0) for g in gates)  # trained away from zero


def adaption_run(tmp_path, output, **extra):
    return toy_job(
        write_csv(tmp_path / "toy.csv", toy_rows(24)),
        output,
        {"method": "adaption_prompt", "num_virtual_tokens": 3, "adapter_layers": 2},
        **extra,
    )


@pytest.mark.usefixtures("one_thread")  # bit-identical resume
def test_resume_is_bit_identical_and_init_from_continues(tmp_path):
    full = train(adaption_run(tmp_path, tmp_path / "full"), model=tiny_model("llama"), progress=False)

    assert_resume_is_bit_identical(
        lambda out, **kw: adaption_run(tmp_path, out, **kw), full, lambda: tiny_model("llama")
    )
    weights = "default/adapter_model.safetensors"

    source = load_file(tmp_path / "full" / weights)
    warm = train(
        adaption_run(tmp_path, tmp_path / "warm", init_from=str(tmp_path / "full" / "default"), epochs=1),
        model=tiny_model("llama"),
        progress=False,
    )
    after = load_file(warm.adapters["default"].path / "adapter_model.safetensors")
    assert after.keys() == source.keys() and all(not torch.equal(after[k], source[k]) for k in source)

    # a saved adapter of other layers than the job's: one line naming the tensor and both shapes
    other = adaption_run(tmp_path, tmp_path / "other", init_from=str(tmp_path / "full" / "default"), adapter_layers=1)
    with pytest.raises(ConfigError, match=r"--init-from .*: holds prompts \[2, 3, \d+\] \(this job: \[1, 3, \d+\]\)"):
        train(other, model=tiny_model("llama"), progress=False)


def test_server_batches_adaption_prompts_with_other_adapters_each_row_as_offline(tmp_path):
    model = lively_model()
    set_gates(
        model.add_adapter("ap", method="adaption_prompt", num_virtual_tokens=3, adapter_layers=2, seed=1), [0.6, 0.9]
    )
    set_gates(model.add_adapter("ap1", method="adaption_prompt", num_virtual_tokens=2, adapter_layers=1, seed=2), [1.5])
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=3)
    paths = {name: str(tmp_path / name) for name in ("ap", "ap1", "pt")}
    for name, path in paths.items():
        model.save_adapter(name, path)
    reference = offline_model(paths)
    settings = ServerSettings(adapters=paths, max_batch_size=8, batch_window_ms=5, max_tokens_limit=50)
    names = ["ap", "ap1", "pt", "tiny-gpt2"] * 2
    bodies = [
        {"model": name, "prompt": f"Request {i}: tell me", "max_tokens": 3 + i % 4, "temperature": 0}
        for i, name in enumerate(names)
    ]
    with ServerThread(create_app(lively_model(), settings)) as server:
        cards = {card["id"]: card for card in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert cards["ap"]["method"] == "adaption_prompt"
        responses = run_concurrently(server.url, [("POST", "/v1/completions", b) for b in bodies], concurrency=8)
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        adapter = None if body["model"] == "tiny-gpt2" else body["model"]
        want = reference.generate([body["prompt"]], adapters=[adapter], max_new_tokens=body["max_tokens"])[0]
        assert response.json()["choices"][0]["text"] == want
