"""Training configs: YAML + overrides, validation messages that name the flag or the key and file."""

import dataclasses

import pytest
import yaml

from softprompt.errors import ConfigError
from softprompt.training.config import TrainConfig, apply_overrides, load_config, parse_override_words, save_resolved


def write_yaml(path, value) -> str:
    path.write_text(yaml.safe_dump(value))
    return str(path)


BASE = {"model": "tiny", "data": "train.csv", "label_column": "label"}


def test_yaml_then_overrides(tmp_path):
    verbalizer = {1: "complaint", 2: "no complaint"}  # YAML keys may be numbers
    path = write_yaml(tmp_path / "run.yaml", {**BASE, "lr": "3e-2", "batch_size": 4, "verbalizer": verbalizer})
    config = load_config(path, ["--batch-size", "16", "--bf16", "--no-eval-zero-shot", "--lr-schedule=cosine"])
    assert config.lr == 0.03  # YAML reads 3e-2 as a string; it is still a number here
    assert config.batch_size == 16 and config.bf16 is True and config.eval_zero_shot is False
    assert config.lr_schedule == "cosine"
    assert config.verbalizer == {"1": "complaint", "2": "no complaint"}  # raw labels are strings, as in data files
    config = load_config(path, {"--max-steps": "5", "weight_decay": 0.1, "kfold": None})
    assert config.max_steps == 5 and config.weight_decay == 0.1 and config.kfold is None
    parsed = load_config(None, {**BASE, "verbalizer": "1=complaint, 2=no complaint"})
    assert parsed.verbalizer == {"1": "complaint", "2": "no complaint"}


def test_unknown_key_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {**BASE, "lerning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'lerning_rate'"):
        load_config(path)
    path = write_yaml(tmp_path / "multi.yaml", {**BASE, "adapters": [{"name": "a", "lrr": 0.1}]})
    with pytest.raises(ConfigError, match=r"multi\.yaml: adapters\[0\]: unknown key 'lrr' \(did you mean 'lr'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--epoch: unknown option \(did you mean 'epochs'\?\)"):
        load_config(None, ["--epoch", "3"])


def test_wrong_type_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {**BASE, "batch_size": "eight"})
    with pytest.raises(ConfigError, match=r"run\.yaml: key 'batch_size': expected an integer, got 'eight'"):
        load_config(path)
    path = write_yaml(tmp_path / "run.yaml", {**BASE, "bf16": "maybe"})
    with pytest.raises(ConfigError, match=r"run\.yaml: key 'bf16': expected true or false"):
        load_config(path)
    path = write_yaml(tmp_path / "run.yaml", {**BASE, "verbalizer": ["a", "b"]})
    with pytest.raises(ConfigError, match=r"key 'verbalizer': expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--epochs: expected an integer, got 'x'$"):
        load_config(None, {**BASE, "epochs": "x"})
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys to values at the top level"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"lr": 0}, "--lr: expected a number above 0"),
        ({"batch_size": 0}, "--batch-size: expected an integer of at least 1, got 0"),
        ({"grad_accum": -1}, "--grad-accum: expected an integer of at least 1"),
        ({"warmup_ratio": 1.5}, "--warmup-ratio: expected a number below 1"),
        ({"val_fraction": 1.0}, "--val-fraction: expected a number below 1"),
        ({"lr_schedule": "step"}, "--lr-schedule: expected one of linear, cosine, constant, got 'step'"),
        ({"method": "lora"}, "--method: expected one of prompt_tuning, prefix_tuning, p_tuning"),
        ({"num_virtual_tokens": 0}, "--num-virtual-tokens: expected an integer between 1 and 4096"),
        ({"kfold": 1}, "--kfold: expected an integer of at least 2"),
        ({"early_stopping_patience": 0}, "--early-stopping-patience: expected an integer of at least 1"),
        ({"device": "gpu"}, "--device: expected cpu, cuda, cuda:N or mps"),
        ({"data": None}, "--data: required"),
        ({"template": "Tweet: {text"}, "--template: template 'Tweet: {text'"),
        ({"validation_data": "train.csv"}, "--validation-data: is the same file as --data"),
        ({"label_column": None, "verbalizer": {"1": "a"}}, "--verbalizer: needs --label-column"),
        (
            {"init_text": "hello", "method": "p_tuning"},
            "--init-text: only applies to --method prompt_tuning, prefix_tuning, cartridge or multitask_prompt_tuning, "
            "not p_tuning",
        ),
        (
            {"method": "prefix_tuning", "init": "sample_vocab", "prefix_projection": True},
            "--init: 'sample_vocab' needs prefix_projection: false",
        ),
        ({"method": "prefix_tuning", "init": "text"}, "--init-text: required when init is 'text'"),
        ({"method": "p_tuning", "encoder_type": "gru"}, "--encoder-type: expected one of mlp, lstm"),
        ({"init": "text"}, "--init-text: required when init is 'text'"),
        ({"name": "no spaces"}, "--name: expected 1-64 letters"),
        ({"adapters": [{"name": "a"}, {"name": "a"}]}, "--adapters: the adapter name 'a' is given twice"),
        ({"adapters": [{"name": "a", "lr": -1.0}]}, r"adapters\[0\] \(a\): --lr: expected a number above 0"),
        (
            {"adapters": [{"name": "a", "method": "prompt_tuning", "prefix_projection": True}]},
            r"adapters\[0\] \(a\): --prefix-projection: only applies to --method prefix_tuning",
        ),
    ],
)
def test_validation_names_the_flag(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {k: v for k, v in {**BASE, **override}.items() if v is not None})


