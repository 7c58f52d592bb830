"""``softprompt serve``: flags built from the fields of `ServeOptions` and `ServerSettings`, and the command
that calls `serve`.

`softprompt.server` imports its serving extras (FastAPI, uvicorn) only when serving starts, so the
parser builds without them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from softprompt.cli.common import adapter_option, model_option, parse_adapter_specs
from softprompt.options import add_arguments as add_option_arguments
from softprompt.server import ServerSettings, serve

NAME = "serve"
HELP = "Serve the base model and adapters over an OpenAI-compatible HTTP API."
EXAMPLES = """
    examples:
      softprompt serve --model smollm2-135m --adapter quotes=runs/quotes --adapter prompts=runs/prompts
      softprompt serve --model smollm2-135m --adapter-dir runs/adapters --port 8080
    """
#: How --help names the value of each `ServerSettings` flag.
_METAVARS = {
    "retry_after_s": "SECONDS",
    "keep_alive_s": "SECONDS",
    "adapter_wait_s": "SECONDS",
    "batch_window_ms": "MS",
    "max_resident_adapters": "N",
    "max_queue": "N",
    "max_inputs": "N",
    "max_labels": "N",
    "max_batch_size": "N",
    "max_prompt_tokens": "TOKENS",
    "max_tokens_limit": "TOKENS",
    "default_max_tokens": "TOKENS",
    "max_body_bytes": "BYTES",
    "max_adapter_bytes": "BYTES",
    "served_model_name": "NAME",
    "adapter_dir": "DIR",
    "admin_token": "TOKEN",
    "log_level": "LEVEL",
}


@dataclass
class ServeOptions:
    """The options of ``softprompt serve`` that are not `ServerSettings` fields."""

    model: str | None = model_option("Base model: built-in name, local checkpoint directory or hub id.")
    adapter: list[str] = adapter_option(
        "Adapter to serve (repeatable); NAME defaults to the directory name. Clients name it in the 'model' field."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, ServeOptions)
    add_option_arguments(parser, ServerSettings, metavars=_METAVARS)


def run(args: argparse.Namespace) -> int:
    options = {
        f.name: getattr(args, f.name)
        for f in fields(ServerSettings)
        if f.metadata.get("cli", True) and hasattr(args, f.name)
    }
    host, port = options.pop("host"), options.pop("port")
    adapter_dir = options.pop("adapter_dir")
    serve(
        args.model, adapters=parse_adapter_specs(args.adapter), adapter_dir=adapter_dir, host=host, port=port, **options
    )
    return 0
