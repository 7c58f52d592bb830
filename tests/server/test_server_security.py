"""Security checks of the HTTP server beyond tests/server/test_server.py: admin tokens (constant-time, never
optional), adapter names that try to leave ``--adapter-dir`` (encoded traversal, absolute paths, NUL
bytes, newlines, very long names, symlinks to outside), request-body caps that hold against chunked
bodies and lying Content-Length headers, caps on generated lengths and on inputs/labels/stop strings,
and JSON the parser cannot take (huge numbers, lone surrogates). Every refusal is one JSON error, 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
from urllib.parse import urlsplit

import pytest

from softprompt.errors import ConfigError
from softprompt.server import ServerSettings, create_app

from serving import ServerThread, lively_model, save_adapters

TOKEN = "security-admin-token-0123456789"
C, CHAT, CLS = "/v1/completions", "/v1/chat/completions", "/v1/classify"
MAX_BODY = 8192


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    adapter_dir = root / "adapters"
    save_adapters(adapter_dir, names=("pt", "prefix"))
    outside = save_adapters(root / "outside", names=("secret",))
    os.symlink(outside["secret"], adapter_dir / "abs-link")  # absolute symlink out of the dir
    os.symlink(os.path.join("..", "outside", "secret"), adapter_dir / "rel-link")  # relative one
    os.symlink(outside["secret"] + "/adapter_config.json", adapter_dir / "file-link")  # to a file outside
    save_adapters(root / "nl", names=("nl",))
    os.rename(root / "nl" / "nl", adapter_dir / "nl\n")  # a name that only a `re.match(...$)` check accepts
    settings = ServerSettings(
        adapter_dir=str(adapter_dir),
        enable_admin=True,
        admin_token=TOKEN,
        max_batch_size=4,
        batch_window_ms=1,
        max_prompt_tokens=100,
        max_tokens_limit=32,
        max_body_bytes=MAX_BODY,
        max_inputs=3,
        max_labels=5,
    )
    with ServerThread(create_app(lively_model(), settings)) as server, server.client() as client:
        yield {"server": server, "client": client, "root": root}


def model_ids(env) -> list[str]:
    return [m["id"] for m in env["client"].get("/v1/models").json()["data"]]


def auth(token=TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def raw(env, request: bytes, read_timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes exactly as given on a fresh connection; returns (status, body) of the first response."""
    parts = urlsplit(env["server"].url)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        # The server may answer and close before reading everything: the response is still there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        while length is not None and len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return status, body


