"""Prometheus metrics, served at ``GET /metrics``.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests, embedding) never
clash. The request middleware labels by route *template* (``/admin/adapters/{name}``), never by raw
path, so unknown paths cannot blow up label cardinality.

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``softprompt_requests_total`` | counter | route, method, status | finished HTTP requests |
| ``softprompt_request_latency_seconds`` | histogram | route | request start to last byte (streams included) |
| ``softprompt_batch_size`` | histogram | phase (prefill, decode, classify, score) | rows per model call |
| ``softprompt_queue_depth`` | gauge | | requests waiting for a batch slot |
| ``softprompt_running_rows`` | gauge | | sequences in the running batch |
| ``softprompt_adapters_resident`` | gauge | | adapters in memory |
| ``softprompt_adapter_bytes`` | gauge | | bytes the resident adapters hold (parameters + cached prompt keys/values) |
| ``softprompt_adapter_resident_bytes`` | gauge | adapter | the same, per resident adapter (its series leaves with it) |
| ``softprompt_adapter_loads_total`` | counter | | adapters loaded (start, on demand, admin) |
| ``softprompt_adapter_evictions_total`` | counter | | least-recently-used evictions |
| ``softprompt_tokens_total`` | counter | kind (prompt, completion) | tokens processed |
| ``softprompt_rejected_total`` | counter | reason | requests refused with 503 |
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "softprompt_requests", "Finished HTTP requests.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "softprompt_request_latency_seconds",
            "Request latency, to the last byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "softprompt_batch_size", "Rows per model call.", ["phase"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("softprompt_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running_rows = Gauge("softprompt_running_rows", "Sequences in the running batch.", registry=r)
        self.adapters_resident = Gauge("softprompt_adapters_resident", "Adapters in memory.", registry=r)
        self.adapter_bytes = Gauge(
            "softprompt_adapter_bytes", "Bytes held by resident adapters (parameters + prompt keys/values).", registry=r
        )
        self.adapter_resident_bytes = Gauge(
            "softprompt_adapter_resident_bytes",
            "Bytes held by one resident adapter (parameters + prompt keys/values).",
            ["adapter"],
            registry=r,
        )
        self.adapter_loads = Counter("softprompt_adapter_loads", "Adapters loaded.", registry=r)
        self.adapter_evictions = Counter("softprompt_adapter_evictions", "Least-recently-used evictions.", registry=r)
        self.tokens = Counter("softprompt_tokens", "Tokens processed.", ["kind"], registry=r)
        self.rejected = Counter("softprompt_rejected", "Requests refused with 503.", ["reason"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: counts requests by route template and status, times them to the last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(
                route=template, method=scope.get("method", ""), status=str(status["code"])
            ).inc()
            self.metrics.latency.labels(route=template).observe(time.perf_counter() - start)
