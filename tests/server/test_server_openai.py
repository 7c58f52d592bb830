"""OpenAI's echo, logprobs, max_tokens 0 and n on a live server, checked against the offline engine
(`model.score`, `model.generate`) with adapters of every method, mixed in one batch."""

from __future__ import annotations

import math

import pytest

from softprompt.server import ServerSettings, create_app

from serving import ServerThread, lively_model, offline_model, parse_sse, run_concurrently, save_adapters

BASE = "tiny-gpt2"
ADAPTERS = ["pt", "prefix", "ptune"]
C, CHAT = "/v1/completions", "/v1/chat/completions"
CONTEXT, CONTINUATION = "Question: is the soup hot?\nAnswer:", " yes, very"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    paths = save_adapters(tmp_path_factory.mktemp("openai"))
    settings = ServerSettings(adapters=paths, max_batch_size=4, batch_window_ms=20, max_prompt_tokens=200)
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:
        yield {"server": server, "client": client, "model": offline_model(paths)}


def adapter_of(name):
    return None if name == BASE else name


def post(env, path, body):
    response = env["client"].post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_logprobs_score_the_prompt_as_model_score_does_with_mixed_adapters_in_one_batch(env):
    tokenizer = env["model"].tokenizer
    context = tokenizer(CONTEXT)["input_ids"]
    ids = context + tokenizer(CONTINUATION, add_special_tokens=False)["input_ids"]
    names = ADAPTERS + [BASE]
    bodies = [
        ("POST", C, {"model": name, "prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0}) for name in names
    ]
    responses = run_concurrently(env["server"].url, bodies, concurrency=len(bodies))  # one scoring batch, 4 adapters
    for name, response in zip(names, responses):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        logprobs = choice["logprobs"]
        assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
        assert len(logprobs["tokens"]) == len(ids) and "".join(logprobs["tokens"]) == choice["text"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
        want = env["model"].score([CONTEXT], [CONTINUATION], adapters=adapter_of(name))[0].scores[CONTINUATION]
        assert sum(logprobs["token_logprobs"][len(context) :]) == pytest.approx(want, abs=1e-4), name
        for token, logprob, top in zip(
            logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]
        ):
            # 3 alternatives plus the chosen token, keyed by text (byte tokens that read alike as one key)
            assert top[token] == pytest.approx(logprob) and 1 <= len(top) <= 4
            assert max(top.values()) >= logprob and all(v <= 0 for v in top.values())
    usage = responses[0].json()["usage"]
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_lm_evals_request_echo_logprobs_and_one_token(env):
    """What lm-eval's local-completions sends for loglikelihood: token ids, echo, logprobs 1, max_tokens 1."""
    tokenizer = env["model"].tokenizer
    prompts = [tokenizer(text)["input_ids"] for text in ("The cat", "A much longer prompt than the first one")]
    scored = post(env, C, {"model": "prefix", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0})
    body = post(
        env,
        C,
        {
            "model": "prefix",
            "prompt": prompts,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
            "seed": 1234,
        },
    )
    for ids, plain, choice in zip(prompts, scored["choices"], body["choices"]):
        want = env["model"].generate(
            [tokenizer.decode(ids)], adapters=["prefix"], max_new_tokens=1, return_details=True
        )[0]
        assert choice["text"] == tokenizer.decode(ids) + want.text
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1  # the one drawn token is listed, even an end of sequence
        assert logprobs["token_logprobs"][:-1] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
        drawn = logprobs["top_logprobs"][-1]
        assert logprobs["token_logprobs"][-1] == pytest.approx(max(drawn.values()))  # greedy: the likeliest
        assert logprobs["text_offset"][-1] == len(tokenizer.decode(ids))


def test_logprobs_without_echo_cover_the_generated_tokens(env):
    body = post(env, C, {"model": "pt", "prompt": "Hello", "max_tokens": 6, "logprobs": 2, "temperature": 0})
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) >= body["usage"]["completion_tokens"]
    assert logprobs["text_offset"][0] == len("Hello")
    assert all(math.isfinite(v) and v <= 0 for v in logprobs["token_logprobs"])
    assert post(env, C, {"model": "pt", "prompt": "Hello", "max_tokens": 6})["choices"][0]["logprobs"] is None


def test_n_choices_are_seeded_one_by_one_and_greedy_choices_agree(env):
    body = post(
        env, C, {"model": "ptune", "prompt": ["Once", "Twice"], "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 41}
    )
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for prompt_index, prompt in enumerate(["Once", "Twice"]):
        for j in range(3):
            alone = post(
                env, C, {"model": "ptune", "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 41 + j}
            )
            assert body["choices"][prompt_index * 3 + j]["text"] == alone["choices"][0]["text"]
        want = env["model"].generate([prompt], adapters=["ptune"], do_sample=True, seed=41, max_new_tokens=8)[0]
        assert body["choices"][prompt_index * 3]["text"] == want
    greedy = post(env, C, {"model": "pt", "prompt": "Once", "n": 3, "max_tokens": 8, "temperature": 0})
    assert len({c["text"] for c in greedy["choices"]}) == 1


def test_a_request_larger_than_the_batch_is_decoded_in_parts(env):
    prompts = [f"Prompt number {i}" for i in range(10)]  # max_batch_size is 4
    body = post(env, C, {"model": "prefix", "prompt": prompts, "max_tokens": 5, "temperature": 0})
    want = env["model"].generate(prompts, adapters="prefix", max_new_tokens=5)
    assert [c["text"] for c in body["choices"]] == want


def test_chat_logprobs_and_n(env):
    messages = [{"role": "user", "content": "Tell me something"}]
    body = post(
        env,
        CHAT,
        {
            "model": "pt",
            "messages": messages,
            "max_tokens": 6,
            "temperature": 0,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == choice["message"]["content"]
        for token in content:
            assert len(token["top_logprobs"]) == 3 and token["bytes"] == list(token["token"].encode())
            assert token["logprob"] == pytest.approx(token["top_logprobs"][0]["logprob"])  # greedy
    plain = post(env, CHAT, {"model": "pt", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == body["choices"][0]["message"]


def test_streamed_echo_and_streamed_n(env):
    response = env["client"].post(
        C, json={"model": "pt", "prompt": "Echo me", "echo": True, "max_tokens": 0, "stream": True}
    )
    events, done = parse_sse(response.text)
    assert done and [e["choices"][0]["text"] for e in events] == ["Echo me"]
    assert events[0]["choices"][0]["finish_reason"] == "length"
    response = env["client"].post(
        C,
        json={
            "model": "pt",
            "prompt": "Echo me",
            "echo": True,
            "max_tokens": 4,
            "n": 2,
            "stream": True,
            "temperature": 0,
        },
    )
    events, done = parse_sse(response.text)
    texts = ["", ""]
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    want = env["model"].generate(["Echo me"], adapters="pt", max_new_tokens=4)[0]
    assert done and texts == ["Echo me" + want] * 2


def test_too_many_prompts_names_the_limit_and_the_flag(env):
    response = env["client"].post(C, json={"model": "pt", "prompt": ["x"] * 65})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "at most 64 prompts" in message and "--max-inputs" in message
    assert ServerSettings().max_inputs >= 20  # lm-eval's batch of 20 fits by default
