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
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from softprompt.engine.scoring import LabelScores
from softprompt.errors import ConfigError
from softprompt.server.admin import add_admin_routes
from softprompt.server.batcher import Batcher
from softprompt.server.body import BodyLimitMiddleware, read_json
from softprompt.server.error_handlers import add_error_handlers
from softprompt.server.formats import ResponseFormats
from softprompt.server.jobs import Job, Sampling
from softprompt.server.logprobs import LogprobFormatter
from softprompt.server.metrics import Metrics, MetricsMiddleware
from softprompt.server.openapi import build_openapi
from softprompt.server.prompting import chat_prompt_ids, encode
from softprompt.server.registry import AdapterEntry, AdapterRegistry
from softprompt.server.responses import stream_response, usage
from softprompt.server.schemas import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    invalid,
    new_id,
    now,
    validation_error,
)
from softprompt.server.settings import ServerSettings


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
    formatter = LogprobFormatter(tokenizer)
    vocab = model.base.get_input_embeddings().num_embeddings
    formats = ResponseFormats(tokenizer, vocab, batcher.eos)
    ctx = context_window(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start_thread()
        registry.attach(batcher)
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop_thread)

    app = FastAPI(title="softprompt", summary="Soft prompts on one frozen model, OpenAI-compatible.", lifespan=lifespan)
    app.state.settings, app.state.model, app.state.registry = settings, model, registry
    app.state.batcher, app.state.metrics, app.state.base_name = batcher, metrics, base_name
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to supply the schema
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    add_error_handlers(app)

    # ------------------------------------------------------------------ helpers
    def parse(cls: type[BaseModel], value: dict):
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def sampling_for(req, max_tokens: int | None, param: str = "max_tokens") -> Sampling:
        if max_tokens is None:
            max_tokens = settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise invalid(
                f"{param}: at most {settings.max_tokens_limit} on this server (got {max_tokens})", param=param
            )
        return Sampling(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=req.stop_list(),
        )

    def check_prompt(ids: list[int], entry: AdapterEntry | None, new_tokens: int, param: str = "prompt") -> None:
        if not ids:
            raise invalid(f"{param}: tokenises to no tokens; give at least one character", param=param)
        if len(ids) > settings.max_prompt_tokens:
            raise invalid(
                f"{param}: {len(ids)} tokens; this server accepts at most {settings.max_prompt_tokens} "
                "(--max-prompt-tokens)",
                param=param,
                code="prompt_too_long",
            )
        virtual = (entry.num_virtual_tokens or 0) if entry is not None else 0
        if ctx is not None and virtual + len(ids) + new_tokens > ctx:
            raise invalid(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{virtual + len(ids) + new_tokens} tokens ({len(ids)} in the prompt, {virtual} virtual "
                f"tokens of the adapter, {new_tokens} for the completion). Shorten the prompt or "
                "max_tokens.",
                param=param,
                code="context_length_exceeded",
            )

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

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        ok = batcher.alive
        body = {
            "status": "ok" if ok else "unavailable",
            "model": base_name,
            "adapters": len(registry.entries),
            "adapters_resident": registry.resident_count(),
            "queue_depth": batcher.queue_depth,
            "running": batcher.running_rows,
        }
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
        prompts, n = req.prompts(), req.choices()
        if len(prompts) * n > settings.max_inputs:
            counted = f"{len(prompts)} x n={n}" if n > 1 else str(len(prompts))
            raise invalid(
                f"prompt: at most {settings.max_inputs} prompts per request, each of the n choices "
                f"counting as one (got {counted}); the server's --max-inputs sets this limit",
                param="prompt",
            )
        sampling = sampling_for(req, req.max_tokens)
        sampling.grammar = await formats.grammar(req.response_format)
        score_prompt = bool(req.echo) and req.logprobs is not None
        if score_prompt and model.shape.is_encoder_decoder:
            raise invalid(
                "echo: prompt log-probabilities need a decoder-only model; this one is encoder-decoder", param="echo"
            )
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await asyncio.to_thread(encode, tokenizer, texts))
        ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        for row in ids:
            if any(t < 0 or t >= vocab for t in row):
                raise invalid(f"prompt: token ids must be in [0, {vocab})", param="prompt")
            check_prompt(row, entry, sampling.max_new_tokens)
        echoed = [p if isinstance(p, str) else formatter.text(p) for p in prompts] if req.echo else None
        job = None
        if sampling.max_new_tokens or score_prompt:  # else: echo only, nothing for the model to do
            job = Job(
                asyncio.get_running_loop(),
                adapter=req.model if entry else None,  # NAME or NAME:TASK
                prompts=ids,
                sampling=sampling,
                stream=req.stream,
                n=n,
                logprobs=req.logprobs,
                score_prompt=score_prompt,
            )
        prompt_tokens = sum(len(r) for r in ids)
        if job is not None:
            await start_job(job, entry, prompt_tokens)
        rid, created = new_id("cmpl"), now()
        base = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
        }
        if req.stream:

            def chunk(index, text, finish=None):
                return {
                    **base,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
                    "usage": None,
                }

            finish = "length" if job is None else None  # max_tokens 0: the echo is the whole answer
            first = [chunk(i, echoed[i // n], finish) for i in range(len(prompts) * n)] if echoed else []
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(
                job, chunk, lambda i, reason: chunk(i, "", reason), first, prompt_tokens, include, base
            )
        results = await wait(job) if job is not None else []  # a scoring job (max_tokens 0) returns none

        def choice(i: int) -> CompletionChoice:
            prompt = i // n
            result = results[i] if results else None
            text = (echoed[prompt] if echoed else "") + (result.text if result else "")
            logprobs = None
            if req.logprobs is not None:
                assert job is not None  # max_tokens 0 needs echo, and echo with logprobs scores the prompt
                scores = job.prompt_scores if score_prompt else None  # set by the model thread when asked
                logprobs = formatter.completion(
                    prompt_text="" if echoed else formatter.text(ids[prompt]),
                    prompt=(ids[prompt], scores[prompt]) if scores is not None else None,
                    generated=job.token_logprobs.get(i, []),
                )
            return CompletionChoice(
                index=i, text=text, logprobs=logprobs, finish_reason=result.finish_reason if result else "length"
            )

        choices = await asyncio.to_thread(lambda: [choice(i) for i in range(len(prompts) * n)])
        body = CompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=usage(prompt_tokens, sum(len(r.token_ids) for r in results)),
        )
        return body.model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        req.check_supported()
        entry = registry.resolve(req.model)
        sampling = sampling_for(
            req, req.token_limit(), "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        )
        sampling.grammar = await formats.grammar(req.response_format)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, messages)
        except Exception as exc:
            raise invalid(
                f"messages: the model's chat template rejected them ({type(exc).__name__}: {exc})", param="messages"
            ) from None
        check_prompt(ids, entry, sampling.max_new_tokens, param="messages")
        n = req.choices()
        if n > settings.max_inputs:
            raise invalid(
                f"n: at most {settings.max_inputs} choices per request (got {n}); the server's "
                "--max-inputs sets this limit",
                param="n",
            )
        job = Job(
            asyncio.get_running_loop(),
            adapter=req.model if entry else None,  # NAME or NAME:TASK
            prompts=[ids],
            sampling=sampling,
            stream=req.stream,
            n=n,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        await start_job(job, entry, len(ids))
        rid, created = new_id("chatcmpl"), now()
        base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
        }
        if req.stream:

            def chunk(index, delta, finish=None):
                return {
                    **base,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "usage": None,
                }

            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(
                job,
                lambda i, text: chunk(i, {"content": text}),
                lambda i, reason: chunk(i, {}, reason),
                [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)],
                len(ids),
                include,
                base,
            )
        results = await wait(job)

        def choice(i: int, result) -> ChatChoice:
            logprobs = None
            if req.logprobs:
                # The content's tokens only: an end-of-sequence token drawn last is not part of the message.
                logprobs = formatter.chat(job.token_logprobs.get(i, [])[: len(result.token_ids)])
            return ChatChoice(
                index=i,
                message=AssistantMessage(content=result.text),
                logprobs=logprobs,
                finish_reason=result.finish_reason,
            )

        choices = await asyncio.to_thread(lambda: [choice(i, r) for i, r in enumerate(results)])
        body = ChatCompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=usage(len(ids), sum(len(r.token_ids) for r in results)),
        )
        return body.model_dump()

    @app.post("/v1/classify")
    async def classify(request: Request):
        req: ClassifyRequest = parse(ClassifyRequest, await read_json(request))
        entry = registry.resolve(req.model)
        texts = req.texts()
        if len(texts) > settings.max_inputs:
            raise invalid(f"input: at most {settings.max_inputs} texts per request (got {len(texts)})", param="input")
        # Unless raw: texts go through the adapter's training template and labels become its label words.
        recorded = entry.training_format if entry is not None and not req.raw else None
        if recorded is not None:
            try:
                names, words = recorded.label_words(req.labels)
            except ConfigError as exc:
                raise invalid(str(exc), param="labels") from None
            try:
                texts = [recorded.format(t) for t in texts]
            except ConfigError as exc:
                raise invalid(f"input: {exc}", param="input") from None
        elif req.labels is None:
            raise invalid(
                "labels: required, unless the model is an adapter that records its label words (and raw is false)",
                param="labels",
            )
        else:
            names = words = req.labels
        if len(names) > settings.max_labels:
            raise invalid(f"labels: at most {settings.max_labels} candidate labels (got {len(names)})", param="labels")

        def tokenize():
            return encode(tokenizer, texts), encode(tokenizer, words, add_special_tokens=False)

        ids, label_ids = await asyncio.to_thread(tokenize)
        for label, lab in zip(words, label_ids):
            if not lab:
                raise invalid(f"labels: {label!r} tokenises to no tokens", param="labels")
        longest = max(len(lab) for lab in label_ids)
        for row in ids:
            check_prompt(row, entry, longest, param="input")
        job = Job(
            asyncio.get_running_loop(),
            adapter=req.model if entry else None,  # NAME or NAME:TASK
            prompts=ids,
            labels=label_ids,
            label_names=list(names),
            normalize=req.normalize,
        )
        prompt_tokens = sum(len(r) for r in ids)
        await start_job(job, entry, prompt_tokens)
        totals = await wait(job)
        data = []
        for i, row in enumerate(totals):
            scores = dict(zip(names, row))
            best = max(range(len(row)), key=row.__getitem__)
            ranked = LabelScores(names[best], scores)
            data.append(
                ClassifyResult(index=i, label=ranked.label, scores=scores, probabilities=ranked.probabilities())
            )
        body = ClassifyResponse(id=new_id("clf"), created=now(), model=req.model, data=data, usage=usage(prompt_tokens))
        return body.model_dump()

    if settings.enable_admin:
        add_admin_routes(app, settings, registry)

    return app
