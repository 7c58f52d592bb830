"""The OpenAPI document of the server (``GET /openapi.json``), describing what the handlers really accept.

The handlers read their JSON bodies themselves (so a bad body gets one clear 400 naming the field, in
OpenAI's error shape, instead of FastAPI's 422), so FastAPI cannot see the request models. This module
fills the document in: each body's JSON schema (from the pydantic models in `schemas.py`, tightened
with this server's limits: ``max_tokens`` up to ``--max-tokens-limit``, at most ``--max-inputs``
prompts and choices, ``--max-labels`` labels, OpenAI options not implemented only at their neutral values), every status a route
can answer with and its body (errors in OpenAI's shape), streaming as ``text/event-stream``, and the
bearer token of the admin routes. The fuzz tests (`tests/server/test_server_fuzz.py`) generate requests from
this document and check every response against it.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from softprompt.engine.adapter_name import ADAPTER_NAME
from softprompt.server.schemas import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOP_LOGPROBS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}
WHY = {
    400: "Invalid request: malformed JSON, wrong type, unknown field, value out of range, prompt too long.",
    401: "Missing or wrong admin bearer token.",
    404: "Unknown model or adapter.",
    413: "Request body larger than --max-body-bytes.",
    503: "Queue full, every adapter slot busy, or shutting down (see Retry-After).",
}
NULL = {"type": "null"}


def _error(status: int) -> dict:
    response: dict[str, Any] = {
        "description": WHY[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    if status == 503:
        response["headers"] = RETRY_AFTER
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"description": "Bearer challenge.", "schema": {"type": "string"}}}
    return response


def _json(schema: dict, description: str = "Successful Response") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(*options: dict) -> dict:
    return {"anyOf": [*options, NULL], "default": None}


def _add_model(
    components: dict, model: type[BaseModel], mode: Literal["validation", "serialization"] = "validation"
) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema
    return schema


def _sampling(props: dict, settings) -> None:
    """Tighten the options shared by completions and chat to what this server accepts."""
    props["max_tokens"] = _nullable({"type": "integer", "minimum": 1, "maximum": settings.max_tokens_limit})
    text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    props["stop"] = _nullable(text, {"type": "array", "items": text, "maxItems": MAX_STOP})
    props["n"] = _nullable(
        {
            "type": "integer",
            "minimum": 1,
            "maximum": min(MAX_N, settings.max_inputs),
            "description": "Choices per prompt; prompts x n is at most --max-inputs. With a seed, "
            "choice i samples from seed + i.",
        }
    )
    for name in ("presence_penalty", "frequency_penalty"):
        props[name] = _nullable({"const": 0, "description": "Not supported: only the neutral 0."})
    props["logit_bias"] = _nullable({"type": "object", "maxProperties": 0, "description": "Not supported: empty."})
    props["response_format"] = _nullable(
        {
            **_ref("ResponseFormat"),
            "description": (
                "text (default), json_object (any JSON object) or json_schema (JSON matching json_schema.schema): "
                "grammar-constrained decoding; a schema llguidance cannot compile is a 400."
            ),
        }
    )


def build_openapi(app, settings) -> dict:
    """The full OpenAPI document for ``app`` (created by `create_app` with ``settings``)."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)  # the handlers answer 400, never FastAPI's 422
    components.pop("ValidationError", None)
    components["ErrorResponse"] = ERROR

    completion = _add_model(components, CompletionRequest)
    props = completion["properties"]
    _sampling(props, settings)
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    most = settings.max_inputs  # larger than --max-batch-size: decoded in parts
    props["prompt"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": most, "items": {"type": "string", "minLength": 1}},
            ids,
            {"type": "array", "minItems": 1, "maxItems": most, "items": ids},
        ],
        "description": "A string, a list of strings, a list of token ids, or a list of token-id lists.",
    }
    props["max_tokens"] = _nullable(
        {
            "type": "integer",
            "minimum": 0,
            "maximum": settings.max_tokens_limit,
            "description": "0 only with echo=true: score the prompt, generate nothing.",
        }
    )
    props["echo"] = _nullable({"type": "boolean", "description": "Return the prompt before the completion."})
    props["best_of"] = _nullable({"const": 1})
    props["logprobs"] = _nullable(
        {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_LOGPROBS,
            "description": "Log-probability of each token and of this many alternatives "
            "(with echo: of the prompt's tokens too). Not with stream.",
        }
    )
    props["suffix"] = {"type": "null", "default": None, "description": "Not supported."}

    chat = _add_model(components, ChatCompletionRequest)
    props = chat["properties"]
    _sampling(props, settings)
    props["max_completion_tokens"] = props["max_tokens"]
    props["logprobs"] = _nullable({"type": "boolean", "description": "Log-probability of each token. Not with stream."})
    props["top_logprobs"] = _nullable(
        {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_TOP_LOGPROBS,
            "description": "Alternatives per token; needs logprobs=true.",
        }
    )
    props["tool_choice"] = _nullable({"const": "none"})

    classify = _add_model(components, ClassifyRequest)
    props = classify["properties"]
    text = {"type": "string", "minLength": 1}
    props["input"] = {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": settings.max_inputs, "items": text}]}
    props["labels"] = _nullable(
        {
            "type": "array",
            "minItems": 1,
            "maxItems": settings.max_labels,
            "uniqueItems": True,
            "items": text,
            "description": "Omitted: the label words the adapter was trained with.",
        }
    )

    for model in (CompletionResponse, ChatCompletionResponse, ClassifyResponse, ModelList, ModelCard):
        _add_model(components, model, mode="serialization")
    components["Health"] = {
        "type": "object",
        "required": ["status", "model", "adapters", "adapters_resident", "queue_depth", "running"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "model": {"type": "string"},
            **{
                k: {"type": "integer", "minimum": 0}
                for k in ("adapters", "adapters_resident", "queue_depth", "running")
            },
        },
    }

    usage = {"anyOf": [_ref("Usage"), NULL]}
    finish = {"enum": ["stop", "length", None]}

    def chunk(object_name: str, field: str, field_schema: dict) -> dict:
        """A streamed chunk: OpenAI's envelope around choices that carry ``field`` (text or a chat delta)."""
        choice = {
            "type": "object",
            "required": ["index", field, "finish_reason"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                field: field_schema,
                "logprobs": NULL,
                "finish_reason": finish,
            },
        }
        return {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": object_name},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "system_fingerprint": NULL,
                "usage": usage,
                "choices": {"type": "array", "items": choice},
            },
        }

    components["CompletionChunk"] = chunk("text_completion", "text", {"type": "string"})
    delta = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
    }
    components["ChatCompletionChunk"] = chunk("chat.completion.chunk", "delta", delta)

    def sse(chunk: str) -> dict:
        """One server-sent event: a JSON chunk (or an error in OpenAI's shape), and ``data: [DONE]`` last."""
        data = {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]},
                },
            ]
        }
        return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}

    errors = {str(status): _error(status) for status in WHY}

    def body(name: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}

    def generation(name: str, response: str, chunk: str) -> dict:
        ok = _json(_ref(response), "The result; with stream=true, server-sent events.")
        ok["content"].update(sse(chunk))
        return {
            "requestBody": body(name),
            "responses": {"200": ok, **{s: errors[s] for s in ("400", "404", "413", "503")}},
        }

    operations = {
        ("/health", "get"): {
            "responses": {
                "200": _json(_ref("Health")),
                "503": _json(_ref("Health"), "The model thread is not running."),
            }
        },
        ("/metrics", "get"): {
            "responses": {
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            }
        },
        ("/v1/models", "get"): {"responses": {"200": _json(_ref("ModelList"))}},
        ("/v1/models/{model_id}", "get"): {"responses": {"200": _json(_ref("ModelCard")), "404": errors["404"]}},
        ("/v1/completions", "post"): generation("CompletionRequest", "CompletionResponse", "CompletionChunk"),
        ("/v1/chat/completions", "post"): generation(
            "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk"
        ),
        ("/v1/classify", "post"): {
            "requestBody": body("ClassifyRequest"),
            "responses": {
                "200": _json(_ref("ClassifyResponse")),
                **{s: errors[s] for s in ("400", "404", "413", "503")},
            },
        },
    }
    if settings.enable_admin:
        schema["components"]["securitySchemes"] = {"adminToken": {"type": "http", "scheme": "bearer"}}
        card = {
            "type": "object",
            "required": ["object", "id", "method", "num_virtual_tokens", "resident"],
            "properties": {
                "object": {"const": "adapter"},
                "id": {"type": "string"},
                "method": {"type": ["string", "null"]},
                "num_virtual_tokens": {"type": ["integer", "null"]},
                "resident": {"type": "boolean"},
            },
        }
        deleted = {
            "type": "object",
            "required": ["object", "id", "deleted"],
            "properties": {"object": {"const": "adapter"}, "id": {"type": "string"}, "deleted": {"const": True}},
        }
        admin_errors = {s: errors[s] for s in ("400", "401", "404", "413", "503")}
        for method, ok in (("post", card), ("delete", deleted)):
            operations[("/admin/adapters/{name}", method)] = {
                "security": [{"adminToken": []}],
                "responses": {"200": _json(ok), **admin_errors},
            }

    name_pattern = ADAPTER_NAME.pattern
    for (path, method), extra in operations.items():
        operation = schema["paths"][path][method]
        operation.update(extra)
        for parameter in operation.get("parameters", []):
            if path.startswith("/admin/") and parameter["name"] == "name":
                parameter["schema"] = {"type": "string", "pattern": name_pattern, "minLength": 1, "maxLength": 64}
                parameter["description"] = "An adapter name in --adapter-dir (a name, never a path)."
    return schema
