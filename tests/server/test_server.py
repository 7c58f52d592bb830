"""The HTTP server end to end: a real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread,
a tiny model with one adapter of each method loaded from files, compared with offline `model.generate`/`score`."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from softprompt.errors import SoftPromptError
from softprompt.server import ServerSettings, create_app
from softprompt.server.prompting import chat_prompt_ids, fallback_chat_text

from serving import ServerThread, lively_model, offline_model, parse_sse, raw_request, run_concurrently, save_adapters
from tiny import tiny_tokenizer

TOKEN = "test-admin-token-0123456789"
BASE = "tiny-gpt2"
MODELS = ["pt", "prefix", "ptune", BASE]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    adapter_dir = root / "adapters"
    paths = save_adapters(adapter_dir, names=("pt", "prefix", "ptune", "spare"))
    late = save_adapters(root / "later", names=("late",))  # copied into adapter_dir after the server starts
    outside = save_adapters(root / "outside", names=("secret",))
    os.symlink(outside["secret"], adapter_dir / "escape")  # a symlink that leaves adapter_dir
    reference = offline_model({**paths, **late})
    settings = ServerSettings(
        adapters={n: paths[n] for n in ("pt", "prefix", "ptune")},
        adapter_dir=str(adapter_dir),
        enable_admin=True,
        admin_token=TOKEN,
        max_batch_size=8,
        batch_window_ms=5,
        max_prompt_tokens=200,
        max_tokens_limit=250,
        max_body_bytes=16384,
        max_inputs=4,
    )
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:
        yield {
            "server": server,
            "client": client,
            "model": reference,
            "root": root,
            "late": late,
            "adapter_dir": adapter_dir,
        }


def adapter_of(model_name):
    return None if model_name == BASE else model_name


def offline(env, prompt, model_name, **options):
    return env["model"].generate([prompt], adapters=[adapter_of(model_name)], return_details=True, **options)[0]


def metric_samples(client):
    text = client.get("/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


# ---------------------------------------------------------------------------- models, health
def test_models_lists_base_and_every_adapter(env):
    body = env["client"].get("/v1/models").json()
    cards = {card["id"]: card for card in body["data"]}
    assert body["object"] == "list"
    assert set(cards) >= {BASE, "pt", "prefix", "ptune", "spare"}  # spare: found in --adapter-dir
    assert "escape" not in cards  # resolves outside the adapter dir: never registered
    assert cards["prefix"]["method"] == "prefix_tuning" and cards["ptune"]["method"] == "p_tuning"
    assert cards["pt"]["parent"] == BASE and cards[BASE]["parent"] is None
    health = env["client"].get("/health").json()
    assert health["status"] == "ok" and health["model"] == BASE
    assert env["client"].get("/v1/models/ptune").json() == cards["ptune"]
    assert env["client"].get("/v1/models/ghost").status_code == 404


# ---------------------------------------------------------------------------- generation equals offline
def test_concurrent_requests_over_mixed_adapters_equal_offline(env):
    prompts = [f"Request {i}: {'hello world ' * (i % 3)}tell me" for i in range(16)]
    bodies = [{"model": MODELS[i % 4], "prompt": p, "max_tokens": 10, "temperature": 0} for i, p in enumerate(prompts)]
    responses = run_concurrently(env["server"].url, [("POST", "/v1/completions", b) for b in bodies], concurrency=16)
    texts = set()
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        got = response.json()
        want = offline(env, body["prompt"], body["model"], max_new_tokens=10)
        assert got["object"] == "text_completion" and got["model"] == body["model"] and got["id"].startswith("cmpl-")
        assert got["choices"][0]["text"] == want.text
        assert got["choices"][0]["finish_reason"] == want.finish_reason
        assert got["usage"] == {
            "prompt_tokens": want.prompt_tokens,
            "completion_tokens": len(want.token_ids),
            "total_tokens": want.prompt_tokens + len(want.token_ids),
        }
        texts.add(want.text)
    assert len(texts) > 8  # the outputs differ, so equality means something
    decode = {
        s.labels.get("le"): s.value
        for s in metric_samples(env["client"])
        if s.name == "softprompt_batch_size_bucket" and s.labels.get("phase") == "decode"
    }
    assert decode["+Inf"] > decode["1.0"]  # some decoding steps carried several rows: requests were batched


def test_prompt_list_and_token_ids(env):
    client = env["client"]
    prompts = ["first prompt", "second, longer prompt"]
    got = client.post(
        "/v1/completions", json={"model": "prefix", "prompt": prompts, "max_tokens": 6, "temperature": 0}
    ).json()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["text"] for c in got["choices"]] == [offline(env, p, "prefix", max_new_tokens=6).text for p in prompts]
    ids = env["model"].tokenizer(prompts[0])["input_ids"]
    by_ids = client.post(
        "/v1/completions", json={"model": "prefix", "prompt": ids, "max_tokens": 6, "temperature": 0}
    ).json()
    assert by_ids["choices"][0]["text"] == got["choices"][0]["text"]


def test_streaming_returns_the_same_text(env):
    for model_name in MODELS:
        prompt = f"Stream this for {model_name}"
        want = offline(env, prompt, model_name, max_new_tokens=12)
        response = env["client"].post(
            "/v1/completions",
            json={
                "model": model_name,
                "prompt": prompt,
                "max_tokens": 12,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events, done = parse_sse(response.text)
        assert done
        chunks, usage = events[:-1], events[-1]
        assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
        assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == want.finish_reason
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.token_ids)


def test_a_client_that_disconnects_mid_stream_frees_its_row(env):
    long = next(
        p
        for p in (f"Run long {i}" for i in range(20))
        if offline(env, p, "pt", max_new_tokens=200).finish_reason == "length"
    )

    def completion_tokens():
        return sum(
            s.value
            for s in metric_samples(env["client"])
            if s.name == "softprompt_tokens_total" and s.labels.get("kind") == "completion"
        )

    before = completion_tokens()
    with (
        env["server"].client() as own,
        own.stream(
            "POST", C, json={"model": "pt", "prompt": long, "max_tokens": 200, "temperature": 0, "stream": True}
        ) as response,
    ):
        next(response.iter_lines())  # the first event arrived: the row is decoding; now hang up
    deadline = time.monotonic() + 10
    while env["client"].get("/health").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert completion_tokens() - before < 200  # it stopped early instead of generating all 200 tokens


def test_stop_strings_and_seeded_sampling_equal_offline(env):
    client = env["client"]
    prompt = "Where does it stop?"
    full = offline(env, prompt, "ptune", max_new_tokens=14)
    stop = full.text[3:5]
    want = offline(env, prompt, "ptune", max_new_tokens=14, stop=[stop])
    body = {"model": "ptune", "prompt": prompt, "max_tokens": 14, "temperature": 0, "stop": stop}
    got = client.post("/v1/completions", json=body).json()["choices"][0]
    assert (got["text"], got["finish_reason"]) == (want.text, "stop") and stop not in got["text"]
    events, _ = parse_sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == want.text  # nothing of the stop string leaked

    sampling = dict(temperature=0.9, top_p=0.8, seed=1234)
    want = offline(env, prompt, "pt", max_new_tokens=12, do_sample=True, **sampling)
    greedy = offline(env, prompt, "pt", max_new_tokens=12)
    assert want.text != greedy.text
    bodies = [{"model": "pt", "prompt": prompt, "max_tokens": 12, **sampling}] * 3 + [
        {"model": m, "prompt": "noise", "max_tokens": 12} for m in MODELS
    ]
    responses = run_concurrently(env["server"].url, [("POST", "/v1/completions", b) for b in bodies], concurrency=7)
    assert [r.json()["choices"][0]["text"] for r in responses[:3]] == [want.text] * 3


def test_chat_uses_the_fallback_template_and_streams(env):
    client = env["client"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = offline(env, fallback_chat_text(messages), "prefix", max_new_tokens=10)
    got = client.post(
        "/v1/chat/completions", json={"model": "prefix", "messages": messages, "max_tokens": 10, "temperature": 0}
    ).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": want.text, "refusal": None}
    assert got["usage"]["prompt_tokens"] == want.prompt_tokens
    response = client.post(
        "/v1/chat/completions",
        json={"model": "prefix", "messages": messages, "max_tokens": 10, "temperature": 0, "stream": True},
    )
    events, done = parse_sse(response.text)
    assert done and events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == want.text
    assert events[-1]["choices"][0]["finish_reason"] == want.finish_reason


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer = tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(tokenizer, messages) == tokenizer("User: hi\nAssistant:")["input_ids"]
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert (
        chat_prompt_ids(tokenizer, messages) == tokenizer("<user>hi<assistant>", add_special_tokens=False)["input_ids"]
    )


def test_classify_equals_model_score(env):
    texts = ["the first text", "another one", "x"]
    labels = ["yes", "no", "maybe so"]
    for model_name in ("ptune", "prefix", BASE):
        response = env["client"].post("/v1/classify", json={"model": model_name, "input": texts, "labels": labels})
        assert response.status_code == 200, response.text
        got = response.json()
        want = env["model"].score(texts, labels=labels, adapters=adapter_of(model_name))
        assert got["object"] == "classification" and got["usage"]["prompt_tokens"] > 0
        for row, ref in zip(got["data"], want):
            assert row["label"] == ref.label
            assert row["scores"] == pytest.approx(ref.scores, abs=1e-4)
            assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    mean = (
        env["client"]
        .post("/v1/classify", json={"model": "pt", "input": "x", "labels": labels, "normalize": "mean"})
        .json()
    )
    ref = env["model"].score(["x"], labels=labels, adapters="pt", normalize="mean")[0]
    assert mean["data"][0]["scores"] == pytest.approx(ref.scores, abs=1e-4)


# ---------------------------------------------------------------------------- the official client
def test_official_openai_client_works_unchanged(env):
    client = openai.OpenAI(
        base_url=env["server"].url + "/v1",
        api_key="not-needed",
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=60),
    )
    assert {m.id for m in client.models.list()} >= set(MODELS)
    prompt = "The openai client says"
    want = offline(env, prompt, "prefix", max_new_tokens=9)
    completion = client.completions.create(model="prefix", prompt=prompt, max_tokens=9, temperature=0)
    assert completion.choices[0].text == want.text and completion.usage.completion_tokens == len(want.token_ids)
    stream = client.completions.create(model="prefix", prompt=prompt, max_tokens=9, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want.text

    messages = [{"role": "user", "content": "Hi from the client"}]
    want = offline(env, fallback_chat_text(messages), "pt", max_new_tokens=8)
    chat = client.chat.completions.create(model="pt", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == want.text and chat.choices[0].finish_reason == want.finish_reason
    stream = client.chat.completions.create(model="pt", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == want.text
    ranked = client.post("/classify", cast_to=object, body={"model": "pt", "input": "x", "labels": ["yes", "no"]})
    assert ranked["data"][0]["label"] == env["model"].score(["x"], labels=["yes", "no"], adapters="pt")[0].label
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert [c.index for c in client.completions.create(model="pt", prompt="x", max_tokens=2, n=2).choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="pt", prompt="x", max_tokens=2, best_of=2)


# ---------------------------------------------------------------------------- client mistakes: 4xx, never 5xx
C, CHAT, CLS = "/v1/completions", "/v1/chat/completions", "/v1/classify"
OK = {"model": "pt", "prompt": "x"}
BAD_REQUESTS = [
    ("not json", C, b"{bad", 400, None),
    ("json array", C, b"[1, 2]", 400, None),
    ("empty body", C, b"", 400, None),
    ("not utf-8", C, b"\xff\xfe{}", 400, None),
    ("too deep", C, b"[" * 8000 + b"]" * 8000, 400, None),
    ("missing prompt", C, {"model": "pt"}, 400, "prompt"),
    ("prompt wrong type", C, {"model": "pt", "prompt": 5}, 400, "prompt"),
    ("model wrong type", C, {"model": 5, "prompt": "x"}, 400, "model"),
    ("max_tokens string", C, {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens zero", C, {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over limit", C, {**OK, "max_tokens": 251}, 400, "max_tokens"),
    ("temperature string", C, {**OK, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", C, {**OK, "temperature": 3}, 400, "temperature"),
    ("stream not bool", C, {**OK, "stream": "yes"}, 400, "stream"),
    ("seed string", C, {**OK, "seed": "1"}, 400, "seed"),
    ("five stops", C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n=0", C, {**OK, "n": 0}, 400, "n"),
    ("n x prompts over --max-inputs", C, {**OK, "n": 5}, 400, "prompt"),
    ("logprobs over 5", C, {**OK, "logprobs": 6}, 400, "logprobs"),
    ("logprobs while streaming", C, {**OK, "logprobs": 1, "stream": True}, 400, "logprobs"),
    ("max_tokens zero without echo", C, {**OK, "max_tokens": 0, "echo": False}, 400, "max_tokens"),
    ("best_of", C, {**OK, "best_of": 2}, 400, "best_of"),
    ("unknown field", C, {**OK, "frobnicate": 1}, 400, "frobnicate"),
    ("stream_options without stream", C, {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("empty prompt", C, {"model": "pt", "prompt": ""}, 400, "prompt"),
    ("token id out of vocab", C, {"model": "pt", "prompt": [1, 99999]}, 400, "prompt"),
    ("too many prompts", C, {"model": "pt", "prompt": ["a"] * 5}, 400, "prompt"),
    ("prompt too long", C, {"model": "pt", "prompt": "x" * 201}, 400, "prompt"),
    ("context exceeded", C, {"model": "pt", "prompt": "x" * 190, "max_tokens": 64}, 400, "prompt"),
    ("unknown adapter", C, {"model": "ghost", "prompt": "x"}, 404, "model"),
    ("body too large", C, {"model": "pt", "prompt": "x" * 20000}, 413, None),
    ("chat empty messages", CHAT, {"model": "pt", "messages": []}, 400, "messages"),
    ("chat bad role", CHAT, {"model": "pt", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("chat messages string", CHAT, {"model": "pt", "messages": "hi"}, 400, "messages"),
    (
        "chat top_logprobs without logprobs",
        CHAT,
        {"model": "pt", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "chat top_logprobs over 20",
        CHAT,
        {"model": "pt", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    ("chat tools", CHAT, {"model": "pt", "messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools"),
    ("chat unknown adapter", CHAT, {"model": "ghost", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("classify duplicate labels", CLS, {"model": "pt", "input": "a", "labels": ["x", "x"]}, 400, "labels"),
    ("classify no input", CLS, {"model": "pt", "input": [], "labels": ["x"]}, 400, "input"),
    ("classify too many inputs", CLS, {"model": "pt", "input": ["a"] * 5, "labels": ["x"]}, 400, "input"),
    ("classify unknown adapter", CLS, {"model": "ghost", "input": "a", "labels": ["x"]}, 404, "model"),
]


@pytest.mark.parametrize("name, path, body, status, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_client_mistakes_get_a_clear_4xx(env, name, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = env["client"].post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error


def test_streamed_oversized_body_and_unknown_routes_are_4xx(env):
    client = env["client"]
    chunks = (b'{"model": "pt", "prompt": "' + b"x" * 1000 for _ in range(20))  # chunked: no Content-Length
    response = client.post(C, content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "bytes" in response.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    response = client.get(C)
    assert response.status_code == 405 and response.json()["error"]["message"]
    assert client.post("/health").status_code == 405


# ---------------------------------------------------------------------------- admin endpoints
def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers", [{}, auth("wrong-token-0123456789"), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}]
)
def test_admin_needs_the_bearer_token(env, headers):
    for method in ("POST", "DELETE"):
        response = env["client"].request(method, "/admin/adapters/pt", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert "pt" in {c["id"] for c in env["client"].get("/v1/models").json()["data"]}  # nothing was unloaded


@pytest.mark.parametrize(
    "name, post_status, delete_status",
    [
        ("..", 400, 400),
        ("%2E%2E", 400, 400),
        (".hidden", 400, 400),
        ("a" * 65, 400, 400),
        ("bad%20name", 400, 400),
        ("-dash", 400, 400),
        ("..%2F..%2Fetc", 404, 404),
        ("escape", 400, 404),
        ("missing", 404, 404),
    ],
)
def test_admin_refuses_traversal_and_bad_names(env, name, post_status, delete_status):
    # Compare model ids: each entry's "created" time may tick over between the two calls on a slow machine.
    before = [m["id"] for m in env["client"].get("/v1/models").json()["data"]]
    for method, status in (("POST", post_status), ("DELETE", delete_status)):
        code, body = raw_request(env["server"].url, method, f"/admin/adapters/{name}", headers=auth())
        assert code == status, body
        assert body["error"]["message"]
    assert [m["id"] for m in env["client"].get("/v1/models").json()["data"]] == before


def test_admin_loads_and_unloads_by_name(env):
    client, adapter_dir = env["client"], env["adapter_dir"]
    assert client.post(C, json={"model": "late", "prompt": "x"}).status_code == 404
    broken = adapter_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    response = client.post("/admin/adapters/broken", headers=auth())
    assert response.status_code == 400 and "broken" in response.json()["error"]["message"]

    shutil.copytree(env["late"]["late"], adapter_dir / "late")  # appears after the server started
    response = client.post("/admin/adapters/late", headers=auth())
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "late" and response.json()["resident"] is True
    want = offline(env, "hello late", "late", max_new_tokens=8)
    got = client.post(C, json={"model": "late", "prompt": "hello late", "max_tokens": 8, "temperature": 0}).json()
    assert got["choices"][0]["text"] == want.text
    assert "late" in {c["id"] for c in client.get("/v1/models").json()["data"]}

    assert client.delete("/admin/adapters/late", headers=auth()).json() == {
        "object": "adapter",
        "id": "late",
        "deleted": True,
    }
    assert client.post(C, json={"model": "late", "prompt": "x"}).status_code == 404
    assert client.delete("/admin/adapters/late", headers=auth()).status_code == 404


def test_loading_an_adapter_does_not_stall_requests_for_others(env, monkeypatch):
    import softprompt.server.registry as registry

    slow_read = registry.read_adapter

    def read_slowly(*args):
        time.sleep(1.0)  # a slow disk: the read happens on a worker thread, not the model thread
        return slow_read(*args)

    monkeypatch.setattr(registry, "read_adapter", read_slowly)
    shutil.copytree(env["late"]["late"], env["adapter_dir"] / "slow")
    result = {}

    def load():
        with env["server"].client() as own:
            result["status"] = own.post("/admin/adapters/slow", headers=auth()).status_code
        result["loaded"] = time.monotonic()

    thread = threading.Thread(target=load)
    started = time.monotonic()
    thread.start()
    time.sleep(0.1)
    response = env["client"].post(C, json={"model": "pt", "prompt": "meanwhile", "max_tokens": 4, "temperature": 0})
    answered = time.monotonic()
    thread.join(30)
    assert response.status_code == 200 and result["status"] == 200
    assert answered < result["loaded"] and answered - started < 0.9  # served while the other adapter loaded
    assert env["client"].delete("/admin/adapters/slow", headers=auth()).status_code == 200


# ---------------------------------------------------------------------------- metrics
def test_metrics_expose_requests_latency_batches_queue_and_adapters(env):
    client = env["client"]
    client.post(C, json={"model": "pt", "prompt": "count me", "max_tokens": 2})
    client.post(C, json={"model": "ghost", "prompt": "count me"})
    samples = metric_samples(client)

    def value(name, **labels):
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("softprompt_requests_total", route="/v1/completions", status="200") >= 1
    assert value("softprompt_requests_total", route="/v1/completions", status="404") >= 1
    assert value("softprompt_request_latency_seconds_count", route="/v1/completions") >= 2
    assert value("softprompt_batch_size_count", phase="prefill") >= 1
    assert value("softprompt_queue_depth") == 0
    resident = sum(c["resident"] for c in client.get("/v1/models").json()["data"] if c["parent"])
    assert value("softprompt_adapters_resident") == resident >= 4
    assert value("softprompt_tokens_total", kind="prompt") > 0


# ---------------------------------------------------------------------------- small servers: queue, LRU, defaults
def test_full_queue_gives_503_with_retry_after(tmp_path):
    paths = save_adapters(tmp_path, names=("pt",))
    reference = offline_model(paths)
    prompt = next(
        p
        for p in (f"Long run {i}" for i in range(20))
        if offline(dict(model=reference), p, "pt", max_new_tokens=150).finish_reason == "length"
    )
    settings = ServerSettings(adapters=paths, max_batch_size=1, max_queue=1, retry_after_s=2)
    with ServerThread(create_app(lively_model(), settings)) as server:
        body = {"model": "pt", "prompt": prompt, "max_tokens": 150, "temperature": 0}
        responses = run_concurrently(server.url, [("POST", C, body)] * 10, concurrency=10)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "2" and r.json()["error"]["code"] == "queue_full"
        with server.client() as client:  # it recovers, and the admin endpoints are off by default
            assert client.post(C, json={"model": "pt", "prompt": "ok", "max_tokens": 2}).status_code == 200
            assert client.post("/admin/adapters/pt", headers=auth()).status_code == 404
            assert client.delete("/admin/adapters/pt", headers=auth()).status_code == 404


def test_least_recently_used_adapter_is_evicted_but_never_one_in_use(tmp_path):
    paths = save_adapters(tmp_path, names=("a", "b", "c"))
    reference = offline_model(paths)
    ref = dict(model=reference)
    long = next(
        p
        for p in (f"Long run {i}" for i in range(30))
        if all(offline(ref, p, m, max_new_tokens=120).finish_reason == "length" for m in ("a", "b"))
    )
    settings = ServerSettings(adapter_dir=str(tmp_path), max_resident_adapters=2, batch_window_ms=1)
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:

        def resident():
            return {c["id"] for c in client.get("/v1/models").json()["data"] if c["parent"] and c["resident"]}

        def ask(name, prompt="eviction check"):
            got = client.post(C, json={"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0}).json()
            assert got["choices"][0]["text"] == offline(ref, prompt, name, max_new_tokens=6).text
            return resident()

        assert resident() == {"a", "b"}  # the first two in name order
        assert ask("a") == {"a", "b"}
        assert ask("c") == {"a", "c"}  # b was the least recently used
        assert ask("b") == {"b", "c"}  # then a
        assert ask("c") == {"b", "c"}

        # a and b busy with long generations: c must wait for one of them to end, not evict it mid-flight.
        done: dict[str, float] = {}

        def long_run(name):
            body = {"model": name, "prompt": long, "max_tokens": 120, "temperature": 0}
            with server.client() as own:
                response = own.post(C, json=body)
            done[name] = time.monotonic()
            assert response.json()["choices"][0]["text"] == offline(ref, long, name, max_new_tokens=120).text

        threads = [threading.Thread(target=long_run, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while client.get("/health").json()["running"] < 2:  # both long runs are decoding
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert ask("c", "quick") >= {"c"}
        done["c"] = time.monotonic()
        for thread in threads:
            thread.join(60)
        assert set(done) == {"a", "b", "c"}
        assert done["c"] > min(done["a"], done["b"])  # c only loaded once a long run had released its adapter
        evictions = sum(s.value for s in metric_samples(client) if s.name == "softprompt_adapter_evictions_total")
        assert evictions in (4, 5)  # b, a; one or two for the long runs (by arrival order); one for c


def test_serve_loads_the_model_and_adapters_and_runs_uvicorn(tmp_path, monkeypatch):
    import uvicorn

    from softprompt.cli.common import parse_adapter_specs
    from softprompt.cli.serve import add_arguments as add_serve_arguments
    from softprompt.cli.serve import run as cmd_serve

    from tiny import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint("gpt2", tmp_path / "model")
    paths = save_adapters(tmp_path / "adapters", names=("pt", "prefix"))
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            checkpoint,
            "--adapter",
            f"pt={paths['pt']}",
            "--adapter",
            paths["prefix"],
            "--port",
            "8123",
            "--max-batch-size",
            "4",
            "--served-model-name",
            "base",
        ]
    )
    assert parse_adapter_specs(args.adapter) == paths
    assert cmd_serve(args) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    app = seen["app"]
    assert app.state.settings.max_batch_size == 4 and app.state.base_name == "base"
    assert set(app.state.model.adapter_names()) == {"pt", "prefix"}
    with pytest.raises(Exception, match="admin"):
        cmd_serve(parser.parse_args(["--model", checkpoint, "--enable-admin"]))


def test_missing_serving_packages_name_a_command_that_works_from_a_checkout(monkeypatch):
    """Without fastapi the error names set-up commands that work (no index serves 'softprompt[serve]')."""
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name == "fastapi":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    with pytest.raises(SoftPromptError) as caught:
        create_app(None)
    message = str(caught.value)
    assert message.startswith("serving needs fastapi:") and "bash scripts/setup.sh" in message
    assert "pip install 'softprompt[serve]'" not in message
