"""CPT (PEFT's context-aware prompt tuning): parity with PEFT (logits, greedy text, loss, one training step),
files both ways, the context built from examples, mixed batches, training, CLI, server, bad input."""

import copy
import json

import httpx
import pytest
import torch
from peft import CPTConfig as PeftCPTConfig
from peft import TaskType, get_peft_model
from safetensors.torch import load_file

from peft_parity import INPUT, MASK, assert_greedy_matches_peft, ours_over, peft_forward, peft_from, peft_pair
from softprompt.adapters.peft_format import CONFIG_FILE, META_FILE, read_adapter
from softprompt.cli.app import main
from softprompt.data import Example, Template
from softprompt.engine.tokens import pad_batch
from softprompt.errors import ConfigError
from softprompt.methods.cpt import context_from_examples
from softprompt.server import ServerSettings, create_app
from softprompt.training.loop import train

from serving import ServerThread, lively_model, offline_model, run_concurrently
from tiny import CAUSAL, save_tiny_checkpoint, tiny_base, tiny_model, tiny_tokenizer
from toy_data import assert_resume_is_bit_identical, toy_job, toy_rows, write_csv

# Two examples written out: template 1, input 2, output template 3, label 4 (then 5..8 for the second).
IDS = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 22, 23, 24]
TYPES = [1, 2, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 5]
N = len(IDS)
HIDDEN = 32  # the tiny models' width
LABELS = INPUT.masked_fill(INPUT < 40, -100)  # the rows' own label tokens


def cpt_options(**extra):
    return {"cpt_token_ids": IDS, "cpt_tokens_type_mask": TYPES, **extra}


def peft_cpt_config(**extra):
    return PeftCPTConfig(task_type=TaskType.CAUSAL_LM, cpt_token_ids=IDS, cpt_tokens_type_mask=TYPES, **extra)


def peft_cpt(base, **extra):
    return get_peft_model(copy.deepcopy(base), peft_cpt_config(**extra))


def trained_delta(seed=0):
    """A delta inside PEFT's epsilon ball (PEFT projects before every forward), zero on label tokens."""
    torch.manual_seed(seed)
    delta = torch.randn(N, HIDDEN)
    delta = delta / delta.norm(dim=1, keepdim=True) * 0.8 * 0.1 * (HIDDEN / 2048) ** 0.5
    return delta * torch.tensor([t % 4 != 0 for t in TYPES]).float()[:, None]


def peft_cpt_pair(family, tmp_path):
    """A PEFT CPT adapter with a trained delta (saved by PEFT, reloaded) and ours loaded from PEFT's files."""

    def train_delta(peft_model):
        peft_model.prompt_encoder["default"].delta_embedding.weight.copy_(trained_delta())

    return peft_pair(tiny_base(family), family, peft_cpt_config(), tmp_path, "c", train_delta)


def peft_logits(peft_model):
    return peft_forward(peft_model, "causal").logits[:, N:]


@pytest.mark.parametrize("family", CAUSAL)
def test_peft_cpt_loads_with_its_logits_and_loss(family, tmp_path):
    peft_model, ours = peft_cpt_pair(family, tmp_path)
    adapter = ours.get_adapter("c")
    assert adapter.config.cpt_token_ids == IDS and adapter.num_virtual_tokens == N
    expected_loss = peft_forward(peft_model, family, labels=LABELS.clone()).loss
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="c").logits
        loss = ours(INPUT, MASK, adapters="c", labels=LABELS).loss
    torch.testing.assert_close(got, peft_logits(peft_model), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generation_matches_greedy_decoding_of_peft_forward(family, tmp_path):
    peft_model, ours = peft_cpt_pair(family, tmp_path)
    assert_greedy_matches_peft(peft_model, ours, "c", family)


@pytest.mark.parametrize("family", CAUSAL)
def test_our_cpt_loads_in_peft_and_back(family, tmp_path):
    base = tiny_base(family)
    ours = ours_over(base, family)
    adapter = ours.add_adapter("c", method="cpt", **cpt_options(opt_weighted_loss_type="decay"))
    with torch.no_grad():
        adapter.delta.copy_(trained_delta(1))
    ours.save_adapter("c", tmp_path / "c")
    written = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    assert (written["peft_type"], written["cpt_token_ids"], written["opt_weighted_loss_type"]) == ("CPT", IDS, "decay")
    peft_model = peft_from(base, tmp_path / "c")
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="c").logits
    torch.testing.assert_close(got, peft_logits(peft_model), atol=1e-5, rtol=1e-5)
    again = ours_over(base, family)
    loaded = again.load_adapter(str(tmp_path / "c"), name="c")
    torch.testing.assert_close(loaded.materialized(), adapter.materialized())
    assert loaded.config.opt_weighted_loss_type == "decay"


