"""The command line end to end on tiny checkpoints written to disk (no network)."""

import json

import pytest

from softprompt.cli import main

from tiny import save_tiny_checkpoint, tiny_model


@pytest.fixture
def checkpoint_and_adapter(tmp_path):
    path = save_tiny_checkpoint("gpt2", tmp_path / "model")
    model = tiny_model("gpt2")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    model.save_adapter("a", tmp_path / "a")
    return path, tmp_path / "a", model


def test_generate_mixes_adapters_and_base_in_one_batch_and_matches_the_library(checkpoint_and_adapter, capsys):
    path, adapter, model = checkpoint_and_adapter
    assert (
        main(
            [
                "generate",
                "--model",
                path,
                "--adapter",
                f"a={adapter}",
                "--base",
                "--max-new-tokens",
                "4",
                "--json",
                "hello",
                "bye",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(r["prompt"], r["adapter"]) for r in rows] == [("hello", "a"), ("hello", None), ("bye", "a"), ("bye", None)]
    expected = model.generate(["hello", "hello", "bye", "bye"], adapters=["a", None, "a", None], max_new_tokens=4)
    assert [r["text"] for r in rows] == expected


def test_inspect_reports_method_size_and_nearest_tokens(checkpoint_and_adapter, capsys):
    path, adapter, _ = checkpoint_and_adapter
    assert main(["inspect", str(adapter), "--model", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "prompt_tuning" and info["num_virtual_tokens"] == 3
    assert info["parameters"] == 3 * 32 and 0 < info["adapter_bytes"] < 4096
    assert len(info["nearest_tokens"]) == 3 and len(info["nearest_tokens"][0]) == 3
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "method      prompt_tuning" in text and "size        3 virtual tokens, 96 parameters" in text


def test_models_lists_the_builtin_names(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m["cached"] for m in json.loads(capsys.readouterr().out)}
    assert listed == {"smollm2-135m": False, "gemma3-270m": False}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/dir", "x"], "--model '/no/such/dir'"),
        (["inspect", "/no/such/adapter"], "no such adapter directory"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_bad_adapter_spec_is_a_clear_error(checkpoint_and_adapter, capsys):
    path, adapter, _ = checkpoint_and_adapter
    assert main(["generate", "--model", path, "--adapter", f"a={adapter}", "--adapter", f"a={adapter}", "x"]) == 2
    assert "given twice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "eval", "predict", "serve"])
@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_config", "adapter_config.json: missing"),
        ("pickle", "pickled weights are never loaded"),
        ("file", "expected an adapter directory"),
        ("absent", "no such adapter directory"),
    ],
)
def test_a_bad_adapter_directory_fails_before_the_base_model_loads(
    tmp_path, monkeypatch, capsys, command, damage, message
):
    import softprompt
    import softprompt.models.loading

    adapter = tmp_path / "a"
    model = tiny_model("gpt2")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    model.save_adapter("a", adapter)
    if damage == "no_config":
        (adapter / "adapter_config.json").unlink()
    elif damage == "pickle":
        (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    elif damage == "file":
        adapter = tmp_path / "a.txt"
        adapter.write_text("x")
    else:
        adapter = tmp_path / "missing"

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapter was checked")

    monkeypatch.setattr(softprompt, "load", no_loading)
    monkeypatch.setattr(softprompt.models.loading, "load", no_loading)
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhi,a\nyo,b\n")
    argv = {
        "generate": ["generate", "--model", "m", "--adapter", f"a={adapter}", "x"],
        "eval": ["eval", "--model", "m", "--adapter", f"a={adapter}", "--data", str(data)],
        "predict": [
            "predict",
            "--model",
            "m",
            "--adapter",
            f"a={adapter}",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "p.csv"),
        ],
        "serve": ["serve", "--model", "m", "--adapter", f"a={adapter}"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "p.csv").exists()


def test_every_subcommand_help_has_worked_examples(capsys):
    for command in ["train", "eval", "predict", "generate", "inspect", "push", "models", "serve", "demo"]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out
        # a continued example stays on its own lines (a lone backslash in the help source would join them)
        assert not [line for line in out.splitlines() if line.count("softprompt ") > 1 or "   --" in line.strip()]


def test_demo_pipeline_trains_beats_zero_shot_and_saves(tmp_path, capsys):
    from softprompt.demo import run_demo

    # A learnable toy version of the demo: two kinds of "tweets" on a tiny random model.
    rows = [
        {"text": ("sunny happy " if i % 2 else "rain sad ") + str(i), "label": "positive" if i % 2 else "negative"}
        for i in range(80)
    ]
    from serving import lively_model

    result = run_demo(
        output=str(tmp_path),
        train_size=40,
        test_size=20,
        epochs=6,
        lr=0.1,
        num_virtual_tokens=4,
        model=lively_model(),
        rows=rows,
    )
    assert result["tuned_accuracy"] >= 0.7
    assert result["tuned_accuracy"] >= result["zero_shot_accuracy"] + 0.3
    assert (tmp_path / "sentiment" / "adapter_model.safetensors").exists()
    # trained by `softprompt train`'s own loop: the resolved config is saved next to the output
    assert "template: 'Tweet: {text}" in (tmp_path / "config.yaml").read_text()
    assert "held-out" in capsys.readouterr().out


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    path = save_tiny_checkpoint("bloom", tmp_path / "model")
    rows = ["text,label"] + [
        f"{'sunny happy' if i % 2 else 'rain sad'} {i},{'pos' if i % 2 else 'neg'}" for i in range(40)
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows[:31]) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join([rows[0]] + rows[31:]) + "\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                path,
                "--method",
                "prefix-tuning",
                "--data",
                str(tmp_path / "train.csv"),
                "--text-column",
                "text",
                "--label-column",
                "label",
                "--template",
                "{text} => ",
                "--num-virtual-tokens",
                "4",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--lr",
                "0.5",
                "--seed",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "config.yaml").exists() and (out / "default" / "adapter_model.safetensors").exists()
    ended = capsys.readouterr().out.splitlines()  # a table, then where everything went
    header = next(i for i, line in enumerate(ended) if line.startswith("adapter "))
    assert ended[header].split() == [
        "adapter",
        "best",
        "step",
        "val",
        "loss",
        "accuracy",
        "macro-F1",
        "zero-shot",
        "loss",
        "accuracy",
        "macro-F1",
    ]
    assert ended[header + 1].split()[0] == "default" and len(ended[header + 1].split()) == 8
    assert f"config:   {out / 'config.yaml'}" in ended and f"metrics:  {out / 'metrics.jsonl'}" in ended
    assert f"adapters: {out / 'default'}" in ended
    assert f"plots:    {out / 'loss_curve.png'}, {out / 'default' / 'loss_curve.png'}" in ended
    assert (
        main(
            [
                "eval",
                "--model",
                path,
                "--adapter",
                f"a={out / 'default'}",
                "--data",
                str(tmp_path / "dev.csv"),
                "--json",
                "--plot",
                str(tmp_path / "confusion.png"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)["a"]
    assert f"a: confusion matrix -> {tmp_path / 'confusion.png'}" in captured.err  # stdout stays JSON
    assert "accuracy" in json.dumps(report)
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a data file without a telling extension is read with --format
    (tmp_path / "dev.data").write_bytes((tmp_path / "dev.csv").read_bytes())
    assert (
        main(
            [
                "eval",
                "--model",
                path,
                "--adapter",
                f"a={out / 'default'}",
                "--data",
                str(tmp_path / "dev.data"),
                "--format",
                "csv",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["a"]["n"] == report["n"]
    assert (
        main(
            [
                "eval",
                "--model",
                path,
                "--adapter",
                f"a={out / 'default'}",
                "--data",
                str(tmp_path / "dev.data"),
                "--format",
                "csv",
                "--method",
                "perplexity",
                "--plot",
                str(tmp_path / "p.png"),
            ]
        )
        == 2
    )
    assert "--plot" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    assert main(["train", "--model", path, "--lr", "-1", "--data", str(tmp_path / "train.csv")]) == 2
    assert "--lr" in capsys.readouterr().err


def test_json_output_is_the_only_thing_on_stdout(checkpoint_and_adapter, tmp_path):
    # A fresh process: a library imported on the way must not print to stdout, or `--json > report.json`
    # is not JSON. DeepSpeed (a dev dependency, imported by transformers/accelerate on some paths) logs
    # to the stdout it finds at import; imported here after the command, as those paths would.
    import subprocess
    import sys

    path, adapter, _ = checkpoint_and_adapter
    data = tmp_path / "held_out.csv"
    data.write_text("text,label\ngood day,1\nbad day,0\n")
    argv = [
        "eval",
        "--model",
        path,
        "--adapter",
        str(adapter),
        "--data",
        str(data),
        "--template",
        "Text: {text}\nLabel:",
        "--json",
    ]
    code = f"from softprompt.cli import main; main({argv!r}); import deepspeed; deepspeed.utils.logger.warning('late')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["a"]["n"] == 2
    assert "[DeepSpeed] WARNING: late" in proc.stderr
