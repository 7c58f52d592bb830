"""`init_from`: a new training job starts from a saved adapter (warm start, prompt transfer)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from softprompt.adapters.peft_format import STATE_FILE
from softprompt.cli import main
from softprompt.data.heldout import fingerprint, read_train_fingerprints
from softprompt.errors import ConfigError
from softprompt.training.config import load_config
from softprompt.training.jobs import prepare_job
from softprompt.training.loop import train

from tiny import save_tiny_checkpoint, tiny_model
from toy_data import records, toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_config(tmp, out: str, **extra):
    values = {
        "data": str(tmp / "toy.csv"),
        "label_column": "label",
        "method": "prefix_tuning",
        "init": "random",
        "num_virtual_tokens": 4,
        "lr": 1.0,
        "lr_schedule": "constant",
        "epochs": 8,
        "batch_size": 8,
        "val_fraction": 0.25,
        "log_every": 1,
        "output": str(tmp / out),
        "seed": 0,
        "eval_zero_shot": False,
    }
    values.update(extra)
    return load_config(None, {k: v for k, v in values.items() if v is not None})  # None: drop the default


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A prefix adapter trained on the toy task (the settings `test_train.toy_run` shows to learn it)."""
    tmp = tmp_path_factory.mktemp("init_from")
    write_csv(tmp / "toy.csv", toy_rows(64))
    result = train(toy_config(tmp, "source"), model=tiny_model("bloom"), progress=False)
    return tmp, result.adapters["default"].path


def first_loss(output) -> float:
    return next(r["loss"] for r in records(output) if r["type"] == "train")


def test_the_new_job_starts_from_the_saved_weights_and_keeps_learning(source):
    tmp, path = source
    saved = tiny_model("bloom")
    saved.load_adapter(str(path), name="saved")
    # lr ~0: after one step the adapter still is the saved one, not a fresh init of the same seed
    model = tiny_model("bloom")
    train(toy_config(tmp, "still", init_from=str(path), lr=1e-12, max_steps=1), model=model, progress=False)
    start = model.adapters["default"].materialized()
    assert torch.allclose(start, saved.adapters["saved"].materialized(), atol=1e-6)
    fresh = tiny_model("bloom").add_adapter("x", method="prefix_tuning", num_virtual_tokens=4, init="random", seed=0)
    assert not torch.allclose(start, fresh.materialized(), atol=1e-2)
    # with a real learning rate it goes on from there: its first training loss is the trained adapter's
    warm = train(toy_config(tmp, "warm", init_from=str(path), epochs=1), model=tiny_model("bloom"), progress=False)
    cold = train(toy_config(tmp, "cold", epochs=1), model=tiny_model("bloom"), progress=False)
    assert first_loss(warm.output) < first_loss(cold.output) - 0.3
    assert "init_from: " in (warm.output / "config.yaml").read_text()  # recorded with the resolved config


def test_the_texts_the_start_adapter_learnt_stay_out_of_validation_and_travel_on(source):
    tmp, path = source
    write_csv(tmp / "toy2.csv", toy_rows(64, seed=1))  # other strings of the same task
    learnt = read_train_fingerprints(path)
    config = toy_config(
        tmp, "more", init_from=str(path), data=str(tmp / "toy2.csv"), validation_data=str(tmp / "toy.csv"), epochs=1
    )
    job = prepare_job(config.resolved_adapters()[0])
    assert len(learnt) == 48 and job.dropped_val_rows == 48  # toy.csv: 48 rows the start adapter learnt
    assert len(job.val) == 16 and not {fingerprint(e.text) for e in job.val} & learnt
    result = train(config, model=tiny_model("bloom"), progress=False)
    saved = read_train_fingerprints(result.adapters["default"].path)
    assert saved == learnt | {fingerprint(e.text) for e in job.train}  # `eval` drops both generations of rows


def test_a_start_adapter_under_the_home_directory_is_found_as_load_adapter_finds_it(source, tmp_path, monkeypatch):
    tmp, path = source
    (tmp_path / "start").symlink_to(path, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    job = prepare_job(
        toy_config(tmp, "home", init_from="~/start", data=str(tmp / "toy.csv"), epochs=1).resolved_adapters()[0]
    )
    assert job.inherited_fingerprints == read_train_fingerprints(path) and len(job.inherited_fingerprints) == 48


def test_a_different_method_or_length_is_one_clear_error(source):
    tmp, path = source
    model = tiny_model("bloom")
    with pytest.raises(
        ConfigError,
        match=r"--init-from .*prefix_tuning adapter with 4 virtual tokens, but this job "
        r"trains prefix_tuning with 6; set --method and --num-virtual-tokens",
    ):
        train(toy_config(tmp, "bad", init_from=str(path), num_virtual_tokens=6), model=model, progress=False)
    assert model.adapters["default"].config.num_virtual_tokens == 6  # the fresh adapter, not the saved one
    assert not (tmp / "bad").exists()  # nothing written before the checks passed
    with pytest.raises(ConfigError, match=r"--init-from .*prompt_tuning with 4"):
        train(
            toy_config(tmp, "bad2", init_from=str(path), method="prompt_tuning", init=None),
            model=tiny_model("bloom"),
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"^--init-from .*no-such-dir: .*no such adapter directory"):
        train(toy_config(tmp, "bad3", init_from=str(tmp / "no-such-dir")), model=tiny_model("bloom"), progress=False)
    with pytest.raises(ConfigError, match=r"--init-from: expected an adapter directory or hub id"):
        toy_config(tmp, "bad4", init_from=" ")


def test_a_reparameterised_adapter_continues_with_its_encoder(tmp_path):
    write_csv(tmp_path / "toy.csv", toy_rows(32))
    options = {"method": "p_tuning", "init": None, "encoder_hidden_size": 8, "lr": 1e-2, "epochs": 1}
    first = train(toy_config(tmp_path, "first", **options), model=tiny_model("llama"), progress=False)
    second = train(
        toy_config(
            tmp_path,
            "second",
            init_from=str(first.adapters["default"].path),
            max_steps=1,
            lr=1e-12,
            **{k: v for k, v in options.items() if k != "lr"},
        ),
        model=tiny_model("llama"),
        progress=False,
    )
    before = load_file(first.adapters["default"].path / STATE_FILE)  # adapter.* keys: the encoder's weights
    after = load_file(second.adapters["default"].path / STATE_FILE)
    encoder = [k for k in before if k.startswith("adapter.mlp_head.")]
    assert encoder and sorted(encoder) == sorted(k for k in after if k.startswith("adapter.mlp_head."))
    for key in encoder:  # the second job trained the first one's encoder (lr ~0: still equal), not a new one
        assert torch.allclose(before[key], after[key], atol=1e-6), key


def test_init_from_on_the_command_line(source, capsys):
    tmp, path = source
    model = save_tiny_checkpoint("bloom", tmp / "model")
    out = tmp / "cli"
    assert (
        main(
            [
                "train",
                "--model",
                model,
                "--method",
                "prefix-tuning",
                "--data",
                str(tmp / "toy.csv"),
                "--label-column",
                "label",
                "--num-virtual-tokens",
                "4",
                "--epochs",
                "1",
                "--lr",
                "0.5",
                "--init-from",
                str(path),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "default" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--model",
                model,
                "--data",
                str(tmp / "toy.csv"),
                "--label-column",
                "label",
                "--init-from",
                str(path),
                "--output",
                str(tmp / "cli-bad"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it: the model's loading progress bar)
    assert "--init-from" in last and "8" in last and "Traceback" not in err
