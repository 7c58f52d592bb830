"""Serve many soft prompts from one frozen base model over an OpenAI-compatible HTTP API.

    from softprompt.server import serve
    serve("smollm2-135m", adapters={"quotes": "runs/quotes"}, port=8000)

    # or, with a model you already hold:
    from softprompt.server import ServerSettings, create_app
    app = create_app(model, ServerSettings(adapters={"quotes": "runs/quotes"}))

Needs the ``serve`` extras (fastapi, uvicorn, prometheus-client, llguidance), which ``bash scripts/setup.sh`` installs;
from a checkout, ``pip install -e '.[serve]'``.
This package imports them lazily, so ``softprompt --help`` works without them. See docs/serving.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softprompt.errors import SoftPromptError
from softprompt.models import loading
from softprompt.server.settings import ADMIN_TOKEN_ENV, ServerSettings

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

__all__ = ["ADMIN_TOKEN_ENV", "ServerSettings", "create_app", "serve"]


def _require_serving_extras() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SoftPromptError(
            f"serving needs {', '.join(missing)}: run bash scripts/setup.sh in a softprompt checkout "
            f"(or pip install -e '.[serve]' there)"
        )


def create_app(model, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app for a loaded `SoftPromptModel` (see `softprompt.server.app.create_app`)."""
    _require_serving_extras()
    # The app needs fastapi, a serving extra: imported once `_require_serving_extras` has checked it is there.
    from softprompt.server.app import create_app as _create_app

    return _create_app(model, settings)


def serve(
    model_name: str,
    adapters: dict[str, str] | None = None,
    adapter_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **options,
) -> None:
    """Load ``model_name`` and serve it with ``adapters`` ({name: path}) until interrupted.

    ``options`` are any other `ServerSettings` fields (max_batch_size, max_resident_adapters,
    enable_admin, admin_token, served_model_name, dtype, quantize, device, ...). Runs uvicorn in this process;
    blocks until Ctrl-C / SIGTERM, then finishes in-flight requests (up to 30 s).
    """
    settings = ServerSettings(
        model=model_name, adapters=dict(adapters or {}), adapter_dir=adapter_dir, host=host, port=port, **options
    ).validate()
    _require_serving_extras()
    import uvicorn  # a serving extra: imported once `_require_serving_extras` has checked it is there

    model = loading.load(
        model_name, dtype=settings.dtype, device=settings.device, quantize=settings.quantize, decode=settings.decode
    )
    app = create_app(model, settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=30,
    )
