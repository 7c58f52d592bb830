"""softprompt.adapters.hub and `softprompt push`: what goes to the hub, and that it comes back whole.

No network: a stand-in for huggingface_hub's HfApi keeps uploads in a folder, and snapshot_download
serves them back from it (as the hub would, filtered by the requested patterns)."""

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from softprompt import SoftPromptError
from softprompt.adapters.hub import model_card, push_adapter
from softprompt.cli import main
from softprompt.training.evaluate import adapter_settings

from tiny import save_tiny_checkpoint, tiny_model

TRAINING_META = {
    "data": {
        "template": "Text: {text}\nLabel:",
        "text_column": "text",
        "label_column": "label",
        "verbalizer": {"0": " no", "1": " yes"},
        "data": "/home/me/private/tweets.csv",
        "validation_data": "hf:owner/tweets",
        "init_from": "owner/start-adapter",
    },
    "labels": [" no", " yes"],
    "max_length": 32,
    "metrics": {"accuracy": 0.75, "macro_f1": 0.7, "n": 8},
}


class FakeHub:
    """HfApi's two calls softprompt makes, keeping each repo's files under ``root/<owner>/<name>``."""

    def __init__(self, root: Path, fail: Exception | None = None):
        self.root, self.fail, self.created = root, fail, []

    def __call__(self, token=None):  # stands in for the HfApi class
        self.token = token
        return self

    def create_repo(self, repo_id, *, private=False, exist_ok=False):
        if self.fail:
            raise self.fail
        self.created.append((repo_id, private, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, commit_message):
        self.message = commit_message
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")

    def snapshot_download(self, repo_id, allow_patterns=None):
        out = self.root / "downloads" / repo_id
        out.mkdir(parents=True, exist_ok=True)
        for file in (self.root / repo_id).iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy2(file, out / file.name)
        return str(out)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


@pytest.fixture
def trained(tmp_path):
    model = tiny_model("gpt2")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=0)
    path = tmp_path / "runs" / "a"
    model.save_adapter("a", path, training_meta=TRAINING_META)
    (path / "checkpoints" / "last").mkdir(parents=True)
    (path / "checkpoints" / "last" / "optimizer.safetensors").write_bytes(b"state")
    return model, path


def test_push_uploads_the_peft_files_records_and_a_card_but_not_checkpoints(trained, hub):
    _, path = trained
    url = push_adapter(path, "someone/tiny-sentiment", private=True)
    assert url == "https://huggingface.co/someone/tiny-sentiment/commit/abc123"
    assert hub.created == [("someone/tiny-sentiment", True, True)]
    uploaded = sorted(p.name for p in (hub.root / "someone" / "tiny-sentiment").iterdir())
    assert uploaded == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "softprompt.json",
            "training_state.json",
            "training_state.safetensors",
            "README.md",
        ]
    )
    state = json.loads((hub.root / "someone" / "tiny-sentiment" / "training_state.json").read_text())
    assert state["data"]["data"] == "tweets.csv" and state["data"]["validation_data"] == "hf:owner/tweets"
    assert state["data"]["init_from"] == "owner/start-adapter"
    assert json.loads((path / "training_state.json").read_text())["data"]["data"] == "/home/me/private/tweets.csv"
    card = (hub.root / "someone" / "tiny-sentiment" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- prompt-tuning" in card
    assert "Text: {text}\nLabel:" in card and "`1` -> `' yes'`" in card
    assert 'PeftModel.from_pretrained(base, "someone/tiny-sentiment")' in card
    assert "accuracy 75.0% on 8 rows" in card
    assert "base_model:" not in card  # the tiny model has no hub id: no made-up metadata


def test_a_pushed_adapter_loads_back_by_hub_id_with_its_template(trained, hub):
    model, path = trained
    push_adapter(path, "someone/tiny-sentiment")
    fresh = tiny_model("gpt2")
    fresh.load_adapter("someone/tiny-sentiment", name="a")
    assert torch.equal(fresh.get_adapter("a").materialized(), model.get_adapter("a").materialized())
    assert adapter_settings("someone/tiny-sentiment")["template"] == "Text: {text}\nLabel:"


def test_eval_of_a_hub_id_needs_no_template(trained, hub, tmp_path, capsys):
    _, path = trained
    assert main(["push", str(path), "someone/tiny-sentiment"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert main(["inspect", "someone/tiny-sentiment", "--json"]) == 0  # by hub id too
    assert json.loads(capsys.readouterr().out)["num_virtual_tokens"] == 3
    checkpoint = save_tiny_checkpoint("gpt2", tmp_path / "model")
    data = tmp_path / "held_out.csv"
    data.write_text("text,label\ngood day,1\nbad day,0\nfine,1\n")
    assert (
        main(["eval", "--model", checkpoint, "--adapter", "someone/tiny-sentiment", "--data", str(data), "--json"]) == 0
    )
    (report,) = json.loads(capsys.readouterr().out).values()
    # all three rows scored with the pushed template and label texts, none given on the command line
    assert report["n"] == 3 and report["metrics"]["labels"] == [" no", " yes"]


def test_the_card_names_the_built_in_base_by_its_hub_id():
    card = model_card(Path(__file__).resolve().parents[2] / "examples" / "adapters" / "sst2-gemma3-270m")
    assert "base_model: google/gemma-3-270m" in card and "Review: {sentence}\nSentiment:" in card
    assert "softprompt eval --model gemma3-270m --adapter REPO_ID" in card


def test_mistakes_get_one_line_and_nothing_is_sent(trained, tmp_path, monkeypatch, capsys):
    _, path = trained
    hub = FakeHub(tmp_path / "hub", fail=OSError("Name or service not known"))
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    assert main(["push", str(path), "someone/tiny-sentiment"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed: OSError: Name or service not known" in err[0]
    assert main(["push", str(path), "not//valid"]) == 2
    assert "repo id 'not//valid': expected 'name' or 'owner/name'" in capsys.readouterr().err
    (path / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(SoftPromptError, match="checksum does not match"):
        push_adapter(path, "someone/tiny-sentiment", api=hub)
    assert main(["push", str(tmp_path / "missing"), "someone/x"]) == 2
    assert main(["push", "runs/missing", "someone/x"]) == 2  # looks like a hub id: still not a local folder
    assert "runs/missing: no such adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()


def test_the_model_pushes_an_adapter_it_holds(trained, hub):
    model, _ = trained
    url = model.push_adapter("a", "someone/from-python", commit_message="first")
    assert url.endswith("/commit/abc123") and hub.message == "first"
    assert (hub.root / "someone" / "from-python" / "adapter_model.safetensors").is_file()


def test_the_card_of_an_encoder_decoder_adapter_loads_a_seq2seq_model(tmp_path):
    model = tiny_model("t5")
    model.add_adapter("p", method="prefix_tuning", num_virtual_tokens=2, seed=0)
    model.save_adapter("p", tmp_path / "p")
    card = model_card(tmp_path / "p")
    assert "from transformers import AutoModelForSeq2SeqLM" in card and "- prefix-tuning" in card
