"""The app's error handlers: every failure becomes a JSON error in OpenAI's shape (client mistakes 4xx)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.server.schemas import APIError, invalid

log = logging.getLogger("softprompt.server")


def add_error_handlers(app: FastAPI) -> None:
    """Answer `APIError`, HTTP errors (404, 405, ...), request validation errors and any other exception
    with OpenAI's error body; unexpected exceptions are logged and answered with a 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {
            404: f"not found: {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
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
