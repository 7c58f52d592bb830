"""``response_format`` (json_object, json_schema) on a live server: grammar-constrained decoding makes even a
random tiny model answer valid JSON, on /v1/chat/completions and /v1/completions, greedy and seeded, streamed
or not, through the openai client too; in a batch mixing adapters and unconstrained rows every row equals
its solo run (and unconstrained rows equal `model.generate`); a schema that cannot be compiled is a 400
naming ``response_format.json_schema.schema`` and the reason."""

from __future__ import annotations

import json
import sys

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from softprompt.engine.constraints import INSTALL
from softprompt.server import ServerSettings, create_app

from serving import ServerThread, lively_model, offline_model, parse_sse, run_concurrently, save_adapters

pytest.importorskip("llguidance")

BASE = "tiny-gpt2"
C, CHAT = "/v1/completions", "/v1/chat/completions"
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "color", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
JSON_OBJECT = {"type": "json_object"}
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    paths = save_adapters(tmp_path_factory.mktemp("formats"))
    settings = ServerSettings(adapters=paths, max_batch_size=16, batch_window_ms=50, max_prompt_tokens=200)
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:
        yield {"server": server, "client": client, "model": offline_model(paths)}


def post(env, path, body):
    response = env["client"].post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def wide_decode_steps(env) -> float:
    """How many decoding steps so far carried more than 4 rows."""
    text = env["client"].get("/metrics").text
    buckets = {
        s.labels.get("le"): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "softprompt_batch_size_bucket" and s.labels.get("phase") == "decode"
    }
    return buckets.get("+Inf", 0) - buckets.get("4.0", 0)


def text_of(path, choice):
    return choice["message"]["content"] if path == CHAT else choice["text"]


def conforms(text: str, fmt: dict) -> dict:
    """The JSON object ``text`` holds, checked against the format's schema (by hand: keys, types, enums)."""
    value = json.loads(text)
    assert isinstance(value, dict), text
    if fmt["type"] == "json_schema":
        assert set(value) == {"ok", "color", "n"}, text
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue"), text
        assert type(value["n"]) is int and 0 <= value["n"] <= 9, text
    return value


def body_for(path, model, fmt, **options):
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "Answer in JSON:"}
    return {"model": model, **prompt, "max_tokens": 120, **({"response_format": fmt} if fmt else {}), **options}


