"""Multitask prompt tuning (PEFT's MULTITASK_PROMPT_TUNING): parity with PEFT per task, files both ways, tasks per
row in mixed batches, source inits, training with a task column, the server's NAME:TASK models, bad input."""

import json

import httpx
import pytest
import torch
from peft import MultitaskPromptTuningConfig, TaskType
from safetensors.torch import load_file

from peft_parity import (
    INPUT,
    MASK,
    assert_greedy_matches_peft,
    decoder_ids,
    labels_for,
    our_greedy,
    ours_over,
    peft_forward,
    peft_from,
    peft_pair,
)
from softprompt import load
from softprompt.adapters.peft_format import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE
from softprompt.cli.app import main
from softprompt.engine.tokens import pad_batch
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.integrations.hf import TrainableAdapter
from softprompt.server import ServerSettings, create_app
from softprompt.training.loop import train

from serving import ServerThread, lively_model, offline_model, run_concurrently
from tiny import CAUSAL, FAMILIES, save_tiny_checkpoint, tiny_base, tiny_model
from toy_data import assert_resume_is_bit_identical, toy_job, toy_rows, write_csv

N_TOKENS, N_TASKS, N_RANKS = 5, 3, 2
TASKS = torch.tensor([2, 0])  # one task per row of INPUT


def peft_mpt_pair(family, tmp_path, lively=False):
    """A PEFT multitask adapter (saved by PEFT, reloaded) and ours loaded from PEFT's files; ``lively``: base weights
    large enough that greedy tokens vary."""
    base = lively_model(family).base if lively else tiny_base(family)
    task = TaskType.SEQ_2_SEQ_LM if family == "t5" else TaskType.CAUSAL_LM
    config = MultitaskPromptTuningConfig(
        task_type=task, num_virtual_tokens=N_TOKENS, num_tasks=N_TASKS, num_ranks=N_RANKS
    )

    def distinct_tasks(peft_model):  # task factors of order 1, so every task's prompt differs clearly
        for name, p in peft_model.prompt_encoder.named_parameters():
            p.mul_(0.5 if "embedding" in name else 25.0)

    return peft_pair(base, family, config, tmp_path, "m", distinct_tasks)


def peft_logits(peft_model, family, tasks=TASKS):
    logits = peft_forward(peft_model, family, task_ids=tasks).logits
    return logits if family == "t5" else logits[:, N_TOKENS:]


@pytest.mark.parametrize("family", CAUSAL)
def test_peft_adapter_loads_with_its_logits_and_loss_per_task(family, tmp_path):
    peft_model, ours = peft_mpt_pair(family, tmp_path)
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="m", task_ids=TASKS, decoder_input_ids=decoder_ids(family)).logits
        by_key = ours(INPUT, MASK, adapters=["m:2", "m:0"], decoder_input_ids=decoder_ids(family)).logits
    expected = peft_logits(peft_model, family)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(by_key, got)
    other = peft_logits(peft_model, family, torch.tensor([1, 1]))
    assert not torch.allclose(other, expected, atol=1e-3)  # the task matters
    labels = labels_for(family)
    want = peft_forward(peft_model, family, labels=labels, task_ids=TASKS).loss
    with torch.no_grad():
        loss = ours(INPUT, MASK, adapters="m", labels=labels, task_ids=TASKS).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generation_matches_greedy_decoding_of_peft_forward(family, tmp_path):
    peft_model, ours = peft_mpt_pair(family, tmp_path)
    assert_greedy_matches_peft(peft_model, ours, ["m:2", "m:0"], family, task_ids=TASKS)