@pytest.mark.parametrize("weighting", [{}, {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5}])
def test_a_training_step_equals_peft_s_loss_gradient_mask_and_projection(weighting):
    """Loss (context labels weighted, the rows' labels), masked gradient and projection as PEFT trains."""
    base = tiny_base("llama")
    peft_model = peft_cpt(base, opt_projection_epsilon=0.05, **weighting)
    peft_encoder = peft_model.prompt_encoder["default"]
    ours = ours_over(base, "llama")
    adapter = ours.add_adapter("c", method="cpt", **cpt_options(opt_projection_epsilon=0.05, **weighting))
    torch.testing.assert_close(adapter.context, peft_encoder.embedding.weight)
    delta = trained_delta(2) * 0.5
    with torch.no_grad():
        peft_encoder.delta_embedding.weight.copy_(delta)
        adapter.delta.copy_(delta)
    expected = peft_model(input_ids=INPUT, attention_mask=MASK, labels=LABELS.clone()).loss
    loss = ours(INPUT, MASK, adapters="c", labels=LABELS).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    expected.backward()
    loss.backward()
    grad = adapter.delta.grad
    torch.testing.assert_close(grad, peft_encoder.delta_embedding.weight.grad, atol=1e-6, rtol=1e-4)
    assert grad[torch.tensor(TYPES) % 4 == 0].abs().sum() == 0 and grad.abs().sum() > 0
    with torch.no_grad():  # a big step, well outside the ball, then each projects
        peft_encoder.delta_embedding.weight.sub_(100 * peft_encoder.delta_embedding.weight.grad)
        adapter.delta.sub_(100 * grad)
    adapter.after_step()
    torch.testing.assert_close(adapter.delta, peft_encoder.get_projection(), atol=1e-6, rtol=1e-5)
    assert adapter.delta.norm(dim=1).max() <= 0.1 * (HIDDEN / 2048) ** 0.5 + 1e-6


