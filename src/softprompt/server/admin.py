"""The admin routes (only with ``enable_admin``): load and unload adapters at run time, behind a bearer token."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request

from softprompt.server.registry import AdapterEntry, AdapterRegistry
from softprompt.server.schemas import APIError
from softprompt.server.settings import ServerSettings

log = logging.getLogger("softprompt.server")


def add_admin_routes(app: FastAPI, settings: ServerSettings, registry: AdapterRegistry) -> None:
    """``POST`` / ``DELETE /admin/adapters/{name}``, each checking ``settings``' admin token."""
    token = settings.resolved_admin_token()
    assert token is not None  # ServerSettings.validate refuses enable_admin without one
    expected = token.encode()

    def require_admin(request: Request) -> None:
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise APIError(401, "admin endpoints need 'Authorization: Bearer <token>'", headers=challenge)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "invalid admin token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def adapter_card(entry: AdapterEntry) -> dict:
        return {
            "object": "adapter",
            "id": entry.name,
            "method": entry.method,
            "num_virtual_tokens": entry.num_virtual_tokens,
            "resident": entry.resident,
        }

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
