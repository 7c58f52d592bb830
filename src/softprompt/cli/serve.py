"""``softprompt serve``: flags built from `ServerSettings`' fields, and the command that calls `serve`.

`softprompt.server` imports its serving extras (FastAPI, uvicorn) only when serving starts, so the
parser builds without them.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from softprompt.cli.common import add_adapter_argument, add_model_argument, parse_adapter_specs
from softprompt.options import add_arguments as add_option_arguments
from softprompt.server import ServerSettings, serve

NAME = "serve"
HELP = "Serve the base model and adapters over an OpenAI-compatible HTTP API."
EXAMPLES = """
    examples:
      softprompt serve --model smollm2-135m --adapter quotes=runs/quotes --adapter prompts=runs/prompts
      softprompt serve --model smollm2-135m --adapter-dir runs/adapters --port 8080
    """
_METAVARS = {"retry_after_s": "SECONDS", "keep_alive_s": "SECONDS", "adapter_wait_s": "SECONDS", "batch_window_ms": "MS",
             "max_resident_adapters": "N", "max_queue": "N", "max_inputs": "N", "max_labels": "N",
             "max_batch_size": "N", "max_prompt_tokens": "TOKENS", "max_tokens_limit": "TOKENS",
             "default_max_tokens": "TOKENS", "max_body_bytes": "BYTES", "served_model_name": "NAME",
             "adapter_dir": "DIR", "admin_token": "TOKEN", "log_level": "LEVEL"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "Base model: built-in name, local checkpoint directory or hub id.")
    add_adapter_argument(parser, "Adapter to serve (repeatable); NAME defaults to the directory name. Clients name "
                                 "it in the 'model' field.")
    add_option_arguments(parser, ServerSettings, metavars=_METAVARS)


def run(args: argparse.Namespace) -> int:
    options = {f.name: getattr(args, f.name) for f in fields(ServerSettings)
               if f.metadata.get("cli", True) and hasattr(args, f.name)}
    host, port = options.pop("host"), options.pop("port")
    adapter_dir = options.pop("adapter_dir")
    serve(args.model, adapters=parse_adapter_specs(args.adapter), adapter_dir=adapter_dir, host=host, port=port,
          **options)
    return 0
