"""Reading request bodies safely: a size limit enforced while the body streams in, and JSON parsing whose every
failure (bad UTF-8, bad JSON, nesting, huge numbers, lone surrogates) is one clear 400."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from softprompt.server.schemas import APIError, invalid


class _BodyTooLarge(APIError):
    pass


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> _BodyTooLarge:
        return _BodyTooLarge(
            413, f"request body is larger than {self.max_bytes} bytes (--max-body-bytes)", code="body_too_large"
        )

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


def unpaired_surrogate(value) -> str | None:
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


async def read_json(request: Request) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    body = await request.body()
    if not body:
        raise invalid("request body is empty; expected a JSON object")
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise invalid("request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise invalid("request body is nested too deeply") from None
    except ValueError:  # an integer literal longer than Python reads (4300 digits)
        raise invalid("request body has a number too long to read (more than 4300 digits)") from None
    if not isinstance(value, dict):
        raise invalid(f"request body must be a JSON object, got {type(value).__name__}")
    bad = unpaired_surrogate(value)
    if bad is not None:
        raise invalid(
            f"{bad or 'body'}: text contains an unpaired UTF-16 surrogate (a lone \\ud800-\\udfff "
            "escape); send valid Unicode",
            param=bad or None,
        )
    return value
