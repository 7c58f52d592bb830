"""The adapters shipped in examples/adapters/ stay documented, intact and loadable."""

import functools
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from softprompt import SoftPromptModel
from softprompt.adapters.peft_format import (
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    read_json,
    read_training_state,
    verify_checksum,
)
from softprompt.data import Template

from tiny import tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"
FOLDERS = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())


def built_in_shaped(name: str) -> SoftPromptModel:
    """A model of the built-in ``name``'s shape (layers, width, heads, vocabulary), random weights and a
    64-wide MLP: the adapters' checks compare shapes, and the real model needs a download."""
    torch.manual_seed(0)
    if name == "smollm2-135m":
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=64,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            tie_word_embeddings=True,
            max_position_embeddings=512,
        )
        base = LlamaForCausalLM(config)
    else:
        assert name == "gemma3-270m", name
        config = Gemma3TextConfig(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=64,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            tie_word_embeddings=True,
            max_position_embeddings=512,
            sliding_window=512,
        )
        base = Gemma3ForCausalLM(config)
    return SoftPromptModel(base.eval().requires_grad_(False), tiny_tokenizer(), name_or_path=name)


@pytest.fixture(scope="module")
def shaped_models():
    return functools.cache(built_in_shaped)  # one model per base, dropped with the module


def test_every_example_adapter_is_listed_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    assert FOLDERS, "no example adapters"
    for folder in FOLDERS:
        assert f"`{folder.name}/`" in readme, folder.name


def test_every_example_adapter_records_the_score_its_readme_row_quotes():
    # research.export compares new adapters with these scores before replacing an example
    from research.export import EVALUATIONS, folder_name, shipped_scores

    scores = shipped_scores(EXAMPLES)
    assert set(scores) == {folder.name for folder in FOLDERS}
    rows = {
        line.split("|")[1].strip(): line
        for line in (EXAMPLES / "README.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for name, entry in scores.items():
        assert entry["metric"] == EVALUATIONS[entry["task"]].metric, name
        assert read_json(EXAMPLES / name / META_FILE)["base_model"] == entry["base_model"], name
        assert folder_name(entry["task"], entry["base_model"]) == name
        quoted = f"{entry['value']:.1%}" if entry["metric"] == "accuracy" else f"{entry['value']:.3f}"
        assert quoted in rows[f"`{name}/`"], (name, quoted)


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_example_adapter_is_intact_and_scores(folder, shaped_models):
    meta = read_json(folder / META_FILE)
    assert meta["base_model"] in ("smollm2-135m", "gemma3-270m")
    shaped = shaped_models(meta["base_model"])
    for file in (WEIGHTS_FILE, STATE_FILE):
        assert meta["sha256"][file], file
        verify_checksum(folder, file, meta)  # raises on a changed byte
    adapter = shaped.load_adapter(str(folder), name=folder.name)
    assert adapter.config.method == meta["method"]
    _, info = read_training_state(folder)
    template, verbalizer = info["data"]["template"], info["data"]["verbalizer"]
    labels = list(verbalizer.values())
    row = {column: "the service was slow and nobody answered" for column in ("sentence", "Tweet text", "text")}
    text = Template(template).render(row)
    tuned = shaped.score([text], labels=labels, adapters=folder.name)[0]
    bare = shaped.score([text], labels=labels, adapters=None)[0]
    assert tuned.label in labels and all(torch.isfinite(torch.tensor(list(tuned.scores.values()))))
    assert tuned.scores != bare.scores  # the adapter changes what the model computes
