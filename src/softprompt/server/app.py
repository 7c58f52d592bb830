"""The FastAPI app: OpenAI-compatible routes over one frozen model and many adapters.

`create_app(model, settings)` wires the pieces: the adapter registry (`registry.py`), the model
thread and its batcher (`batcher.py`), metrics (`metrics.py`) and the request/response shapes
(`schemas.py`). Handlers only parse, validate, tokenise (on a worker thread), pin the adapter and wait
for the batcher; they never call the model. Every failure is a JSON error in OpenAI's shape; client
mistakes are 4xx, never 5xx.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/classify``, ``GET /health``, ``GET /metrics``, and (only with ``enable_admin``)
``POST`` / ``DELETE /admin/adapters/{name}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.engine.scoring import LabelScores
from softprompt.errors import ConfigError
from softprompt.server.batcher import Batcher
from softprompt.server.jobs import Job, Sampling
from softprompt.server.metrics import Metrics, MetricsMiddleware
from softprompt.server.openapi import build_openapi
from softprompt.server.prompting import chat_prompt_ids, encode
from softprompt.server.registry import AdapterEntry, AdapterRegistry
from softprompt.server.schemas import (APIError, AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                      ClassifyRequest, ClassifyResponse, ClassifyResult, CompletionChoice, CompletionRequest,
                      CompletionResponse, ModelList, Usage, invalid, new_id, now, validation_error)
from softprompt.server.settings import ServerSettings

log = logging.getLogger("softprompt.server")


class _BodyTooLarge(APIError):
    pass


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> _BodyTooLarge:
        return _BodyTooLarge(413, f"request body is larger than {self.max_bytes} bytes (--max-body-bytes)",
                             code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                too_large = False  # the HTTP server rejects malformed lengths itself
            if too_large:
                error = self._error()
                await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)
                return
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)


def _unpaired_surrogate(value) -> str | None:
    """Where the first lone surrogate (which no tokenizer accepts) is: the dotted path of the string, or of the
    object whose key holds it ("" for the top level); None when there is none."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                where = f"{path}.{key}" if path else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return path
                stack.append((where, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}", child) for i, child in reversed(list(enumerate(item))))
    return None


def context_window(model) -> int | None:
    """Most positions a causal model can attend over (None: no fixed limit, e.g. ALiBi or T5)."""
    if model.shape.is_encoder_decoder:
        return None
    config = model.base.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def create_app(model, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving ``model`` (a `SoftPromptModel`) and the adapters named in ``settings``.

    Adapters already in ``model`` are served too (always resident). Adapter files are read and checked
    here, so a bad adapter fails now, not on the first request. The model thread starts with the app's
    lifespan (uvicorn, or ``with TestClient(app)``).
    """
    settings = (settings or ServerSettings()).validate()
    if model.tokenizer is None:
        raise ConfigError("serving needs a model with a tokenizer")
    base_name = settings.served_model_name or settings.model or model.name_or_path or "base"
    model.eval()
    metrics = Metrics()
    registry = AdapterRegistry(model, settings, base_name, metrics)
    registry.bootstrap()
    batcher = Batcher(model, settings, metrics)
    tokenizer = model.tokenizer
    vocab = model.base.get_input_embeddings().num_embeddings
    ctx = context_window(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start_thread()
        registry.attach(batcher)
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop_thread)

    app = FastAPI(title="softprompt", summary="Soft prompts on one frozen model, OpenAI-compatible.",
                  lifespan=lifespan)
    app.state.settings, app.state.model, app.state.registry = settings, model, registry
    app.state.batcher, app.state.metrics, app.state.base_name = batcher, metrics, base_name
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"not found: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        error = APIError(exc.status_code, message)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query"))
        error = invalid(f"{loc}: {first.get('msg', 'invalid value')}", param=loc or None)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = APIError(500, "internal server error; see the server log")
        return JSONResponse(error.body(), status_code=500)

    # ------------------------------------------------------------------ helpers
    async def read_json(request: Request) -> dict:
        body = await request.body()
        if not body:
            raise invalid("request body is empty; expected a JSON object")
        try:
            value = json.loads(body)
        except UnicodeDecodeError:
            raise invalid("request body is not UTF-8 JSON") from None
        except json.JSONDecodeError as exc:
            raise invalid(f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
                from None
        except RecursionError:
            raise invalid("request body is nested too deeply") from None
        except ValueError:  # an integer literal longer than Python reads (4300 digits)
            raise invalid("request body has a number too long to read (more than 4300 digits)") from None
        if not isinstance(value, dict):
            raise invalid(f"request body must be a JSON object, got {type(value).__name__}")
        bad = _unpaired_surrogate(value)
        if bad is not None:
            raise invalid(f"{bad or 'body'}: text contains an unpaired UTF-16 surrogate (a lone \\ud800-\\udfff "
                          "escape); send valid Unicode", param=bad or None)
        return value

    def parse(cls: type[BaseModel], value: dict):
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def sampling_for(req, max_tokens: int | None, param: str = "max_tokens") -> Sampling:
        if max_tokens is None:
            max_tokens = settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise invalid(f"{param}: at most {settings.max_tokens_limit} on this server (got {max_tokens})",
                          param=param)
        return Sampling(max_new_tokens=max_tokens,
                        temperature=1.0 if req.temperature is None else float(req.temperature),
                        top_p=1.0 if req.top_p is None else float(req.top_p),
                        top_k=req.top_k or 0, seed=req.seed, stop=req.stop_list())

    def check_prompt(ids: list[int], entry: AdapterEntry | None, new_tokens: int, param: str = "prompt") -> None:
        if not ids:
            raise invalid(f"{param}: tokenises to no tokens; give at least one character", param=param)
        if len(ids) > settings.max_prompt_tokens:
            raise invalid(f"{param}: {len(ids)} tokens; this server accepts at most {settings.max_prompt_tokens} "
                          "(--max-prompt-tokens)", param=param, code="prompt_too_long")
        virtual = (entry.num_virtual_tokens or 0) if entry is not None else 0
        if ctx is not None and virtual + len(ids) + new_tokens > ctx:
            raise invalid(f"This model's maximum context length is {ctx} tokens. However, you requested "
                          f"{virtual + len(ids) + new_tokens} tokens ({len(ids)} in the prompt, {virtual} virtual "
                          f"tokens of the adapter, {new_tokens} for the completion). Shorten the prompt or "
                          "max_tokens.", param=param, code="context_length_exceeded")

    async def start_job(job: Job, entry: AdapterEntry | None, prompt_tokens: int) -> None:
        """Pin the adapter (loading it if needed) and queue the job; the pin is released when it ends."""
        await registry.acquire(entry)
        try:
            batcher.submit(job)
        except BaseException:
            registry.release(entry)
            raise
        job.future.add_done_callback(lambda _f: registry.release(entry))
        metrics.tokens.labels(kind="prompt").inc(prompt_tokens)

    async def wait(job: Job):
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    def usage(prompt_tokens: int, completion_tokens: int = 0) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def sse(value: Any) -> str:
        return f"data: {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def stream_response(job: Job, chunk, final_chunk, first_chunks: list[dict], prompt_tokens: int,
                        include_usage: bool, base: dict) -> StreamingResponse:
        async def events():
            finished, completion_tokens = 0, 0
            try:
                for first in first_chunks:
                    yield sse(first)
                while finished < job.rows:
                    event = await job.events.get()
                    if event[0] == "delta":
                        yield sse(chunk(event[1], event[2]))
                    elif event[0] == "finish":
                        finished += 1
                        completion_tokens += len(event[2].token_ids)
                        yield sse(final_chunk(event[1], event[2].finish_reason))
                    elif event[0] == "error":
                        error = event[1] if isinstance(event[1], APIError) else APIError(500, "internal error")
                        yield sse(error.body())
                        break
                if include_usage and finished == job.rows:
                    yield sse({**base, "choices": [],
                               "usage": usage(prompt_tokens, completion_tokens).model_dump()})
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        ok = batcher.alive
        body = {"status": "ok" if ok else "unavailable", "model": base_name, "adapters": len(registry.entries),
                "adapters_resident": registry.resident_count(), "queue_depth": batcher.queue_depth,
                "running": batcher.running_rows}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route():
        metrics.queue_depth.set(batcher.queue_depth)
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=registry.cards()).model_dump()

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        for card in registry.cards():
            if card.id == model_id:
                return card.model_dump()
        registry.resolve(model_id)  # raises the 404
        raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        req.check_supported()
        entry = registry.resolve(req.model)
        prompts = req.prompts()
        limit = min(settings.max_inputs, settings.max_batch_size)
        if len(prompts) > limit:
            raise invalid(f"prompt: at most {limit} prompts per request (got {len(prompts)})", param="prompt")
        sampling = sampling_for(req, req.max_tokens)
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await asyncio.to_thread(encode, tokenizer, texts))
        ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        for row in ids:
            if any(t < 0 or t >= vocab for t in row):
                raise invalid(f"prompt: token ids must be in [0, {vocab})", param="prompt")
            check_prompt(row, entry, sampling.max_new_tokens)
        job = Job(asyncio.get_running_loop(), adapter=entry.name if entry else None, prompts=ids,
                  sampling=sampling, stream=req.stream)
        prompt_tokens = sum(len(r) for r in ids)
        await start_job(job, entry, prompt_tokens)
        rid, created = new_id("cmpl"), now()
        base = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": None}
        if req.stream:
            def chunk(index, text, finish=None):
                return {**base, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
                        "usage": None}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(job, chunk, lambda i, reason: chunk(i, "", reason), [], prompt_tokens,
                                   include, base)
        results = await wait(job)
        choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)]
        body = CompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                  usage=usage(prompt_tokens, sum(len(r.token_ids) for r in results)))
        return body.model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        req.check_supported()
        entry = registry.resolve(req.model)
        sampling = sampling_for(req, req.token_limit(),
                                "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a chat template refusing the conversation is a client error
            raise invalid(f"messages: the model's chat template rejected them ({type(exc).__name__}: {exc})",
                          param="messages") from None
        check_prompt(ids, entry, sampling.max_new_tokens, param="messages")
        job = Job(asyncio.get_running_loop(), adapter=entry.name if entry else None, prompts=[ids],
                  sampling=sampling, stream=req.stream)
        await start_job(job, entry, len(ids))
        rid, created = new_id("chatcmpl"), now()
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None}
        if req.stream:
            def chunk(index, delta, finish=None):
                return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}], "usage": None}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(job, lambda i, text: chunk(i, {"content": text}),
                                   lambda i, reason: chunk(i, {}, reason),
                                   [chunk(0, {"role": "assistant", "content": ""})], len(ids), include, base)
        result = (await wait(job))[0]
        body = ChatCompletionResponse(
            id=rid, created=created, model=req.model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=result.text),
                                finish_reason=result.finish_reason)],
            usage=usage(len(ids), len(result.token_ids)))
        return body.model_dump()

    @app.post("/v1/classify")
    async def classify(request: Request):
        req: ClassifyRequest = parse(ClassifyRequest, await read_json(request))
        entry = registry.resolve(req.model)
        texts = req.texts()
        if len(texts) > settings.max_inputs:
            raise invalid(f"input: at most {settings.max_inputs} texts per request (got {len(texts)})", param="input")
        if len(req.labels) > settings.max_labels:
            raise invalid(f"labels: at most {settings.max_labels} candidate labels (got {len(req.labels)})",
                          param="labels")

        def tokenize():
            return encode(tokenizer, texts), encode(tokenizer, req.labels, add_special_tokens=False)

        ids, label_ids = await asyncio.to_thread(tokenize)
        for label, lab in zip(req.labels, label_ids):
            if not lab:
                raise invalid(f"labels: {label!r} tokenises to no tokens", param="labels")
        longest = max(len(lab) for lab in label_ids)
        for row in ids:
            check_prompt(row, entry, longest, param="input")
        job = Job(asyncio.get_running_loop(), adapter=entry.name if entry else None, prompts=ids,
                  labels=label_ids, label_names=list(req.labels), normalize=req.normalize)
        prompt_tokens = sum(len(r) for r in ids)
        await start_job(job, entry, prompt_tokens)
        totals = await wait(job)
        data = []
        for i, row in enumerate(totals):
            scores = dict(zip(req.labels, row))
            best = max(range(len(row)), key=row.__getitem__)
            ranked = LabelScores(req.labels[best], scores)
            data.append(ClassifyResult(index=i, label=ranked.label, scores=scores,
                                       probabilities=ranked.probabilities()))
        body = ClassifyResponse(id=new_id("clf"), created=now(), model=req.model, data=data,
                                usage=usage(prompt_tokens))
        return body.model_dump()

    # ------------------------------------------------------------------ admin
    if settings.enable_admin:
        expected = settings.resolved_admin_token().encode()

        def require_admin(request: Request) -> None:
            header = request.headers.get("authorization")
            challenge = {"WWW-Authenticate": "Bearer"}
            if not header:
                raise APIError(401, "admin endpoints need 'Authorization: Bearer <token>'", headers=challenge)
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                raise APIError(401, "invalid admin token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

        def adapter_card(entry: AdapterEntry) -> dict:
            return {"object": "adapter", "id": entry.name, "method": entry.method,
                    "num_virtual_tokens": entry.num_virtual_tokens, "resident": entry.resident}

        @app.post("/admin/adapters/{name}")
        async def admin_load(name: str, request: Request):
            require_admin(request)
            entry = await registry.admin_load(name)
            log.info("admin: adapter %s loaded", name)
            return adapter_card(entry)

        @app.delete("/admin/adapters/{name}")
        async def admin_unload(name: str, request: Request):
            require_admin(request)
            await registry.admin_unload(name)
            log.info("admin: adapter %s unloaded", name)
            return {"object": "adapter", "id": name, "deleted": True}

    return app
