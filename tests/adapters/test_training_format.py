"""Adapters remember how they were trained: generate, the Python API and /v1/classify render raw text through
the recorded template (and label words) unless told to send it as is; /v1/models shows the template."""

from __future__ import annotations

import json

import pytest

import softprompt
from softprompt.cli import main
from softprompt.server import ServerSettings, create_app
from softprompt.training import adapter_settings

from serving import ServerThread, lively_model, offline_model
from tiny import save_tiny_checkpoint, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "Review: {text} Sentiment:"
META = {
    "data": {
        "template": TEMPLATE,
        "text_column": "text",
        "label_column": "label",
        "verbalizer": {"pos": " good", "neg": " bad"},
    },
    "labels": [" good", " bad"],
    "max_length": 64,
}


def json_out(capsys):
    out = capsys.readouterr().out
    return json.loads(out[out.index("[\n") :])  # after any warning a library prints on first import


def save_trained(model, name, path):
    model.add_adapter(name, method="prompt_tuning", num_virtual_tokens=3, seed=0)
    model.save_adapter(name, path, training_meta=META)
    return str(path)


def test_a_loaded_adapter_carries_its_training_format_and_format_inputs_applies_it(tmp_path):
    model = tiny_model("gpt2")
    path = save_trained(model, "a", tmp_path / "a")
    model.add_adapter("plain", method="prompt_tuning", num_virtual_tokens=2, seed=1)  # made in code: no format
    fresh = tiny_model("gpt2")
    fresh.load_adapter(path, name="a")
    fresh.add_adapter("plain", method="prompt_tuning", num_virtual_tokens=2, seed=1)
    recorded = fresh.get_adapter("a").training_format
    assert recorded.template == TEMPLATE and recorded.labels == (" good", " bad")
    assert recorded.label_words() == (["pos", "neg"], [" good", " bad"])
    assert recorded.label_words(["neg", "other"]) == (["neg", "other"], [" bad", "other"])
    assert recorded.settings() == adapter_settings(path)
    assert fresh.get_adapter("plain").training_format is None
    texts = softprompt.format_inputs(fresh, ["great day!", "meh", "x"], ["a", None, "plain"])
    assert texts == ["Review: great day! Sentiment:", "meh", "x"]
    assert softprompt.format_inputs(fresh, ["hi"], "a") == ["Review: hi Sentiment:"]
    with pytest.raises(softprompt.ConfigError, match="one per text"):
        softprompt.format_inputs(fresh, ["a", "b"], ["a"])


def test_a_template_with_several_columns_asks_for_formatted_text():
    recorded = softprompt.TrainingFormat(template="{title}: {body}")
    with pytest.raises(softprompt.ConfigError, match="'title', 'body'"):
        recorded.format("x")


def test_generate_applies_the_recorded_template_unless_raw(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint("gpt2", tmp_path / "model")
    model = tiny_model("gpt2")
    adapter = save_trained(model, "a", tmp_path / "a")
    argv = ["generate", "--model", checkpoint, "--adapter", f"a={adapter}", "--base", "--max-new-tokens", "3", "--json"]
    assert main([*argv, "great day!"]) == 0
    rows = json_out(capsys)
    shown = "Review: great day! Sentiment:"  # the bare model reads the adapter's template too, for comparison
    assert [(r["prompt"], r["adapter"]) for r in rows] == [(shown, "a"), (shown, None)]
    expected = model.generate([shown, shown], adapters=["a", None], max_new_tokens=3)
    assert [r["text"] for r in rows] == expected
    assert main([*argv, "--raw", "great day!"]) == 0
    rows = json_out(capsys)
    assert [r["prompt"] for r in rows] == ["great day!", "great day!"]
    assert [r["text"] for r in rows] == model.generate(["great day!"] * 2, adapters=["a", None], max_new_tokens=3)


def test_classify_uses_the_template_and_label_words_unless_raw_and_models_show_the_template(tmp_path):
    trained = save_trained(lively_model(), "sent", tmp_path / "sent")
    plain = lively_model()
    plain.add_adapter("plain", method="prompt_tuning", num_virtual_tokens=2, seed=3)
    plain.save_adapter("plain", tmp_path / "plain")
    paths = {"sent": trained, "plain": str(tmp_path / "plain")}
    reference = offline_model(paths)
    settings = ServerSettings(adapters=paths, max_batch_size=8, batch_window_ms=5)
    texts = ["great day!", "awful"]
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        assert cards["sent"]["template"] == TEMPLATE and cards["plain"]["template"] is None
        assert client.get("/v1/models/sent").json()["template"] == TEMPLATE

        got = client.post("/v1/classify", json={"model": "sent", "input": texts})
        assert got.status_code == 200, got.text
        want = reference.score([f"Review: {t} Sentiment:" for t in texts], labels=[" good", " bad"], adapters="sent")
        for row, ref in zip(got.json()["data"], want):
            assert set(row["scores"]) == {"pos", "neg"}
            assert row["label"] == {" good": "pos", " bad": "neg"}[ref.label]
            assert row["scores"]["pos"] == pytest.approx(ref.scores[" good"], abs=1e-4)

        raw = client.post("/v1/classify", json={"model": "sent", "input": texts, "labels": ["yes", "no"], "raw": True})
        assert raw.status_code == 200, raw.text
        want = reference.score(texts, labels=["yes", "no"], adapters="sent")
        for row, ref in zip(raw.json()["data"], want):
            assert row["scores"] == pytest.approx(ref.scores, abs=1e-4)

        for body in ({"model": "sent", "input": "x", "raw": True}, {"model": "plain", "input": "x"}):
            refused = client.post("/v1/classify", json=body)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "labels", refused.text
