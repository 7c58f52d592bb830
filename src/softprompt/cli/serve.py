"""``softprompt serve``: flags built from `ServerSettings`, and the command that calls `serve`.

`softprompt.cli` imports `add_serve_arguments` and `cmd_serve` from here; nothing heavy is imported
until the command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from softprompt.server.settings import ServerSettings

_TYPES = {"int": int, "float": float, "str": str, "str | None": str}
_METAVARS = {"retry_after_s": "SECONDS", "keep_alive_s": "SECONDS", "adapter_wait_s": "SECONDS", "batch_window_ms": "MS",
             "max_resident_adapters": "N", "max_queue": "N", "max_inputs": "N", "max_labels": "N",
             "max_batch_size": "N", "max_prompt_tokens": "TOKENS", "max_tokens_limit": "TOKENS",
             "default_max_tokens": "TOKENS", "max_body_bytes": "BYTES", "served_model_name": "NAME",
             "adapter_dir": "DIR", "admin_token": "TOKEN", "log_level": "LEVEL"}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Base model: built-in name, local checkpoint directory or hub id.")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                        help="Adapter to serve (repeatable); NAME defaults to the directory name. Clients name it "
                             "in the 'model' field.")
    for f in fields(ServerSettings):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
            continue
        kind = _TYPES.get(str(f.type), str)
        shown = "" if f.default is None else f" (default {f.default})"
        parser.add_argument(flag, type=kind, default=f.default, metavar=_METAVARS.get(f.name, f.name.upper()),
                            help=help_text + shown if "default" not in help_text else help_text)


def cmd_serve(args) -> int:
    from softprompt.cli.app import parse_adapter_specs
    from softprompt.server import serve

    options = {f.name: getattr(args, f.name) for f in fields(ServerSettings)
               if f.metadata.get("cli", True) and hasattr(args, f.name)}
    host, port = options.pop("host"), options.pop("port")
    adapter_dir = options.pop("adapter_dir")
    serve(args.model, adapters=parse_adapter_specs(args.adapter), adapter_dir=adapter_dir, host=host, port=port,
          **options)
    return 0
