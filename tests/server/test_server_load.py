"""A bounded load run: 500 requests from 32 concurrent clients over mixed adapters and routes finish with zero
errors, in bounded time, with exactly the outputs of offline generation and scoring."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from softprompt.server import ServerSettings, create_app
from softprompt.server.prompting import fallback_chat_text

from serving import ServerThread, lively_model, offline_model, parse_sse, run_concurrently, save_adapters

REQUESTS, CLIENTS, TIME_LIMIT_S = 500, 32, 90
MODELS = ["pt", "prefix", "ptune", "tiny-gpt2"]
PROMPTS = [f"Load prompt {i}: {'lorem ipsum ' * (i % 4)}end" for i in range(20)]
LABELS = ["positive", "negative", "neutral"]


def _plan():
    """(kind, model, prompt, max_tokens) for every request: completions, streams, chats and classifications."""
    plan = []
    for i in range(REQUESTS):
        kind = ("completion", "completion", "stream", "chat", "classify")[i % 5]
        plan.append((kind, MODELS[(i // 5) % 4], PROMPTS[(i * 7) % len(PROMPTS)], 4 + i % 5))
    return plan


def _request(kind, model, prompt, max_tokens):
    if kind == "classify":
        return "POST", "/v1/classify", {"model": model, "input": prompt, "labels": LABELS}
    if kind == "chat":
        return (
            "POST",
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
    return (
        "POST",
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": kind == "stream"},
    )


def _expected(reference, plan):
    """Offline results for every distinct request, computed in a few mixed batches."""
    adapter = {m: (None if m == "tiny-gpt2" else m) for m in MODELS}
    generation = sorted(
        {
            (m, fallback_chat_text([{"role": "user", "content": p}]) if k == "chat" else p, n)
            for k, m, p, n in plan
            if k != "classify"
        }
    )
    want = {}
    for n in sorted({key[2] for key in generation}):
        keys = [key for key in generation if key[2] == n]
        texts = reference.generate([k[1] for k in keys], adapters=[adapter[k[0]] for k in keys], max_new_tokens=n)
        want.update(zip(keys, texts))
    scoring = sorted({(m, p) for k, m, p, _ in plan if k == "classify"})
    scores = reference.score([p for _, p in scoring], labels=LABELS, adapters=[adapter[m] for m, _ in scoring])
    want.update({("classify",) + key: result for key, result in zip(scoring, scores)})
    return want


def test_bounded_load_run_has_no_errors_and_offline_outputs(tmp_path):
    paths = save_adapters(tmp_path)
    plan = _plan()
    want = _expected(offline_model(paths), plan)
    settings = ServerSettings(adapters=paths, max_batch_size=32, batch_window_ms=5)
    with ServerThread(create_app(lively_model(), settings)) as server:
        started = time.monotonic()
        responses = run_concurrently(
            server.url, [_request(*item) for item in plan], concurrency=CLIENTS, timeout=TIME_LIMIT_S
        )
        elapsed = time.monotonic() - started
        with server.client() as client:
            metrics = client.get("/metrics").text
            health = client.get("/health").json()

    errors = [(item, r.status_code, r.text[:200]) for item, r in zip(plan, responses) if r.status_code != 200]
    assert not errors, errors[:5]
    assert elapsed < TIME_LIMIT_S
    mismatches = []
    for (kind, model, prompt, n), response in zip(plan, responses):
        if kind == "classify":
            ref = want[("classify", model, prompt)]
            row = response.json()["data"][0]
            if row["label"] != ref.label or row["scores"] != pytest.approx(ref.scores, abs=1e-4):
                mismatches.append((kind, model, prompt))
            continue
        if kind == "stream":
            events, done = parse_sse(response.text)
            text = "".join(e["choices"][0]["text"] for e in events) if done else None
        elif kind == "chat":
            text = response.json()["choices"][0]["message"]["content"]
            prompt = fallback_chat_text([{"role": "user", "content": prompt}])
        else:
            text = response.json()["choices"][0]["text"]
        if text != want[(model, prompt, n)]:
            mismatches.append((kind, model, prompt, n))
    assert not mismatches, mismatches[:5]

    samples = [s for f in text_string_to_metric_families(metrics) for s in f.samples]
    decode = {
        s.labels["le"]: s.value
        for s in samples
        if s.name == "softprompt_batch_size_bucket" and s.labels.get("phase") == "decode"
    }
    assert decode["+Inf"] - decode["4.0"] > 0  # steps with more than 4 rows: the load was batched across adapters
    assert health["queue_depth"] == 0 and health["running"] == 0
    print(f"\n{REQUESTS} requests, {CLIENTS} clients: {elapsed:.1f} s ({REQUESTS / elapsed:.0f} req/s)")