def assert_one_json_error(body: bytes, status: int, param: str | None = "") -> dict:
    assert b"Traceback" not in body and b'File "' not in body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "":
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------------------- admin tokens
def test_admin_token_is_compared_with_hmac_compare_digest(env, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    client = env["client"]
    wrong = client.post("/admin/adapters/missing-one", headers=auth(TOKEN[:-1] + "x"))  # same length, last byte off
    right = client.post("/admin/adapters/missing-one", headers=auth())
    assert wrong.status_code == 401 and right.status_code == 404  # the right token gets past auth (no such dir)
    assert TOKEN not in wrong.text and TOKEN[:-1] not in wrong.text  # the token is never echoed
    assert calls == [(bytes, bytes), (bytes, bytes)]  # both decided by the constant-time comparison


@pytest.mark.parametrize(
    "options, message",
    [
        ({"enable_admin": True}, "needs a token"),
        ({"enable_admin": True, "admin_token": "short-token"}, "at least 16"),
        ({"enable_admin": True, "admin_token": "x" * 16}, "--adapter-dir"),
    ],
)
def test_admin_cannot_be_enabled_without_a_strong_token_and_an_adapter_dir(monkeypatch, options, message):
    monkeypatch.delenv("SOFTPROMPT_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=message):
        ServerSettings(**options).validate()


# ---------------------------------------------------------------------------- adapter names
TRAVERSALS = [
    ("%2e%2e%2fouside", (400, 404)),
    ("%2e%2e%2f%2e%2e%2fetc%2fpasswd", (404,)),
    ("..%5c..%5csecret", (400,)),
    ("%2fetc%2fpasswd", (404,)),
    ("/etc/passwd", (404,)),
    ("pt%00", (400,)),
    ("%00", (400,)),
    ("pt%0a", (400,)),
    ("nl%0A", (400,)),
    ("%ef%bd%90t", (400,)),
    ("a" * 5000, (400,)),
    ("abs-link", (400,)),
    ("rel-link", (400,)),
    ("file-link", (400,)),
    ("pt%20", (400,)),
    ("~", (400,)),
    ("%252e%252e", (400,)),
]


@pytest.mark.parametrize("name, statuses", TRAVERSALS, ids=[t[0][:40] for t in TRAVERSALS])
def test_admin_names_cannot_leave_the_adapter_dir(env, name, statuses):
    before = model_ids(env)
    for method in (b"POST", b"DELETE"):
        request = (
            method
            + b" /admin/adapters/"
            + name.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        status, body = raw(env, request)
        assert status in statuses + ((404,) if method == b"DELETE" else ()), (method, status, body[:300])
        assert_one_json_error(body, status)
    after = model_ids(env)
    assert after == before and "secret" not in after


def test_startup_skips_adapter_dirs_with_bad_names_or_outside_targets(env):
    ids = model_ids(env)
    assert {"pt", "prefix"} <= set(ids)
    assert not {"abs-link", "rel-link", "file-link", "nl\n", "nl", "secret"} & set(ids)


def test_a_very_long_name_is_refused_by_the_http_layer_or_the_app(env):
    request = (
        b"POST /admin/adapters/"
        + b"a" * 70000
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    status, _ = raw(env, request)
    assert 400 <= status < 500
    assert env["client"].get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "model", ["../outside/secret", "/etc/passwd", "abs-link", "secret", "pt\x00", "pt\n", "a" * 256]
)
def test_request_model_names_are_looked_up_never_opened(env, model):
    response = env["client"].post(C, json={"model": model, "prompt": "x", "max_tokens": 1})
    assert response.status_code == 404
    assert assert_one_json_error(response.content, 404, "model")["code"] == "model_not_found"
    assert "secret" not in model_ids(env)
    too_long = env["client"].post(C, json={"model": "a" * 257, "prompt": "x"})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "model"


# ---------------------------------------------------------------------------- body caps
def post_head(path: str, length: str, extra: bytes = b"") -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"Connection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


def test_a_huge_content_length_is_refused_before_the_body_is_read(env):
    status, body = raw(env, post_head(C, str(10**12)) + b'{"model": "pt"')
    assert status == 413
    assert assert_one_json_error(body, 413)["code"] == "body_too_large"


def test_a_content_length_smaller_than_the_body_reads_only_that_much(env):
    payload = json.dumps({"model": "pt", "prompt": "x" * (4 * MAX_BODY)}).encode()
    status, body = raw(env, post_head(C, "20") + payload)
    assert status == 400  # the first 20 bytes are not a JSON object; the rest is never taken as this body
    assert_one_json_error(body, 400)
    assert env["client"].get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "10, 20"])
def test_malformed_content_lengths_are_4xx(env, length):
    status, _ = raw(env, post_head(C, length) + b'{"model": "pt", "prompt": "x"}')
    assert 400 <= status < 500
    assert env["client"].get("/health").json()["status"] == "ok"


def test_chunked_bodies_are_counted_and_cut_at_the_cap(env):
    chunk = b'{"model": "pt", "prompt": "' + b"x" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(12)) + b"0\r\n\r\n"
    head = (
        f"POST {C} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, body = raw(env, head + chunks)
    assert status == 413
    assert_one_json_error(body, 413)
    both = post_head(C, "30", b"Transfer-Encoding: chunked\r\n") + chunks  # request-smuggling shape
    status, _ = raw(env, both)
    assert 400 <= status < 500


def test_the_body_cap_holds_even_if_the_server_passes_more_than_content_length():
    """Below the HTTP server: an ASGI body longer than its Content-Length header is still counted and cut."""
    from softprompt.server.app import BodyLimitMiddleware

    reached = {}

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reached["bytes"] = len(body)

    async def run():
        messages = [{"type": "http.request", "body": b"x" * 600, "more_body": True} for _ in range(3)]
        messages.append({"type": "http.request", "body": b"", "more_body": False})
        queue = iter(messages)

        async def receive():
            return next(queue)

        async def send(message):
            pass

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"10")]}
        await BodyLimitMiddleware(app, max_bytes=1000)(scope, receive, send)

    with pytest.raises(Exception) as caught:
        asyncio.run(run())
    assert getattr(caught.value, "status", None) == 413  # the APIError the app's handler turns into a 413
    assert "bytes" not in reached


