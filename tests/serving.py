"""Helpers for the server tests: a livelier tiny model, saved adapters, and a real uvicorn server in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from softprompt import SoftPromptModel

from tiny import tiny_base, tiny_tokenizer

ADAPTERS = {  # name -> (method, config): one of each method
    "pt": ("prompt_tuning", {"num_virtual_tokens": 4}),
    "prefix": ("prefix_tuning", {"num_virtual_tokens": 3, "prefix_projection": True}),
    "ptune": ("p_tuning", {"num_virtual_tokens": 5}),
}


def lively_model(family: str = "gpt2", seed: int = 0) -> SoftPromptModel:
    """A tiny random model whose weights are large enough that greedy outputs differ from prompt to prompt
    (the default tiny init makes most of them repeat one token) and top-2 logit gaps stay far above float noise."""
    base = tiny_base(family, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in base.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.3, generator=generator)
    return SoftPromptModel(base, tiny_tokenizer(), name_or_path=f"tiny-{family}")


def save_adapters(root: Path, names=tuple(ADAPTERS), family: str = "gpt2") -> dict[str, str]:
    """Create adapters (one per method) on a lively model and save them under ``root``; returns name -> path."""
    model = lively_model(family)
    paths = {}
    for i, name in enumerate(names):
        method, config = ADAPTERS.get(name, ("prompt_tuning", {"num_virtual_tokens": 2 + i}))
        model.add_adapter(name, method=method, seed=10 + i, **config)
        paths[name] = str(root / name)
        model.save_adapter(name, paths[name])
    return paths


def offline_model(paths: dict[str, str], family: str = "gpt2") -> SoftPromptModel:
    """The reference: a separate lively model with the same adapter files loaded."""
    model = lively_model(family)
    for name, path in paths.items():
        model.load_adapter(path, name=name)
    return model


class ServerThread:
    """Run an app under uvicorn on 127.0.0.1 with an ephemeral port, in a background thread."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=60, **kwargs)


def run_concurrently(url: str, requests: list[tuple[str, str, dict]], concurrency: int, timeout: float = 60):
    """Send ``(method, path, json)`` requests from ``concurrency`` async clients; returns responses in order."""

    async def main():
        results: list = [None] * len(requests)
        queue: asyncio.Queue = asyncio.Queue()
        for item in enumerate(requests):
            queue.put_nowait(item)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=timeout, limits=limits) as client:

            async def worker():
                while not queue.empty():
                    index, (method, path, body) = queue.get_nowait()
                    results[index] = await client.request(method, path, json=body)

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
        return results

    return asyncio.run(main())


def raw_request(url: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """Send a request with ``path`` exactly as given (httpx would normalise ``..``); returns (status, JSON body)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def parse_sse(text: str) -> tuple[list[dict], bool]:
    """The JSON events of a server-sent-events body, and whether it ended with ``data: [DONE]``."""
    import json

    events, done = [], False
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        assert not done, "event after [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done