def test_encoder_decoder_rows_are_peft_s_generate(tmp_path):
    """On T5 PEFT's forward also puts the prompt's second copy before the decoder input, which its generate leaves
    out; softprompt serves what PEFT generates with (the encoder prompt), in training too."""
    peft_model, ours = peft_mpt_pair("t5", tmp_path, lively=True)
    dec = decoder_ids("t5")
    with torch.no_grad():
        prompts = peft_model.get_prompt(2, task_ids=TASKS)[:, :N_TOKENS]  # PEFT's per-row task prompts
        embeds = torch.cat([prompts, peft_model.word_embeddings(INPUT)], dim=1)
        mask = torch.cat([torch.ones(2, N_TOKENS, dtype=MASK.dtype), MASK], dim=1)
        expected = peft_model.base_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(INPUT, MASK, adapters="m", task_ids=TASKS, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    peft_tokens = peft_model.generate(
        input_ids=INPUT, attention_mask=MASK, task_ids=TASKS, max_new_tokens=8, min_new_tokens=8, do_sample=False
    )
    got_tokens = our_greedy(ours, ["m:2", "m:0"], 8)
    assert got_tokens == peft_tokens[:, 1:].tolist()  # after the decoder start token
    assert len({tuple(g) for g in got_tokens}) == 2
    ours.save_adapter("m", tmp_path / "back")  # and our T5 file gives PEFT the same task prompts
    back = peft_from(ours.base, tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.get_prompt(2, task_ids=TASKS), peft_model.get_prompt(2, task_ids=TASKS))


@pytest.mark.parametrize(("family", "init"), [*((f, "random") for f in CAUSAL), ("llama", "text")])
def test_our_adapter_loads_in_peft_and_back(family, init, tmp_path):
    base = tiny_base(family)
    ours = ours_over(base, family)
    text = {"init_text": "classify the tweet"} if init == "text" else {}
    adapter = ours.add_adapter(
        "m",
        method="multitask_prompt_tuning",
        num_virtual_tokens=N_TOKENS,
        num_tasks=N_TASKS,
        num_ranks=N_RANKS,
        init=init,
        seed=3,
        **text,
    )
    with torch.no_grad():  # trained-looking factors: tasks differ
        adapter.prefix_task_cols.mul_(25.0)
        adapter.prefix_task_rows.mul_(25.0)
    ours.save_adapter("m", tmp_path / "m")
    written = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert (written["peft_type"], written["num_tasks"], written["num_ranks"]) == (
        "MULTITASK_PROMPT_TUNING",
        N_TASKS,
        N_RANKS,
    )
    assert set(load_file(tmp_path / "m" / WEIGHTS_FILE)) == {
        "prompt_embeddings",
        "prefix_task_cols",
        "prefix_task_rows",
    }
    assert not load_file(tmp_path / "m" / STATE_FILE)  # the weights file is the whole state: no second copy
    peft_model = peft_from(base, tmp_path / "m")
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="m", task_ids=TASKS, decoder_input_ids=decoder_ids(family)).logits
    torch.testing.assert_close(got, peft_logits(peft_model, family), atol=1e-5, rtol=1e-5)
    again = ours_over(base, family)
    loaded = again.load_adapter(str(tmp_path / "m"), name="m")
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def mpt(model, name="m", tasks=N_TASKS, **extra):
    adapter = model.add_adapter(
        name,
        method="multitask_prompt_tuning",
        num_virtual_tokens=4,
        num_tasks=tasks,
        num_ranks=N_RANKS,
        seed=7,
        **extra,
    )
    with torch.no_grad():  # trained-looking factors: every task's prompt clearly its own
        adapter.prefix_task_cols.normal_(0, 1.0)
        adapter.prefix_task_rows.normal_(0, 1.0)
    return adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_of_tasks_and_other_methods_gives_each_row_its_solo_result(family):
    model = tiny_model(family)
    mpt(model)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=3, init_text="classify", seed=2)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=2, seed=3)
    rows = [[20, 30, 40, 50, 60], [21, 31, 41], [22, 32, 42, 52], [23, 33], [24, 34, 44], [25]]
    names = ["m", "pt", "m", "prefix", "m", None]
    tasks = [2, None, 0, None, 1, None]
    keys = ["m:2", "pt", "m:0", "prefix", "m:1", None]
    ids, mask = pad_batch(rows, pad=0, side="left")
    decoder = torch.tensor([[0, 5, 6]] * len(rows)) if family == "t5" else None
    with torch.no_grad():
        together = model(ids, mask, adapters=names, task_ids=tasks, decoder_input_ids=decoder).logits
        for i, (row, key) in enumerate(zip(rows, keys)):
            alone = model(
                torch.tensor([row]), adapters=key, decoder_input_ids=None if decoder is None else decoder[:1]
            ).logits[0]
            got = together[i] if family == "t5" else together[i][mask[i] == 1]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
        first, third = (
            model(
                torch.tensor([rows[0]]), adapters=k, decoder_input_ids=None if decoder is None else decoder[:1]
            ).logits
            for k in ("m:0", "m:2")
        )
    assert not torch.allclose(first, third, atol=1e-3)  # tasks of one adapter differ
    if family not in ("llama", "t5"):  # decoding and scoring run the same prefill as the forward above
        return
    texts = ["hello there", "a", "soft prompts", "xyz!", "tasks", "base"]
    generated = model.generate(texts, adapters=names, task_ids=tasks, max_new_tokens=4)
    assert generated == [model.generate([t], adapters=[k], max_new_tokens=4)[0] for t, k in zip(texts, keys)]
    scored = model.score(texts[:3], labels=["yes", "no"], adapters="m", task_ids=[0, 1, 2])
    assert scored == model.score(texts[:3], labels=["yes", "no"], adapters=["m:0", "m:1", "m:2"])