def test_decay_weights_count_examples_back_from_the_row():
    model = tiny_model("llama")
    adapter = model.add_adapter(
        "c", method="cpt", **cpt_options(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    )
    targets, weights = adapter.prompt_targets()
    labelled = targets != -100
    assert targets[labelled].tolist() == [14, 22, 23]
    assert weights[labelled].tolist() == [0.25, 0.5, 0.5]


def test_context_from_examples_types_template_input_and_label():
    tokenizer = tiny_tokenizer()
    template = Template("Tweet: {text} Label: ")
    rows = [{"text": "aa", "y": "1"}, {"text": "bb", "y": "1"}, {"text": "cc", "y": "2"}]
    examples = [Example(template.render(r), {"1": "yes", "2": "no"}[r["y"]], r) for r in rows]

    def tokenize(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, types = context_from_examples(examples, template, 2, tokenize)
    # one example of each label: the first "yes" row, then the first "no" row
    assert tokenizer.decode(ids) == tokenizer.decode(tokenize("Tweet: aa Label: yes\nTweet: cc Label: no\n"))
    kinds = [t % 4 for t in types]
    assert sorted(set(types)) == [1, 2, 3, 4, 5, 6, 7, 8] and max(types) == 8
    first = tokenize("Tweet: ")
    assert types[: len(first)] == [1] * len(first) and kinds[len(first)] == 2
    label = tokenize("yes")
    start = types.index(4)
    assert ids[start : start + len(label)] == label and types.count(4) == len(label)


def test_mixed_batch_with_other_methods_gives_each_row_its_solo_result():
    model = tiny_model("llama")
    adapter = model.add_adapter("cpt", method="cpt", **cpt_options())
    with torch.no_grad():
        adapter.delta.copy_(trained_delta(3))
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, init_text="classify", seed=2)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=3, seed=3)
    rows = [[20, 30, 40, 50, 60], [21, 31, 41], [22, 32, 42, 52], [23, 33, 43]]
    names = ["cpt", "pt", "prefix", None]
    ids, mask = pad_batch(rows, pad=0, side="left")
    with torch.no_grad():
        together = model(ids, mask, adapters=names).logits
        for i, (row, name) in enumerate(zip(rows, names)):
            alone = model(torch.tensor([row]), adapters=name).logits[0]
            torch.testing.assert_close(together[i][mask[i] == 1], alone, atol=1e-5, rtol=1e-4)
    texts = ["hello there", "a", "soft prompts", "xyz!"]
    generated = model.generate(texts, adapters=names, max_new_tokens=5)
    assert generated == [model.generate([t], adapters=[n], max_new_tokens=5)[0] for t, n in zip(texts, names)]
    # a batch's loss averages every row's tokens: CPT rows add their context's label tokens, others do not
    labels = torch.tensor([[-100, -100, 40, 50, 60]])
    with torch.no_grad():
        cpt_alone = model(torch.tensor([rows[0]]), adapters="cpt", labels=labels).loss
        pt_alone = model(torch.tensor([rows[0]]), adapters="pt", labels=labels).loss
        both = model(torch.tensor([rows[0]] * 2), adapters=["cpt", "pt"], labels=labels.repeat(2, 1)).loss
    context_labels = int((adapter.prompt_targets()[0][1:] != -100).sum())
    expected = ((3 + context_labels) * cpt_alone + 3 * pt_alone) / (6 + context_labels)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)


