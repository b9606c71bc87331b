"""Prometheus metrics (a registry per app, so apps in one process don't share counters)
and the access log, which drops query strings so a `?token=` never reaches a log."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - start
        route = getattr(request.scope.get("route"), "path", "unmatched")
        self.requests.labels(route, request.method, str(response.status_code)).inc()
        self.latency.labels(route, request.method).observe(elapsed)
        access_log.info(
            "%s %s %d %.1fms", request.method, request.url.path, response.status_code, 1000 * elapsed
        )
        return response