def test_task_ids_missing_out_of_range_or_misplaced_are_one_line_errors():
    model = tiny_model("llama")
    mpt(model)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=2)
    cases = [
        ({"adapters": "m"}, "needs a task id per row (0 to 2)"),
        ({"adapters": "m", "task_ids": [0, 3]}, "task id 3 of adapter 'm': out of range"),
        ({"adapters": "m:7"}, "task id 7 of adapter 'm': out of range"),
        ({"adapters": "m", "task_ids": [0, -1]}, "task_ids: row 1: expected a task id"),
        ({"adapters": "m:x"}, "expected NAME:TASK"),
        ({"adapters": "pt", "task_ids": 1}, "adapter 'pt' (prompt_tuning) has no tasks"),
        ({"adapters": [None, "m"], "task_ids": [1, 1]}, "task_ids: row 0 has no adapter"),
        ({"adapters": "m", "task_ids": [1]}, "expected one task id per row (2)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SoftPromptError) as err:
            model(INPUT, MASK, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


def test_transformers_trainer_wrapper_takes_task_ids():
    model = tiny_model("llama")
    mpt(model)
    labels = INPUT.masked_fill(INPUT < 40, -100)
    wrapped = TrainableAdapter(model, "m")(INPUT, MASK, labels=labels, task_ids=TASKS).loss
    assert torch.equal(wrapped, model(INPUT, MASK, adapters=["m:2", "m:0"], labels=labels).loss)


def test_prompt_keys_values_are_cached_per_task_and_dropped_with_the_adapter():
    model = tiny_model("llama")
    mpt(model)
    with torch.no_grad():
        model(INPUT, MASK, adapters=["m:0", "m:1"])
    assert {"m:0", "m:1"} <= set(model._prompt_kv_cache._entries)
    model.remove_adapter("m")
    assert not model._prompt_kv_cache._entries


def test_source_inits_take_prompt_and_factors_from_a_saved_adapter(tmp_path):
    model = tiny_model("llama")
    source = mpt(model, "src")
    model.save_adapter("src", tmp_path / "src")
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    model.save_adapter("pt", tmp_path / "pt")
    common = {"method": "multitask_prompt_tuning", "num_virtual_tokens": 4, "num_ranks": N_RANKS, "num_tasks": 2}
    exact = model.add_adapter("e", init="exact_source_task", init_source=str(tmp_path / "src"), init_task=1, **common)
    assert torch.equal(exact.embedding, source.embedding)
    assert all(torch.equal(exact.prefix_task_cols[t], source.prefix_task_cols[1]) for t in range(2))
    mean = model.add_adapter(
        "a", init="average_source_tasks", init_source=str(tmp_path / "src" / WEIGHTS_FILE), **common
    )
    torch.testing.assert_close(mean.prefix_task_rows[0], source.prefix_task_rows.mean(0))
    shared = model.add_adapter("s", init="only_source_shared", init_source=str(tmp_path / "pt"), **common)
    assert torch.equal(shared.embedding, model.get_adapter("pt").embedding)
    with pytest.raises(ConfigError, match="init_task: 5 is not a task of"):
        model.add_adapter("x", init="exact_source_task", init_source=str(tmp_path / "src"), init_task=5, **common)
    with pytest.raises(ConfigError, match="needs a multitask adapter"):
        model.add_adapter("x", init="exact_source_task", init_source=str(tmp_path / "pt"), **common)
    (tmp_path / "state.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="pickled weights"):
        model.add_adapter("x", init="only_source_shared", init_source=str(tmp_path / "state.bin"), **common)
    with pytest.raises(ConfigError, match="init_source"):
        model.add_adapter("x", init="exact_source_task", **common)


def mpt_run(tmp_path, output, **extra):
    rows = [{**row, "task": str(i % 3)} for i, row in enumerate(toy_rows(24))]
    data = write_csv(tmp_path / "toy.csv", rows)
    return toy_job(
        data,
        output,
        {
            "task_column": "task",
            "method": "multitask_prompt_tuning",
            "num_virtual_tokens": 4,
            "num_tasks": 3,
            "num_ranks": 2,
            "init_text": "xyz abc",
        },
        **extra,
    )


@pytest.mark.usefixtures("one_thread")  # bit-identical resume
def test_training_reads_tasks_from_a_column_resumes_and_starts_from_a_saved_adapter(tmp_path):
    full = train(mpt_run(tmp_path, tmp_path / "full"), model=tiny_model("llama"), progress=False)
    start = tiny_model("llama").add_adapter(
        "s",
        method="multitask_prompt_tuning",
        num_virtual_tokens=4,
        num_tasks=3,
        num_ranks=2,
        init_text="xyz abc",
        seed=0,
    )
    trained = load_file(tmp_path / "full" / "default" / WEIGHTS_FILE)
    for t in range(3):  # every task's rows trained its own factors
        assert not torch.equal(trained["prefix_task_cols"][t], start.prefix_task_cols[t].detach())

    assert_resume_is_bit_identical(lambda out, **kw: mpt_run(tmp_path, out, **kw), full, lambda: tiny_model("llama"))
    warm = train(
        mpt_run(tmp_path, tmp_path / "warm", init_from=str(tmp_path / "full" / "default"), epochs=1),
        model=tiny_model("llama"),
        progress=False,
    )
    again = load_file(warm.adapters["default"].path / WEIGHTS_FILE)
    assert again["prefix_task_cols"].shape == trained["prefix_task_cols"].shape
    assert not torch.equal(again["prefix_task_cols"], trained["prefix_task_cols"])


def test_train_from_the_command_line_and_inspect(tmp_path, capsys):
    path = save_tiny_checkpoint("llama", tmp_path / "model")
    rows = ["text,label,task"] + [
        f"{'sunny' if i % 2 else 'rain'} {i},{'pos' if i % 2 else 'neg'},{i % 2}" for i in range(16)
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    args = ["train", "--model", path, "--method", "multitask-prompt-tuning", "--data", str(tmp_path / "train.csv")]
    args += ["--label-column", "label", "--task-column", "task", "--num-tasks", "2", "--num-virtual-tokens", "3"]
    args += ["--epochs", "1", "--batch-size", "8", "--seed", "0", "--output", str(tmp_path / "run")]
    assert main(args) == 0
    saved = tmp_path / "run" / "default"
    assert json.loads((saved / CONFIG_FILE).read_text())["num_tasks"] == 2
    capsys.readouterr()
    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "multitask_prompt_tuning" in out and "tasks       2" in out
    assert main(["generate", "--model", path, "--adapter", f"t={saved}", "--max-new-tokens", "2", "--raw", "hi"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[t:0", "[t:1"]  # one answer per task
    held_out = ["text,label,task"] + [
        f"{'sunny' if i % 2 else 'rain'} new {i},{'pos' if i % 2 else 'neg'},{i % 2}" for i in range(4)
    ]
    (tmp_path / "test.csv").write_text("\n".join(held_out) + "\n")
    evaluate = ["eval", "--model", path, "--adapter", f"t={saved}", "--data", str(tmp_path / "test.csv"), "--json"]
    assert main(evaluate) == 0  # each row with its task, the task column as trained
    assert json.loads(capsys.readouterr().out)

    def predicted(data, *extra):  # the p_<label> columns of `softprompt predict`, per row
        out = tmp_path / "predicted.csv"
        assert main(["predict", "--model", path, "--adapter", f"t={saved}", "--data", str(data), "--output", str(out),
                     "--probabilities", *extra]) == 0  # fmt: skip
        return [line.split(",")[2:] for line in out.read_text().splitlines()[1:]]

    by_task = predicted(tmp_path / "test.csv")  # each row with its task, the task column as trained
    (tmp_path / "task0.csv").write_text("\n".join([held_out[0], *(r[:-1] + "0" for r in held_out[1:])]) + "\n")
    all_task0 = predicted(tmp_path / "task0.csv")
    assert [a == b for a, b in zip(by_task, all_task0)] == [True, False, True, False]  # rows of task 1 differ
    renamed = "\n".join(held_out).replace("label,task", "label,kind")
    (tmp_path / "kind.csv").write_text(renamed + "\n")
    assert predicted(tmp_path / "kind.csv", "--task-column", "kind") == by_task
    capsys.readouterr()
    (tmp_path / "test.csv").write_text("\n".join([*held_out, "rain new 9,neg,5"]) + "\n")
    assert main(evaluate) == 2
    assert "row 5: task id '5' in column 'task'" in capsys.readouterr().err
    predict = ["predict", "--model", path, "--adapter", f"t={saved}", "--data", str(tmp_path / "test.csv")]
    assert main([*predict, "--output", str(tmp_path / "p.csv")]) == 2
    assert "row 5: task id '5' in column 'task'" in capsys.readouterr().err
    assert main([*predict[:-1], str(tmp_path / "kind.csv"), "--output", str(tmp_path / "p.csv")]) == 2
    assert "--task-column: " in capsys.readouterr().err  # trained on column 'task'; this file has 'kind'
    elsewhere = load(path)  # a multitask adapter that does not record its task column
    mpt(elsewhere, "x", tasks=2)
    elsewhere.save_adapter("x", tmp_path / "x")
    for command in (["eval", "--label-column", "label"], ["predict", "--verbalizer", "neg=neg,pos=pos"]):
        args_x = [*command, "--model", path, "--adapter", f"x={tmp_path / 'x'}", "--data", str(tmp_path / "kind.csv")]
        assert main([*args_x, "--output", str(tmp_path / "x.csv")] if command[0] == "predict" else args_x) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bar
        assert len(err) == 1 and "--task-column: adapter 'x' is a multitask adapter (2 tasks)" in err[0], err

    def one_error(extra):
        capsys.readouterr()
        assert main([*args[:-2], "--output", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert "--num-tasks" in one_error(["--num-tasks", "0"])
    assert "task id '1'" in one_error(["--num-tasks", "1"])  # the data's task 1 is not a task of one
    no_column = [a for a in args[:-2] if a not in ("--task-column", "task")]
    capsys.readouterr()
    assert main([*no_column, "--output", str(tmp_path / "bad")]) == 2
    assert "--task-column: required by multitask_prompt_tuning" in capsys.readouterr().err
    plain = [a for a in no_column if a not in ("--num-tasks", "2")]
    capsys.readouterr()
    assert main([*plain, "--method", "prompt_tuning", "--task-column", "task", "--output", str(tmp_path / "bad")]) == 2
    assert "--task-column: only applies to a method with tasks" in capsys.readouterr().err


def test_server_picks_the_task_from_the_model_name(tmp_path):
    model = lively_model()
    mpt(model)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=3)
    paths = {name: str(tmp_path / name) for name in ("m", "pt")}
    for name, path in paths.items():
        model.save_adapter(name, path)
    reference = offline_model(paths)
    settings = ServerSettings(adapters=paths, max_batch_size=8, batch_window_ms=5, max_tokens_limit=50)
    names = ["m:0", "m:1", "m:2", "pt", "tiny-gpt2"]
    bodies = [
        {"model": name, "prompt": f"Request {i}: tell me", "max_tokens": 6, "temperature": 0}
        for i, name in enumerate(names)
    ]
    with ServerThread(create_app(lively_model(), settings)) as server:
        cards = {card["id"]: card for card in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert (cards["m"]["num_tasks"], cards["pt"]["num_tasks"]) == (N_TASKS, None)
        responses = run_concurrently(server.url, [("POST", "/v1/completions", b) for b in bodies], concurrency=5)
        bad = {"m": "it has tasks", "m:3": "task '3' is not one of its tasks", "pt:1": "adapter 'pt' has no tasks"}
        for name, message in bad.items():
            response = httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
            assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    texts = []
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        adapter = None if body["model"] == "tiny-gpt2" else body["model"]
        texts.append(response.json()["choices"][0]["text"])
        assert texts[-1] == reference.generate([body["prompt"]], adapters=[adapter], max_new_tokens=6)[0]