OPTIONS = [{"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.7, "top_p": 0.9, "seed": 3}]


@pytest.mark.parametrize("path", [CHAT, C], ids=["chat", "completions"])
def test_every_adapter_answers_json_matching_the_schema_greedy_and_seeded(env, path):
    for model in ("pt", "prefix", "ptune", BASE):
        for options in OPTIONS:
            choice = post(env, path, body_for(path, model, JSON_SCHEMA, **options))["choices"][0]
            assert choice["finish_reason"] == "stop", choice  # the schema's values are short: it always closes
            conforms(text_of(path, choice), JSON_SCHEMA)


@pytest.mark.parametrize("path", [CHAT, C], ids=["chat", "completions"])
def test_json_object_answers_are_json_objects(env, path):
    # Any object may hold strings of any length, which a random model can write until max_tokens: those rows
    # end with "length" (as any row does); every row that ends by itself is a JSON object.
    finished = []
    for model in ("pt", "prefix", "ptune", BASE):
        for options in OPTIONS:
            choice = post(env, path, body_for(path, model, JSON_OBJECT, **{**options, "max_tokens": 200}))["choices"][0]
            if choice["finish_reason"] == "stop":
                finished.append(conforms(text_of(path, choice), JSON_OBJECT))
    assert len(finished) >= 8 and (path == CHAT or any(finished)), finished  # completions: some are not {}


def test_a_mixed_batch_of_adapters_and_free_rows_gives_each_row_its_solo_result(env):
    cases = [
        (CHAT, "pt", JSON_SCHEMA, {"temperature": 0}),
        (C, "prefix", JSON_SCHEMA, {"temperature": 1.0, "seed": 5}),
        (CHAT, "ptune", JSON_OBJECT, {"temperature": 0}),
        (C, BASE, None, {"temperature": 0}),
        (C, "pt", None, {"temperature": 1.0, "seed": 9}),
        (CHAT, "prefix", None, {"temperature": 0}),
        (C, "ptune", JSON_SCHEMA, {"temperature": 1.0, "seed": 11, "n": 3}),
        (CHAT, BASE, JSON_OBJECT, {"temperature": 1.0, "seed": 2}),
    ]
    requests = [("POST", path, body_for(path, model, fmt, **options)) for path, model, fmt, options in cases]
    wide = wide_decode_steps(env)
    together = run_concurrently(env["server"].url, requests, concurrency=len(requests))
    assert wide_decode_steps(env) > wide  # the requests (10 rows) shared decoding steps
    for (path, model, fmt, options), (_, _, body), response in zip(cases, requests, together):
        assert response.status_code == 200, response.text
        mixed = response.json()["choices"]
        solo = post(env, path, body)["choices"]
        assert [text_of(path, c) for c in mixed] == [text_of(path, c) for c in solo], (model, fmt, options)
        for i, choice in enumerate(mixed):
            if fmt is not None and choice["finish_reason"] == "stop":
                conforms(text_of(path, choice), fmt)
            if options.get("n"):  # choice i samples from seed + i, as a request of its own
                alone = post(env, path, body_for(path, model, fmt, temperature=1.0, seed=options["seed"] + i))
                assert text_of(path, alone["choices"][0]) == text_of(path, choice)
        if fmt is None and path == C:  # a free row decodes exactly as offline
            sampled = {"do_sample": True, "seed": options["seed"]} if "seed" in options else {}
            want = env["model"].generate(
                [body["prompt"]], adapters=[None if model == BASE else model], max_new_tokens=120, **sampled
            )[0]
            assert text_of(path, mixed[0]) == want


@pytest.mark.parametrize("path", [CHAT, C], ids=["chat", "completions"])
def test_streamed_json_equals_the_answer_and_max_tokens_still_caps(env, path):
    body = body_for(path, "prefix", JSON_SCHEMA, temperature=0)
    whole = text_of(path, post(env, path, body)["choices"][0])
    response = env["client"].post(path, json={**body, "stream": True})
    events, done = parse_sse(response.text)
    assert done
    parts = [e["choices"][0]["delta"].get("content", "") if path == CHAT else e["choices"][0]["text"] for e in events]
    assert "".join(parts) == whole
    capped = post(env, path, {**body, "max_tokens": 5})["choices"][0]
    assert capped["finish_reason"] == "length" and whole.startswith(text_of(path, capped))


def test_the_openai_client_gets_json(env):
    client = openai.OpenAI(base_url=env["server"].url + "/v1", api_key="not-needed", max_retries=0)
    reply = client.chat.completions.create(
        model="ptune", messages=MESSAGES, max_tokens=120, temperature=0, response_format=JSON_SCHEMA
    )
    conforms(reply.choices[0].message.content, JSON_SCHEMA)
    reply = client.chat.completions.create(
        model="prefix", messages=MESSAGES, max_tokens=200, seed=7, response_format={"type": "json_object"}
    )
    assert reply.choices[0].finish_reason == "stop"
    conforms(reply.choices[0].message.content, JSON_OBJECT)
    with pytest.raises(openai.BadRequestError, match=r"response_format\.json_schema\.schema: Unimplemented keys"):
        client.chat.completions.create(
            model="pt",
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
            },
        )


@pytest.mark.parametrize(
    "fmt, param, reason",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
            "response_format.json_schema.schema",
            "Invalid type: foo",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}},
            "response_format.json_schema.schema",
            "does not exist",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}},
            "response_format.json_schema.schema",
            "valid dictionary",
        ),
        ({"type": "json_schema"}, "response_format", "json_schema is required"),
        ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format", "only allowed"),
        (
            {"type": "json_schema", "json_schema": {"name": "no spaces", "schema": SCHEMA}},
            "response_format.json_schema.name",
            "pattern",
        ),
        ({"type": "xml"}, "response_format.type", "'json_schema'"),
    ],
)
@pytest.mark.parametrize("path", [CHAT, C], ids=["chat", "completions"])
def test_a_bad_response_format_is_one_400_naming_it(env, path, fmt, param, reason):
    response = env["client"].post(path, json=body_for(path, "pt", fmt))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and reason in error["message"] and error["message"].startswith(param), error


def test_text_is_the_default_and_changes_nothing(env):
    body = body_for(C, "pt", None, temperature=0, max_tokens=12)
    assert post(env, C, {**body, "response_format": {"type": "text"}})["choices"] == post(env, C, body)["choices"]


def test_without_llguidance_a_json_request_is_one_400_with_the_install_command(monkeypatch):
    for name in ("llguidance", "llguidance.hf", "llguidance.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    from fastapi.testclient import TestClient

    with TestClient(create_app(lively_model(), ServerSettings())) as client:
        response = client.post(CHAT, json=body_for(CHAT, BASE, JSON_OBJECT))
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "response_format" and INSTALL in error["message"] and "\n" not in error["message"]
        assert client.post(CHAT, json=body_for(CHAT, BASE, None, max_tokens=3)).status_code == 200
