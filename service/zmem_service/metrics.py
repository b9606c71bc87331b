"""Prometheus metrics (a registry per app, so apps in one process don't share counters)
and the access log, which drops query strings so a `?token=` never reaches a log."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("zmem.access")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "zmem_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "zmem_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.episodes = Counter(
            "zmem_episodes_accepted_total", "episodes stored", ["memory"], registry=self.registry
        )
        self.duplicates = Counter(
            "zmem_episodes_duplicate_total",
            "episodes skipped as duplicates",
            ["memory"],
            registry=self.registry,
        )
        self.size = Gauge("zmem_memory_size", "episodes held", ["memory"], registry=self.registry)
        self.ring_bytes = Gauge("zmem_ring_bytes", "bytes held by all rings", registry=self.registry)


class MetricsMiddleware:
    """Pure ASGI (no per-request task or body copy): counts, times and logs each request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.metrics
            m.requests.labels(route, scope["method"], str(status)).inc()
            m.latency.labels(route, scope["method"]).observe(elapsed)
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, 1000 * elapsed)
