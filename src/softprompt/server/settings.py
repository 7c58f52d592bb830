"""`ServerSettings`: every option of ``softprompt serve``, with its help text.

This module imports nothing heavy (no torch, no FastAPI), so the CLI can build its parser from these
fields without the serving extras installed. Each field's help is the ``--flag`` help verbatim; the
flag is the field name with dashes (``max_batch_size`` -> ``--max-batch-size``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.models.precision import DTYPE_HELP, DTYPE_NAMES, QUANTIZE_HELP, QUANTIZE_NAMES
from softprompt.engine.adapter_name import check_adapter_name
from softprompt.engine.decode_options import DECODE_HELP, DECODE_NAMES
from softprompt.errors import ConfigError

ADMIN_TOKEN_ENV = "SOFTPROMPT_ADMIN_TOKEN"


def _opt(default: Any, help: str, **meta) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ServerSettings:
    """Options of the HTTP server. Build with keywords; `validate()` checks them (create_app calls it)."""

    # ----------------------------------------------------------------- model and adapters
    model: str | None = _opt(
        None,
        "Base model: built-in name, local checkpoint directory or hub id "
        "(used by `serve`; create_app takes a loaded model).",
        cli=False,
    )
    served_model_name: str | None = _opt(
        None, "Name clients use in the 'model' field for the bare base model (default: the --model value)."
    )
    adapters: dict[str, str] = _opt(
        {}, "Adapters registered at start, NAME -> directory (--adapter NAME=PATH).", cli=False
    )
    adapter_dir: str | None = _opt(
        None,
        "Directory of adapter subdirectories. Every valid <adapter-dir>/<name> is registered at start, "
        "and the admin endpoints load names from here (and only from here).",
    )
    max_resident_adapters: int = _opt(
        64,
        "Most adapters kept in memory at once; beyond it the least recently used idle adapter is evicted "
        "and reloaded from disk on its next request.",
    )
    max_adapter_bytes: int | None = _opt(
        None,
        "Most bytes the resident adapters hold together: each costs its parameters plus the prompt keys/values "
        "cached for it (layers x 2 x kv_heads x head_dim x virtual tokens x dtype bytes). Beyond it the least "
        "recently used idle adapters are evicted, as beyond --max-resident-adapters (default: no byte bound).",
    )
    dtype: str | None = _opt(None, DTYPE_HELP, choices=DTYPE_NAMES)
    quantize: str | None = _opt(None, QUANTIZE_HELP, choices=QUANTIZE_NAMES)
    decode: str | None = _opt(None, DECODE_HELP, choices=DECODE_NAMES)
    device: str | None = _opt(None, "Device for the model: cpu (default), cuda or cuda:N.")

    # ----------------------------------------------------------------- network
    host: str = _opt("127.0.0.1", "Address to listen on (default loopback only; use 0.0.0.0 behind a load balancer).")
    port: int = _opt(8000, "TCP port to listen on (0 picks a free one).")
    log_level: str = _opt("info", "Log level: critical, error, warning, info or debug.")
    keep_alive_s: int = _opt(
        5,
        "Seconds an idle keep-alive connection stays open. Behind a load balancer or proxy that reuses "
        "connections, set it above the balancer's idle timeout (e.g. 75 for a 60 s one), so the balancer "
        "never sends a request on a connection the server is closing.",
    )

    # ----------------------------------------------------------------- batching
    max_batch_size: int = _opt(32, "Most sequences decoded together in one step (across all adapters).")
    batch_window_ms: float = _opt(
        5.0, "When idle, how long to wait after the first request for more to batch with it (milliseconds)."
    )
    max_queue: int = _opt(256, "Most requests waiting for a batch slot; beyond it requests get 503 + Retry-After.")
    retry_after_s: int = _opt(1, "Seconds sent in Retry-After with a 503 (queue full, adapter slots busy).")
    adapter_wait_s: float = _opt(
        30.0, "Most seconds a request waits for an adapter slot when every resident adapter is busy (then 503)."
    )

    # ----------------------------------------------------------------- request limits
    max_prompt_tokens: int = _opt(2048, "Longest prompt accepted, in tokens (longer: 400).")
    max_tokens_limit: int = _opt(1024, "Largest max_tokens a request may ask for (larger: 400).")
    default_max_tokens: int = _opt(16, "max_tokens used when a request omits it (OpenAI's completions default).")
    max_body_bytes: int = _opt(1_000_000, "Largest request body accepted, in bytes (larger: 413).")
    max_inputs: int = _opt(
        64,
        "Most prompts in one completions request (each of n choices counting as one), most choices in one "
        "chat request, and most texts in one classify request. Requests larger than --max-batch-size are "
        "decoded in parts as slots free up.",
    )
    max_labels: int = _opt(64, "Most candidate labels in one classify request.")

    # ----------------------------------------------------------------- admin
    enable_admin: bool = _opt(
        False,
        "Enable POST/DELETE /admin/adapters/{name} (load from --adapter-dir, unload). Off by default; "
        "needs an admin token.",
    )
    admin_token: str | None = _opt(
        None,
        f"Bearer token for the admin endpoints (default: the {ADMIN_TOKEN_ENV} environment variable). "
        "Prefer the environment variable: command lines are visible to other users.",
    )

    def resolved_admin_token(self) -> str | None:
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None

    def validate(self) -> ServerSettings:
        """Check every field; raises `ConfigError` naming the option."""
        positive = (
            "max_resident_adapters",
            "max_batch_size",
            "max_queue",
            "max_prompt_tokens",
            "max_tokens_limit",
            "default_max_tokens",
            "max_body_bytes",
            "max_inputs",
            "max_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{_flag(name)}: expected a positive integer, got {value!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: expected 0-65535, got {self.port!r}")
        if isinstance(self.keep_alive_s, bool) or not isinstance(self.keep_alive_s, int) or self.keep_alive_s < 1:
            raise ConfigError(f"--keep-alive-s: expected a whole number of seconds >= 1, got {self.keep_alive_s!r}")
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, int) or self.retry_after_s < 0:
            raise ConfigError(f"--retry-after-s: expected a whole number of seconds >= 0, got {self.retry_after_s!r}")
        for name in ("batch_window_ms", "adapter_wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"--{_flag(name)}: expected a number >= 0, got {value!r}")
        bound = self.max_adapter_bytes
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
            raise ConfigError(f"--max-adapter-bytes: expected a positive number of bytes, got {bound!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"--default-max-tokens ({self.default_max_tokens}) is above --max-tokens-limit "
                f"({self.max_tokens_limit})"
            )
        for name, choices in (("dtype", DTYPE_NAMES), ("quantize", QUANTIZE_NAMES), ("decode", DECODE_NAMES)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ConfigError(f"--{name}: expected one of {', '.join(choices)}, got {value!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"--log-level: expected critical, error, warning, info or debug, got {self.log_level!r}")
        if not isinstance(self.adapters, dict):
            raise ConfigError(f"adapters: expected a mapping NAME -> PATH, got {type(self.adapters).__name__}")
        for name in self.adapters:
            problem = check_adapter_name(name)
            if problem:
                raise ConfigError(f"--adapter: {problem}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("--served-model-name: expected a non-empty name")
        if self.adapter_dir is not None and not Path(self.adapter_dir).expanduser().is_dir():
            raise ConfigError(f"--adapter-dir {self.adapter_dir!r}: no such directory")
        if self.enable_admin:
            token = self.resolved_admin_token()
            if not token:
                raise ConfigError(f"--enable-admin needs a token: set {ADMIN_TOKEN_ENV} (or --admin-token)")
            if len(token) < 16:
                raise ConfigError("admin token: use at least 16 characters")
            if self.adapter_dir is None:
                raise ConfigError("--enable-admin needs --adapter-dir: the admin endpoints load names from there only")
        return self


def _flag(name: str) -> str:
    return name.replace("_", "-")