def test_adapters_inherit_and_override():
    config = load_config(
        None,
        {
            **BASE,
            "method": "prompt-tuning",
            "init_text": "Classify:",
            "lr": 0.1,
            "num_virtual_tokens": 6,
            "adapters": [
                {"name": "a"},
                {
                    "name": "b",
                    "data": "b.csv",
                    "method": "prefix_tuning",
                    "lr": 0.5,
                    "prefix_projection": True,
                    "num_virtual_tokens": 3,
                    "label_column": "",
                },
            ],
        },
    )
    a, b = config.resolved_adapters()
    assert (a.name, a.data, a.method, a.lr, a.label_column) == ("a", "train.csv", "prompt_tuning", 0.1, "label")
    assert a.method_options == {"num_virtual_tokens": 6, "init_text": "Classify:"}
    assert a.template == "{text}"
    assert (b.name, b.data, b.method, b.lr, b.label_column) == ("b", "b.csv", "prefix_tuning", 0.5, None)
    # init_text is inherited; with a projection MLP, prefix tuning's auto init then starts at random.
    assert b.method_options == {"num_virtual_tokens": 3, "prefix_projection": True, "init_text": "Classify:"}
    single = load_config(None, {**BASE, "name": "complaints", "template": "Tweet: {Tweet text} Label: "})
    (only,) = single.resolved_adapters()
    assert only.name == "complaints" and only.template == "Tweet: {Tweet text} Label: "


def test_save_resolved_round_trips(tmp_path):
    config = load_config(
        None,
        {**BASE, "lr": 0.2, "verbalizer": {"1": "yes", "2": "no"}, "kfold": 5, "adapters": [{"name": "x", "lr": 0.3}]},
        validate=False,
    )
    path = save_resolved(config, tmp_path)
    assert path == tmp_path / "config.yaml"
    assert load_config(path, validate=False) == config
    assert yaml.safe_load(path.read_text())["adapters"] == [{"name": "x", "lr": 0.3}]


def test_options_cover_every_field_with_help():
    options = TrainConfig.options()
    assert [o.name for o in options] == list(TrainConfig.__dataclass_fields__)
    assert all(o.help for o in options)
    by_name = {o.name: o for o in options}
    assert by_name["batch_size"].flag == "--batch-size" and by_name["batch_size"].type == "int"
    assert by_name["max_steps"].type == "int or null" and by_name["lr_schedule"].choices == (
        "linear",
        "cosine",
        "constant",
    )
    assert parse_override_words(["--resume", "--lr", "1"]) == {"resume": True, "lr": "1"}
    with pytest.raises(ConfigError, match="--lr: expects a value"):
        parse_override_words(["--lr"])
    assert apply_overrides(TrainConfig(), {"bf16": "yes"}).bf16 is True


