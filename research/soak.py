"""Soak run of the HTTP server on loopback: ``python -m research.soak [--minutes 5] [--clients 48] [--json out.json]``.

What it does, with nothing but this machine:

1. Writes a tiny random Llama checkpoint and ``--adapters`` adapters (all three methods, in turn) to a
   temporary directory, and starts the real server as a separate process, exactly as a user would:
   ``python -m softprompt.cli serve --model CKPT --adapter-dir DIR --port P`` on 127.0.0.1, with
   ``--max-resident-adapters`` below the adapter count, so adapters are evicted and reloaded all along.
2. **Soak**: ``--clients`` concurrent asyncio clients (httpx) send completions, streamed completions,
   chats and classifications naming random adapters (and the base model) until the time or request
   budget is spent. Every response is checked (status 200, the body's shape, streams end with
   ``[DONE]``); anything else counts as an error. The server's resident memory (``VmRSS`` of its
   process) is sampled after a warm-up and every few seconds until the end.
3. **Queue bound**: a second server with ``--max-batch-size 1 --max-queue Q`` gets a burst of long
   requests from many more clients than it can hold. The ones beyond the queue must get an immediate
   503 with ``Retry-After`` (``code: queue_full``), the rest 200; ``/health`` is polled during the burst
   and the queue depth must never exceed Q; ``softprompt_rejected_total{reason="queue_full"}`` must
   count exactly the 503s.

`tests/server/test_server_soak.py` runs a short form of both (about 25 s); this module prints a report and exits
non-zero when an invariant fails. ``--minutes 5`` is the full form (see docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = [
    ("prompt_tuning", {"num_virtual_tokens": 4}),
    ("prefix_tuning", {"num_virtual_tokens": 3}),
    ("p_tuning", {"num_virtual_tokens": 5}),
]
PROMPTS = [f"Soak prompt {i}: {'lorem ipsum ' * (i % 5)}the end" for i in range(40)]
LABELS = [["yes", "no"], ["positive", "negative", "neutral"]]
KEEPALIVE_S = 2.0  # client-side idle expiry, below the server's --keep-alive-s (default 5)
RSS_TOLERANCE = 0.05  # end-of-run RSS may exceed the post-warm-up RSS by at most this fraction


# ------------------------------------------------------------------------------------------ fixtures on disk
def prepare(root: Path, adapters: int) -> tuple[Path, Path, list[str]]:
    """A tiny checkpoint and ``adapters`` saved adapters under ``root``; returns (checkpoint, adapter dir, names)."""
    from softprompt import SoftPromptModel

    from .models import tiny_llama

    base, tokenizer = tiny_llama()
    checkpoint = root / "model"
    base.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    model = SoftPromptModel(base, tokenizer, name_or_path="soak-base")
    adapter_dir = root / "adapters"
    names = []
    for i in range(adapters):
        method, config = METHODS[i % len(METHODS)]
        name = f"a{i:02d}-{method.split('_')[0]}"
        model.add_adapter(name, method=method, seed=100 + i, **config)
        model.save_adapter(name, adapter_dir / name)
        names.append(name)
    return checkpoint, adapter_dir, names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux: VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServerProcess:
    """``softprompt serve`` in a child process on 127.0.0.1 and a free port; waits until /health is ok."""

    def __init__(self, checkpoint: Path, adapter_dir: Path, *options: str, log_path: Path | None = None):
        self.args = [
            sys.executable,
            "-m",
            "softprompt.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--adapter-dir",
            str(adapter_dir),
            "--served-model-name",
            "base",
            "--host",
            "127.0.0.1",
            "--log-level",
            "warning",
            *options,
        ]
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        import httpx

        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model: more threads only fight over shared cores
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
        for _attempt in range(3):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self._log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(
                [*self.args, "--port", str(port)], cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + 120
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            self.__exit__()
            if "address already in use" not in self.log_path.read_text(errors="replace").lower():
                break
        raise RuntimeError(f"the server did not start; its log:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn drains and exits
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


# ------------------------------------------------------------------------------------------ the load
@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    by_kind: dict = field(default_factory=dict)
    by_status: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (kind, model, status or exception, detail), first 20
    error_count: int = 0
    latencies: list = field(default_factory=list)

    def error(self, *item) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(item)


def _request(rng: random.Random, models: list[str]) -> tuple[str, str, dict]:
    kind = rng.choice(["completion", "completion", "stream", "chat", "classify"])
    model = rng.choice(models)
    prompt = rng.choice(PROMPTS)
    if kind == "classify":
        inputs = [prompt] if rng.random() < 0.5 else rng.sample(PROMPTS, 3)
        return kind, "/v1/classify", {"model": model, "input": inputs, "labels": rng.choice(LABELS)}
    sampling = {"max_tokens": rng.randint(2, 12), "temperature": rng.choice([0, 0, 0.7]), "seed": rng.randint(0, 99)}
    if kind == "chat":
        return (
            kind,
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "stream": rng.random() < 0.3,
                **sampling,
            },
        )
    prompts = prompt if rng.random() < 0.8 else rng.sample(PROMPTS, 2)
    return kind, "/v1/completions", {"model": model, "prompt": prompts, "stream": kind == "stream", **sampling}


def _check(kind: str, body: dict, response) -> str | None:
    """None when ``response`` is a correct 200 for the request, else what is wrong."""
    if response.status_code != 200:
        return response.text[:200]
    if body.get("stream"):
        blocks = [b.strip() for b in response.text.split("\n\n") if b.strip()]
        if not blocks or blocks[-1] != "data: [DONE]":
            return "stream did not end with [DONE]"
        events = [json.loads(b[len("data: ") :]) for b in blocks[:-1]]
        if any("error" in e for e in events) or not any(
            c.get("finish_reason") for e in events for c in e.get("choices", [])
        ):
            return "stream without a finish_reason, or with an error event"
        return None
    data = response.json()
    if kind == "classify":
        labels = body["labels"]
        want = 1 if isinstance(body["input"], str) else len(body["input"])
        if len(data["data"]) != want or any(row["label"] not in labels for row in data["data"]):
            return "classification rows do not match the request"
        return None
    want = 1 if isinstance(body.get("prompt", ""), str) else len(body["prompt"])
    if len(data["choices"]) != want or data["usage"]["completion_tokens"] > want * body["max_tokens"]:
        return "choices or usage do not match the request"
    return None


async def run_load(
    url: str, models: list[str], *, clients: int, seconds: float, max_requests: int | None, seed: int = 0, on_tick=None
) -> Tally:
    """``clients`` concurrent clients until ``seconds`` pass or ``max_requests`` are sent; every answer is checked."""
    import httpx

    tally = Tally()
    deadline = time.monotonic() + seconds
    # Idle connections expire on the client side well before the server's keep-alive timeout (5 s): with
    # both at 5 s, a request sent on a connection the server is closing at that instant is reset (ReadError),
    # the race every HTTP client/proxy in front of a keep-alive server must avoid.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=KEEPALIVE_S)

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60, limits=limits) as client:

        async def worker(index: int):
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline and (max_requests is None or tally.requests < max_requests):
                tally.requests += 1
                kind, path, body = _request(rng, models)
                tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1
                started = time.monotonic()
                try:
                    response = await client.post(path, json=body)
                except httpx.HTTPError as exc:
                    tally.error(kind, body["model"], type(exc).__name__, str(exc)[:200])
                    continue
                tally.latencies.append(time.monotonic() - started)
                tally.by_status[response.status_code] = tally.by_status.get(response.status_code, 0) + 1
                problem = _check(kind, body, response)
                if problem is None:
                    tally.ok += 1
                else:
                    tally.error(kind, body["model"], response.status_code, problem)

        async def ticker():
            while time.monotonic() < deadline and (max_requests is None or tally.requests < max_requests):
                await asyncio.sleep(1.0)
                if on_tick is not None:
                    on_tick(tally)

        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(worker(i) for i in range(clients)))
        tick.cancel()
    return tally


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# ------------------------------------------------------------------------------------------ the two phases
def soak(
    checkpoint: Path,
    adapter_dir: Path,
    names: list[str],
    *,
    seconds: float,
    clients: int,
    warmup_s: float,
    max_requests: int | None = None,
    resident: int | None = None,
    log=print,
) -> dict:
    """Phase 2: the mixed load against one server; returns the report (see `check_soak`)."""
    import httpx

    resident = resident or max(2, len(names) * 2 // 3)
    options = ["--max-resident-adapters", str(resident), "--max-batch-size", "32", "--batch-window-ms", "2"]
    with ServerProcess(checkpoint, adapter_dir, *options) as server:
        models = names + ["base"]
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        # Warm-up: the same load for warmup_s; RSS is measured from its end (allocator pools, caches filled).
        warm = asyncio.run(run_load(server.url, models, clients=clients, seconds=warmup_s, max_requests=None, seed=1))
        rss_start = server.rss()
        samples.append((0.0, rss_start))
        log(f"warm-up: {warm.requests} requests, {warm.error_count} errors, RSS {rss_start / 2**20:.1f} MiB")
        last_log = [time.monotonic()]

        def on_tick(tally: Tally) -> None:
            now = time.monotonic()
            samples.append((now - started - warmup_s, server.rss()))
            if now - last_log[0] >= 30:
                last_log[0] = now
                log(
                    f"  {now - started - warmup_s:6.0f} s: {tally.requests} requests, {tally.error_count} errors, "
                    f"RSS {samples[-1][1] / 2**20:.1f} MiB"
                )

        t0 = time.monotonic()
        tally = asyncio.run(
            run_load(
                server.url, models, clients=clients, seconds=seconds, max_requests=max_requests, seed=2, on_tick=on_tick
            )
        )
        duration = time.monotonic() - t0
        time.sleep(0.5)  # let the server settle the last responses before the final sample
        rss_end = server.rss()
        samples.append((duration, rss_end))
        with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as client:
            health = client.get("/health").json()
            metrics = client.get("/metrics").text
        alive = server.proc.poll() is None
        log_tail = server.log_tail()
    errors_in_log = [line for line in log_tail.splitlines() if "Traceback" in line or "ERROR" in line]
    return {
        "phase": "soak",
        "seconds": round(duration, 1),
        "clients": clients,
        "adapters": len(names),
        "max_resident_adapters": resident,
        "requests": tally.requests,
        "ok": tally.ok,
        "errors": tally.error_count,
        "error_samples": tally.errors,
        "warmup_requests": warm.requests,
        "warmup_errors": warm.error_count,
        "by_kind": tally.by_kind,
        "by_status": {str(k): v for k, v in tally.by_status.items()},
        "requests_per_s": round(tally.requests / duration, 1),
        "latency_p50_s": round(_percentile(tally.latencies, 0.5), 4),
        "latency_p99_s": round(_percentile(tally.latencies, 0.99), 4),
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_max_mib": round(max(r for _, r in samples) / 2**20, 1),
        "rss_growth": round(rss_end / rss_start - 1, 4),
        "rss_samples_mib": [(round(t, 1), round(r / 2**20, 1)) for t, r in samples],
        "adapter_loads": _metric(metrics, "softprompt_adapter_loads_total"),
        "adapter_evictions": _metric(metrics, "softprompt_adapter_evictions_total"),
        "server_5xx": sum(_metric(metrics, "softprompt_requests_total", status=str(s)) for s in range(500, 600)),
        "health_after": health,
        "server_alive": alive,
        "server_log_errors": errors_in_log[:5],
    }


def check_soak(report: dict, rss_tolerance: float = RSS_TOLERANCE) -> list[str]:
    """The invariants of a soak report; returns what failed (empty: all hold)."""
    problems = []
    if report["errors"] or report["warmup_errors"]:
        problems.append(f"{report['errors'] + report['warmup_errors']} errors: {report['error_samples'][:3]}")
    if report["ok"] != report["requests"]:
        problems.append(f"only {report['ok']} of {report['requests']} requests succeeded")
    if report["server_5xx"]:
        problems.append(f"the server counted {report['server_5xx']} 5xx responses")
    if report["rss_growth"] > rss_tolerance:
        problems.append(
            f"RSS grew {report['rss_growth']:.1%} (from {report['rss_start_mib']} to "
            f"{report['rss_end_mib']} MiB), above {rss_tolerance:.0%}"
        )
    if report["adapter_evictions"] < 1:
        problems.append("no adapter was evicted: the residency limit was not exercised")
    health = report["health_after"]
    if health["status"] != "ok" or health["queue_depth"] != 0 or health["running"] != 0:
        problems.append(f"server not idle and healthy after the run: {health}")
    if not report["server_alive"] or report["server_log_errors"]:
        problems.append(f"server died or logged errors: {report['server_log_errors']}")
    return problems


def queue_burst(
    checkpoint: Path,
    adapter_dir: Path,
    names: list[str],
    *,
    max_queue: int = 4,
    burst: int = 40,
    max_tokens: int = 60,
    retry_after: int = 3,
) -> dict:
    """Phase 3: more concurrent long requests than batch + queue can hold; returns the report (see `check_burst`)."""
    import httpx

    options = [
        "--max-batch-size",
        "1",
        "--max-queue",
        str(max_queue),
        "--retry-after-s",
        str(retry_after),
        "--batch-window-ms",
        "0",
    ]
    with ServerProcess(checkpoint, adapter_dir, *options) as server:

        async def main():
            depths: list[int] = []
            limits = httpx.Limits(
                max_connections=burst + 2, max_keepalive_connections=burst + 2, keepalive_expiry=KEEPALIVE_S
            )
            async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=120, limits=limits) as client:
                done = asyncio.Event()

                async def poll():
                    while not done.is_set():
                        depths.append((await client.get("/health")).json()["queue_depth"])
                        await asyncio.sleep(0.005)

                async def one(i: int):
                    body = {
                        "model": names[i % len(names)],
                        "prompt": PROMPTS[i % len(PROMPTS)],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    }
                    return await client.post("/v1/completions", json=body)

                poller = asyncio.create_task(poll())
                responses = await asyncio.gather(*(one(i) for i in range(burst)))
                done.set()
                await poller
                metrics = (await client.get("/metrics")).text
                after = await client.post(
                    "/v1/completions", json={"model": names[0], "prompt": "after", "max_tokens": 2}
                )
            return responses, depths, metrics, after

        responses, depths, metrics, after = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    return {
        "phase": "queue_burst",
        "max_queue": max_queue,
        "burst": burst,
        "ok": statuses.count(200),
        "rejected": len(rejected),
        "other_statuses": sorted(s for s in statuses if s not in (200, 503)),
        "rejected_have_retry_after": all(r.headers.get("Retry-After") == str(retry_after) for r in rejected),
        "rejected_codes": sorted({r.json()["error"]["code"] for r in rejected}),
        "max_queue_depth_seen": max(depths, default=0),
        "depth_polls": len(depths),
        "queue_full_metric": _metric(metrics, "softprompt_rejected_total", reason="queue_full"),
        "status_after_burst": after.status_code,
    }


def check_burst(report: dict) -> list[str]:
    problems = []
    if report["other_statuses"]:
        problems.append(f"statuses other than 200/503: {report['other_statuses']}")
    if report["ok"] < 1 or report["rejected"] < 1:
        problems.append(f"expected both 200s and 503s, got {report['ok']} and {report['rejected']}")
    if not report["rejected_have_retry_after"] or report["rejected_codes"] not in ([], ["queue_full"]):
        problems.append(f"503s without Retry-After or with codes {report['rejected_codes']}")
    if report["max_queue_depth_seen"] > report["max_queue"]:
        problems.append(f"queue depth {report['max_queue_depth_seen']} above --max-queue {report['max_queue']}")
    if report["queue_full_metric"] != report["rejected"]:
        problems.append(f"rejected_total{{queue_full}} = {report['queue_full_metric']}, but {report['rejected']} 503s")
    if report["status_after_burst"] != 200:
        problems.append(f"the server did not recover after the burst ({report['status_after_burst']})")
    return problems


# ------------------------------------------------------------------------------------------ command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="Length of the soak phase (default 5).")
    parser.add_argument("--seconds", type=float, default=None, help="Length in seconds (overrides --minutes).")
    parser.add_argument("--clients", type=int, default=48, help="Concurrent clients (default 48).")
    parser.add_argument("--adapters", type=int, default=9, help="Adapters in the adapter dir (default 9).")
    parser.add_argument("--warmup", type=float, default=20.0, help="Warm-up seconds before RSS is measured.")
    parser.add_argument("--max-requests", type=int, default=None, help="Stop after this many requests.")
    parser.add_argument("--rss-tolerance", type=float, default=RSS_TOLERANCE, help="Allowed RSS growth (0.05 = 5%%).")
    parser.add_argument("--skip-burst", action="store_true", help="Skip the queue-bound phase.")
    parser.add_argument("--json", type=Path, default=None, help="Write the reports here.")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60

    from . import harness

    harness.quiet()
    reports, problems = [], []
    with tempfile.TemporaryDirectory(prefix="softprompt-soak-") as tmp:
        checkpoint, adapter_dir, names = prepare(Path(tmp), args.adapters)
        print(f"soak: {seconds:.0f} s, {args.clients} clients, {len(names)} adapters", flush=True)
        report = soak(
            checkpoint,
            adapter_dir,
            names,
            seconds=seconds,
            clients=args.clients,
            warmup_s=args.warmup,
            max_requests=args.max_requests,
            log=lambda m: print(m, flush=True),
        )
        reports.append(report)
        problems += check_soak(report, args.rss_tolerance)
        if not args.skip_burst:
            burst = queue_burst(checkpoint, adapter_dir, names)
            reports.append(burst)
            problems += check_burst(burst)
    for report in reports:
        shown = {k: v for k, v in report.items() if k != "rss_samples_mib"}
        print(json.dumps(shown, indent=1))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("soak OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