def cpt_run(tmp_path, output, **extra):
    data = write_csv(tmp_path / "toy.csv", toy_rows(24))
    return toy_job(
        data,
        output,
        {"method": "cpt", "cpt_examples": 2, "opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5},
        **extra,
    )


@pytest.mark.usefixtures("one_thread")  # bit-identical resume
def test_training_builds_the_context_resumes_bit_identically_and_warm_starts(tmp_path):
    full = train(cpt_run(tmp_path, tmp_path / "full"), model=tiny_model("llama"), progress=False)
    trained = full.model.get_adapter("default")
    types = torch.tensor(trained.config.cpt_tokens_type_mask)
    assert trained.config.cpt_examples == 2 and max(types) == 8 and trained.num_virtual_tokens == len(types)

    assert_resume_is_bit_identical(lambda out, **kw: cpt_run(tmp_path, out, **kw), full, lambda: tiny_model("llama"))
    weights = "default/adapter_model.safetensors"

    # the last state: labels kept as written, every update inside its ball
    model = tiny_model("llama")
    last = read_adapter(tmp_path / "full" / "default" / "checkpoints" / "last", model.shape, resume=True)
    options = {k: v for k, v in last.config.to_dict().items() if k != "method"}
    assert torch.equal(last.context, model.add_adapter("start", method="cpt", **options).context)
    moved = last.delta.norm(dim=1)
    assert (moved <= last.epsilon + 1e-6).all()

    source = load_file(tmp_path / "full" / weights)["prompt_embeddings"]
    warm = train(
        cpt_run(tmp_path, tmp_path / "warm", init_from=str(tmp_path / "full" / "default")),
        model=tiny_model("llama"),
        progress=False,
    )
    table = load_file(warm.adapters["default"].path / "adapter_model.safetensors")["prompt_embeddings"]
    assert table.shape == source.shape and not torch.equal(table, source)


def test_train_method_cpt_from_the_command_line_and_inspect(tmp_path, capsys):
    path = save_tiny_checkpoint("llama", tmp_path / "model")
    rows = ["text,label"] + [
        f"{'sunny happy' if i % 2 else 'rain sad'} {i},{'pos' if i % 2 else 'neg'}" for i in range(16)
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", path, "--method", "cpt", "--data", str(tmp_path / "train.csv"), "--label-column"]
    args += ["label", "--template", "Text: {text} Label: ", "--cpt-examples", "2", "--epochs", "1"]
    args += ["--batch-size", "8", "--lr", "0.1", "--seed", "0", "--output", str(out)]
    assert main(args) == 0
    written = json.loads((out / "default" / CONFIG_FILE).read_text())
    assert written["peft_type"] == "CPT" and written["num_virtual_tokens"] == len(written["cpt_token_ids"])
    capsys.readouterr()
    assert main(["inspect", str(out / "default")]) == 0
    assert "cpt" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--cpt-token-ids", "5,6,7", "--cpt-tokens-type-mask", "1,2"], "--cpt-tokens-type-mask"),
        (["--cpt-token-ids", "5,6,7", "--cpt-mask", "1,1,1,1"], "--cpt-mask"),
        (["--cpt-token-ids", "5,x"], "--cpt-token-ids"),
        ([], "--cpt-token-ids"),
        (["--cpt-examples", "2", "--opt-loss-decay-factor", "1.5"], "--opt-loss-decay-factor"),
    ],
)
def test_bad_cpt_options_are_one_line_naming_the_flag(flags, named, tmp_path, capsys):
    path = save_tiny_checkpoint("gpt2", tmp_path / "model")
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    capsys.readouterr()  # the checkpoint's save progress
    args = ["train", "--model", path, "--method", "cpt", "--data", str(tmp_path / "train.csv"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


def test_cpt_refuses_encoder_decoder_models_and_a_missing_context():
    with pytest.raises(ConfigError, match="causal"):
        tiny_model("t5").add_adapter("c", method="cpt", **cpt_options())
    with pytest.raises(ConfigError, match="cpt_token_ids"):
        tiny_model("llama").add_adapter("c", method="cpt", cpt_token_ids=IDS, cpt_tokens_type_mask=TYPES[:-1])
    with pytest.raises(ConfigError, match="context"):
        tiny_model("llama").add_adapter("c", method="cpt", cpt_examples=3)


def test_a_peft_file_whose_masks_differ_in_length_from_its_tokens_is_one_line_naming_file_and_field(tmp_path):
    model = tiny_model("llama")
    model.add_adapter("c", method="cpt", **cpt_options())
    model.save_adapter("c", tmp_path / "c")
    (tmp_path / "c" / META_FILE).unlink()  # PEFT's files alone: the config comes from adapter_config.json
    config = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    for field in ("cpt_tokens_type_mask", "cpt_mask"):
        (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps({**config, field: config[field][:-1]}))
        with pytest.raises(ConfigError) as err:
            model.load_adapter(str(tmp_path / "c"), name="d")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / 'c' / CONFIG_FILE}: {field}: has 12 entries")


def test_server_batches_cpt_with_other_adapters_each_row_as_offline(tmp_path):
    model = lively_model()
    adapter = model.add_adapter("cpt", method="cpt", **cpt_options())
    with torch.no_grad():
        adapter.delta.normal_(0, 0.05)
    adapter.after_step()
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=3)
    paths = {name: str(tmp_path / name) for name in ("cpt", "pt")}
    for name, path in paths.items():
        model.save_adapter(name, path)
    reference = offline_model(paths)
    settings = ServerSettings(adapters=paths, max_batch_size=8, batch_window_ms=5, max_tokens_limit=50)
    names = ["cpt", "pt", "tiny-gpt2"] * 2
    bodies = [
        {"model": name, "prompt": f"Request {i}: tell me", "max_tokens": 6, "temperature": 0}
        for i, name in enumerate(names)
    ]
    with ServerThread(create_app(lively_model(), settings)) as server:
        cards = {card["id"]: card for card in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert cards["cpt"]["method"] == "cpt"
        responses = run_concurrently(server.url, [("POST", "/v1/completions", b) for b in bodies], concurrency=6)
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        adapter_name = None if body["model"] == "tiny-gpt2" else body["model"]
        want = reference.generate([body["prompt"]], adapters=[adapter_name], max_new_tokens=6)[0]
        assert response.json()["choices"][0]["text"] == want