def test_method_options_nest_under_method_options_and_flat_keys_and_flags_map_onto_them(tmp_path):
    nested = write_yaml(
        tmp_path / "nested.yaml",
        {**BASE, "method": "prefix_tuning", "method_options": {"num_virtual_tokens": 4, "init": "random"}},
    )
    flat = write_yaml(
        tmp_path / "flat.yaml", {**BASE, "method": "prefix-tuning", "num_virtual_tokens": 4, "init": "random"}
    )
    assert load_config(nested) == load_config(flat)
    config = load_config(flat, ["--prefix-projection", "--encoder-hidden-size", "16", "--init", "null"])
    assert config.method_options == {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}
    config = load_config(flat, ["--method-options", "{num_virtual_tokens: 6}", "--no-prefix-projection"])
    assert config.method_options == {"num_virtual_tokens": 6, "init": "random", "prefix_projection": False}
    assert load_config(save_resolved(config, tmp_path)) == config
    with pytest.raises(
        ConfigError,
        match=r"nested\.yaml: key 'prefix_projecton': unknown method option "
        r"\(did you mean 'prefix_projection'\?\)",
    ):
        load_config(write_yaml(tmp_path / "nested.yaml", {**BASE, "method_options": {"prefix_projecton": True}}))
    with pytest.raises(ConfigError, match=r"flat\.yaml: key 'encoder_num_layers': expected an integer, got 'two'"):
        load_config(write_yaml(tmp_path / "flat.yaml", {**BASE, "encoder_num_layers": "two"}))
    with pytest.raises(ConfigError, match=r"--encoder-dropout: expected a number below 1\.0, got 1\.5"):
        load_config(None, {**BASE, "method": "p_tuning", "encoder_dropout": 1.5})
    multi = load_config(
        None,
        {
            **BASE,
            "init_text": "Classify:",
            "adapters": [
                {"name": "a", "method": "p_tuning", "method_options": {"encoder_type": "lstm"}},
                {"name": "b", "method_options": {"num_virtual_tokens": 2}},
            ],
        },
    )
    a, b = multi.resolved_adapters()
    assert a.method_options == {"num_virtual_tokens": 8, "encoder_type": "lstm"}  # init_text is not p_tuning's
    assert b.method_options == {"num_virtual_tokens": 2, "init_text": "Classify:"}


def test_every_method_config_field_is_a_train_option_with_help():
    from softprompt.methods import METHOD_OPTIONS, METHODS
    from softprompt.training.config import train_options

    declared = {f.name for cls in METHODS.values() for f in dataclasses.fields(cls.config_class)}
    assert set(METHOD_OPTIONS) == declared
    options = {o.name: o for o in train_options()}
    assert declared <= set(options) and set(TrainConfig.__dataclass_fields__) <= set(options)
    assert all(o.help and o.flag == "--" + o.name.replace("_", "-") for o in options.values())
    assert options["prefix_projection"].help.startswith("prefix_tuning: ")
    assert options["encoder_type"].choices == ("mlp", "lstm")


def test_method_names_take_dashes_and_typos_get_a_suggestion():
    assert load_config(None, {**BASE, "method": "P-Tuning"}).method == "p_tuning"
    with pytest.raises(
        ConfigError,
        match=r"--method: expected one of prompt_tuning, prefix_tuning, p_tuning, cartridge, adaption_prompt, multitask_prompt_tuning, cpt, got "
        r"'prefix-tunning' \(did you mean 'prefix_tuning'\?\)",
    ):
        load_config(None, {**BASE, "method": "prefix-tunning"})
    with pytest.raises(ConfigError, match=r"adapters\[0\] \(a\): --method: .* \(did you mean 'p_tuning'\?\)"):
        load_config(None, {**BASE, "adapters": [{"name": "a", "method": "ptuning"}]})


def test_resume_auto_continues_only_when_a_checkpoint_exists(tmp_path):
    words = ["--output", str(tmp_path / "run"), "--resume", "auto"]
    assert parse_override_words(["--resume", "auto", "--resume"]) == {"resume": True}
    assert parse_override_words(words[2:]) == {"resume": "auto"}
    assert load_config(None, {**BASE}, validate=True).resume is False
    assert load_config(None, [*["--" + k.replace("_", "-") + "=" + v for k, v in BASE.items()], *words]).resume is False
    (tmp_path / "run" / "default" / "checkpoints" / "last").mkdir(parents=True)
    config = load_config(None, {**BASE, "output": str(tmp_path / "run"), "resume": "auto"})
    assert config.resume is True
    assert load_config(None, {**BASE, "resume": "true"}).resume is True
    with pytest.raises(ConfigError, match=r"--resume: expected true, false or auto, got 'sometimes'"):
        load_config(None, {**BASE, "resume": "sometimes"})
