"""Request and response bodies of the HTTP API (OpenAI's shapes), and the error every failure returns.

Requests are validated strictly (no silent type coercion, unknown fields refused) so a client mistake
gets a 400 that names the field, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

OpenAI options that would change the output but are not implemented (penalties, logit_bias, best_of > 1,
suffix, tools) are accepted only with their neutral value, so a client that sends the defaults explicitly
works and one that relies on them gets a clear 400. ``echo``, ``logprobs`` (``top_logprobs`` on chat),
``n`` and ``response_format`` (text, json_object, json_schema) are implemented.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256  # longest stop sequence: streaming compares the text's tail with each one at every token
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 5  # most alternatives per token on /v1/completions (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # most alternatives per token on /v1/chat/completions (OpenAI's limit)
MAX_N = 128  # most choices per prompt (OpenAI's limit); rows also count against --max-inputs


# ---------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error returned to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_overloaded",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith(("function-", "list[")))]
    param = ".".join(loc) or None
    kind = err.get("type")
    if kind == "extra_forbidden":
        message = f"{param}: unknown or unsupported field"
    elif kind == "missing":
        message = f"{param}: required field is missing"
    else:
        got = err.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = f"{param}: {err['msg']} (got {shown})" if param else err["msg"]
    return invalid(message, param=param)


def _custom(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


# ---------------------------------------------------------------------------- requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``: OpenAI's shape. ``schema`` omitted: any JSON object. The output is
    constrained to the schema whether or not ``strict`` is set."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """``response_format``: ``text`` (the default), ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _custom("json_schema is required with type 'json_schema' and only allowed with it")
        return self


class _SamplingRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (as vLLM); 0 = off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=MAX_SEED)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise _custom("expected a string or a list of strings")
        if len(items) > MAX_STOP:
            raise _custom(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in items):
            raise _custom("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise _custom(f"stop sequences are at most {MAX_STOP_CHARS} characters long")
        return items

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def neutral_checks(self) -> list[tuple[str, bool]]:
        return [
            ("presence_penalty", not self.presence_penalty),
            ("frequency_penalty", not self.frequency_penalty),
            ("logit_bias", not self.logit_bias),
        ]

    def check_supported(self) -> None:
        for name, ok in self.neutral_checks():
            if not ok:
                value = getattr(self, name)
                raise invalid(f"{name}: not supported by this server (got {value!r}); leave it unset", param=name)
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options: only allowed with stream=true", param="stream_options")

    def choices(self) -> int:
        """Choices per prompt (``n``)."""
        return self.n or 1


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. ``prompt``: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: Any
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (score the prompt, generate nothing)
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        def ids(v) -> bool:
            return isinstance(v, list) and len(v) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str):
            return value
        if (
            isinstance(value, list)
            and value
            and (all(isinstance(v, str) for v in value) or ids(value) or all(ids(v) for v in value))
        ):
            return value
        raise _custom(
            "expected a string, a non-empty list of strings, a list of token ids, or a list of token-id lists"
        )

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(v, int) for v in p):
            return [list(p)]
        return list(p)

    def neutral_checks(self) -> list[tuple[str, bool]]:
        return super().neutral_checks() + [("best_of", self.best_of in (None, 1)), ("suffix", self.suffix is None)]

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise invalid(
                "max_tokens: 0 is only allowed with echo=true (to score the prompt); give at least 1",
                param="max_tokens",
            )
        if self.stream and self.logprobs is not None:
            raise invalid("logprobs: not supported with stream=true; send stream=false", param="logprobs")


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None

    def neutral_checks(self) -> list[tuple[str, bool]]:
        return super().neutral_checks() + [("tool_choice", self.tool_choice in (None, "none"))]

    def check_supported(self) -> None:
        super().check_supported()
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise invalid("max_tokens and max_completion_tokens disagree; give one of them", param="max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs: only allowed with logprobs=true", param="top_logprobs")
        if self.stream and self.logprobs:
            raise invalid("logprobs: not supported with stream=true; send stream=false", param="logprobs")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ClassifyRequest(_Request):
    """POST /v1/classify: rank candidate ``labels`` after each text of ``input`` by log-likelihood."""

    model: str = Field(min_length=1, max_length=256)
    input: Any
    # None: the label words the adapter was trained with (its raw label values are reported)
    labels: list[str] | None = Field(default=None, min_length=1)
    normalize: Literal["sum", "mean"] = "sum"
    raw: bool = False  # True: score the texts as sent, not rendered through the adapter's training template
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise _custom("expected a string or a non-empty list of strings")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if any(label == "" for label in value):
            raise _custom("labels must not be empty strings")
        if len(set(value)) != len(value):
            raise _custom("candidate labels must be distinct")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability (None for a prompt's first token, which
    nothing precedes), the most likely tokens there (text -> log-probability), and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ClassifyResult(BaseModel):
    index: int
    label: str
    scores: dict[str, float]  # label -> log-likelihood (sum or mean over its tokens)
    probabilities: dict[str, float]  # scores renormalised over the candidates


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    created: int
    model: str
    data: list[ClassifyResult]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softprompt"
    root: str  # the base model
    parent: str | None  # the base model for adapters, None for the base model itself
    method: str | None = None  # a softprompt.methods.METHODS name (adapters only)
    num_virtual_tokens: int | None = None
    template: str | None = None  # the template the adapter was trained with (applied by /v1/classify)
    resident: bool = True  # in memory now (False: evicted, reloaded on its next request)
    num_tasks: int | None = None  # a multitask adapter's tasks: requests name one as model NAME:TASK


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
