"""Fuzz the HTTP API from its own OpenAPI document (schemathesis), in process against the ASGI app.

Every operation of ``GET /openapi.json`` -- the inference routes, health, metrics, models and the admin
routes (enabled, with a token) -- gets requests generated from the document: valid ones (positive
mode) and ones that break it (negative mode: wrong types, missing or unknown fields, out-of-range
values, bad path parameters), plus schemathesis' boundary-value "coverage" cases. Every response must:

* never be a 5xx (``not_a_server_error``), and be JSON errors in OpenAI's shape when it is a 4xx;
* have a status, content type, headers and body the document declares (``*_conformance``);
* reject requests that break the document with a 4xx (``negative_data_rejection``);
* not be a 2xx from an admin route without a valid token (``ignored_auth``);
* answer other methods with 405 and ``Allow`` (``unsupported_method``).

Requests are generated with schemathesis' hypothesis strategies (``operation.as_strategy``) inside plain
pytest tests, rather than its pytest plugin, whose fixture-based loading does not work with pytest 9.

Quick form (CI): ``FUZZ_EXAMPLES`` examples per operation (default 50), a few seconds per operation.
Full form: ``SOFTPROMPT_FUZZ_EXAMPLES=1000 .venv/bin/python -m pytest -q tests/server/test_server_fuzz.py``.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from starlette.testclient import TestClient

from softprompt.server import ServerSettings, create_app

from serving import lively_model, save_adapters

FUZZ_EXAMPLES = int(os.environ.get("SOFTPROMPT_FUZZ_EXAMPLES", "50"))
TOKEN = "fuzz-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]
OPERATIONS = {
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/classify"),
    ("POST", "/admin/adapters/{name}"),
    ("DELETE", "/admin/adapters/{name}"),
}
MODELS = ["pt", "prefix", "ptune", "tiny-gpt2"]
SEEN: dict[tuple[str, str], set[int]] = {}


def fuzz_settings(adapter_dir) -> ServerSettings:
    # Small limits keep every generated request cheap on the tiny model (and put the limits within reach).
    return ServerSettings(
        adapter_dir=str(adapter_dir),
        enable_admin=True,
        admin_token=TOKEN,
        max_batch_size=8,
        batch_window_ms=0,
        max_prompt_tokens=64,
        max_tokens_limit=8,
        default_max_tokens=4,
        # Generated bodies stay well below this, so a refusal is the document's 4xx, not the body cap's 413
        # (the cap itself is tested in test_server_security.py).
        max_body_bytes=256 * 1024,
        max_inputs=3,
        max_labels=4,
        max_queue=64,
    )


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    adapter_dir = tmp_path_factory.mktemp("fuzz") / "adapters"
    save_adapters(adapter_dir, names=("pt", "prefix", "ptune"))
    app = create_app(lively_model(), fuzz_settings(adapter_dir))
    yield app
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # stops the model thread that schemathesis' in-process client started


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def name_a_served_model(pair):
    case, model = pair
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    # Omitted labels mean "the adapter's recorded label words"; these adapters record none (a 400 tested in
    # test_server.py), so valid classify bodies name labels and reach the model.
    if isinstance(case.body, dict) and "input" in case.body and case.body.get("labels") is None:
        case.body["labels"] = ["yes", "no"]
    return case


@pytest.mark.parametrize("method, path", sorted(OPERATIONS), ids=[f"{m} {p}" for m, p in sorted(OPERATIONS)])
def test_every_operation_conforms_to_the_openapi_document(api_schema, method, path):
    operation = api_schema[path][method]
    # Valid bodies mostly name a served model (a random name is just a 404), so generation is reached too.
    positive = st.tuples(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE), st.sampled_from(MODELS + [None, None])
    ).map(name_a_served_model)
    cases = st.one_of(positive, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        database=None,
    )
    def fuzz(case):
        response = case.call_and_validate(headers=AUTH, checks=CHECKS)
        assert response.status_code < 500, response.text[:500]
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"], response.text
        SEEN.setdefault((method, path), set()).add(response.status_code)

    fuzz()


def test_the_fuzz_reached_every_operation_and_both_outcomes():
    """Runs after the fuzz (file order; run the whole file): every operation was exercised, and the generated
    requests got past validation to the model (200) as well as being refused (400)."""
    assert set(SEEN) == OPERATIONS, sorted(OPERATIONS - set(SEEN))
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
        statuses = SEEN[("POST", route)]
        assert 200 in statuses and 400 in statuses, (route, statuses)


def test_the_document_describes_bodies_limits_and_auth(fuzz_app):
    document = TestClient(fuzz_app).get("/openapi.json").json()
    paths = document["paths"]
    completion = document["components"]["schemas"]["CompletionRequest"]
    assert paths["/v1/completions"]["post"]["requestBody"]["required"] is True
    assert completion["additionalProperties"] is False and set(completion["required"]) == {"model", "prompt"}
    assert completion["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 8  # --max-tokens-limit
    labels = document["components"]["schemas"]["ClassifyRequest"]["properties"]["labels"]  # null: recorded words
    assert labels["anyOf"][0]["maxItems"] == 4 and labels["anyOf"][1] == {"type": "null"}
    for method in ("post", "delete"):
        operation = paths["/admin/adapters/{name}"][method]
        assert operation["security"] == [{"adminToken": []}] and "401" in operation["responses"]
    assert all("422" not in op["responses"] for ops in paths.values() for op in ops.values())


HEADER_TEXT = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)), max_size=80)


@given(
    token=st.one_of(HEADER_TEXT, st.sampled_from([TOKEN[:-1], TOKEN + "x", TOKEN.upper(), TOKEN[1:], " " * 3])),
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "Token ", "Bearer:", ""]),
    method=st.sampled_from(["POST", "DELETE"]),
)
@settings(max_examples=FUZZ_EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_rejects_every_token_but_the_right_one(fuzz_app, token, scheme, method):
    header = (scheme + token).strip() or "x"
    assume(header.partition(" ")[2].strip() != TOKEN)
    client = TestClient(fuzz_app)  # no lifespan: the admin check runs before anything touches the model
    response = client.request(method, "/admin/adapters/pt", headers={"Authorization": header.encode("latin-1")})
    assert response.status_code == 401, (header, response.text)
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "pt" in {m["id"] for m in client.get("/v1/models").json()["data"]}  # nothing was unloaded


@pytest.mark.parametrize("temperature", [2.225073858507e-311, 5e-324, 1e-300, 1e-7])
def test_a_tiny_temperature_decodes_greedily_instead_of_failing(fuzz_app, temperature):
    """Found by this fuzz: a denormal temperature made the logits inf and the sampling probabilities NaN (500)."""
    with TestClient(fuzz_app) as client:
        body = {"model": "prefix", "prompt": "ClassifyRequest", "max_tokens": 6}
        greedy = client.post("/v1/completions", json={**body, "temperature": 0})
        tiny = client.post("/v1/completions", json={**body, "temperature": temperature, "seed": 3})
        streamed = client.post("/v1/completions", json={**body, "temperature": temperature, "stream": True})
    assert greedy.status_code == tiny.status_code == streamed.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert streamed.text.rstrip().endswith("data: [DONE]") and '"error"' not in streamed.text