# ---------------------------------------------------------------------------- length and count caps
LIMITS = [
    ("max_tokens", C, {"model": "pt", "prompt": "x", "max_tokens": 33}, "max_tokens"),
    ("max_tokens streamed", C, {"model": "pt", "prompt": "x", "max_tokens": 10**9, "stream": True}, "max_tokens"),
    (
        "chat max_completion_tokens",
        CHAT,
        {"model": "pt", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 33},
        "max_completion_tokens",
    ),
    (
        "chat max_tokens",
        CHAT,
        {"model": "pt", "messages": [{"role": "user", "content": "x"}], "max_tokens": 33},
        "max_tokens",
    ),
    ("token-id lists", C, {"model": "pt", "prompt": [[5, 6]] * 4}, "prompt"),
    ("token ids too long", C, {"model": "pt", "prompt": [5] * 101}, "prompt"),
    ("labels", CLS, {"model": "pt", "input": "x", "labels": [f"l{i}" for i in range(6)]}, "labels"),
    ("long stop", C, {"model": "pt", "prompt": "x", "stop": "s" * 257}, "stop"),
    ("chat too long", CHAT, {"model": "pt", "messages": [{"role": "user", "content": "y" * 40}] * 5}, "messages"),
    ("huge integer", C, b'{"model": "pt", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None),
    ("NaN", C, b'{"model": "pt", "prompt": "x", "temperature": NaN}', "temperature"),
    ("Infinity", C, b'{"model": "pt", "prompt": "x", "top_p": Infinity}', "top_p"),
    ("lone surrogate", C, b'{"model": "pt", "prompt": "\\ud800x"}', "prompt"),
    (
        "lone surrogate chat",
        CHAT,
        b'{"model": "pt", "messages": [{"role": "user", "content": "\\udfff"}]}',
        "messages.0.content",
    ),
    ("lone surrogate label", CLS, b'{"model": "pt", "input": "x", "labels": ["a", "\\ud800"]}', "labels.1"),
    ("lone surrogate key", C, b'{"model": "pt", "prompt": "x", "\\ud800": 1}', None),
]


@pytest.mark.parametrize("name, path, body, param", LIMITS, ids=[item[0] for item in LIMITS])
def test_lengths_counts_and_odd_json_are_clear_400s(env, name, path, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = env["client"].post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_one_json_error(response.content, 400, param)


def test_the_caps_still_allow_requests_at_the_limit(env):
    client = env["client"]
    at_limit = client.post(
        C, json={"model": "pt", "prompt": [[5, 6]] * 3, "max_tokens": 32, "temperature": 0, "stop": ["s" * 256, "\n"]}
    )
    labels = client.post(CLS, json={"model": "pt", "input": ["a", "b", "c"], "labels": [f"l{i}" for i in range(5)]})
    unicode = client.post(C, json={"model": "pt", "prompt": "\U0001f600 \u00e9\u4e2d", "max_tokens": 2})
    assert at_limit.status_code == labels.status_code == unicode.status_code == 200
    assert len(at_limit.json()["choices"]) == 3 and len(labels.json()["data"]) == 3
    assert all(len(c["text"]) >= 0 for c in at_limit.json()["choices"])
    assert at_limit.json()["usage"]["completion_tokens"] <= 3 * 32
