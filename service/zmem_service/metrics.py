"""Prometheus metrics (a registry per app, so apps in one process don't share counters),
the log's periodic summary, and the access log, which drops query strings so a `?token=`
never reaches a log and escapes control and other non-printable characters so a request
can't forge a line.

The default log says what happened in summary lines (`LogSummary`: requests, errors,
writes and queries since the last line); a line per request is the access log's, on
request (`--access-log`, or `--log-level debug`). It is written by a thread of its own
(`AccessLog`): a request only appends a tuple to a bounded queue, so formatting and
writing the line (~60 µs) stay off the hot path. Lines past the queue's bound are dropped
and counted in /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zmem_core import __version__

if TYPE_CHECKING:
    from .index_thread import IndexThread
    from .registry import Memories

access_log = logging.getLogger("zmem.access")
summary_log = logging.getLogger("zmem.summary")


class Metrics:
    """The service's Prometheus registry: request counts and durations, per-memory counters,
    gauges read at scrape time (`StateCollector`), the process's own (CPU, memory, open files,
    GC) and `zmem_build_info`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # First in the registry: it forgets deleted memories' counter series before anything is read.
        self.state = StateCollector(self)
        self.registry.register(self.state)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Info("zmem_build", "the running zmem", registry=self.registry).info({"version": __version__})
        self.requests = Counter(
            "zmem_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "zmem_http_request_duration_seconds",
            "HTTP request duration, from the request's head to its answer's last byte",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        # Per memory, read through `state` (which leaves deleted memories out), not the registry.
        self.episodes = Counter("zmem_episodes_accepted_total", "episodes stored", ["memory"], registry=None)
        self.duplicates = Counter(
            "zmem_episodes_duplicate_total", "episodes skipped as duplicates", ["memory"], registry=None
        )
        self.access_dropped = Counter(
            "zmem_access_log_dropped_total",
            "access log lines dropped because the log's writer fell behind",
            registry=self.registry,
        )
        self.access = ACCESS
        self.request_log = RequestLog(self)

    def watch(self, memories: Memories, index_thread: IndexThread | None = None) -> None:
        """Read the gauges from `memories` (and the search counts from `index_thread`) at each scrape."""
        self.state.memories = memories
        self.state.index_thread = index_thread


class Polling(Protocol):
    seconds: float  # spent polling
    backoffs: int  # spells that found the core wanted elsewhere


class StateCollector(Collector):
    """What the memories hold, read when /metrics is scraped (a deleted memory leaves no series
    behind), and the per-memory counters of the memories that exist."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.memories: Memories | None = None
        self.index_thread: IndexThread | None = None
        self.busy: Polling | None = None  # the event loop's busy polling (`http/busy.py`)

    def describe(self) -> list[Metric]:
        return []  # families vary with the memories; registering must not collect

    def collect(self) -> Iterator[Metric]:
        if self.index_thread is not None:
            searches = CounterMetricFamily(
                "zmem_index_searches",
                "index searches, by where they ran (the event loop's thread, for small CPU queries "
                "gathered in one loop turn, or the index thread); each answers one or more queries",
                labels=["where"],
            )
            queries = CounterMetricFamily(
                "zmem_index_queries", "queries answered by those searches", labels=["where"]
            )
            for where, n in self.index_thread.searches.items():
                searches.add_metric([where], n)
                queries.add_metric([where], self.index_thread.queries[where])
            yield searches
            yield queries
        if self.busy is not None:
            yield CounterMetricFamily(
                "zmem_busy_poll_seconds",
                "seconds the event loop spent polling for the next request after a query (--busy-poll)",
                self.busy.seconds,
            )
            yield CounterMetricFamily(
                "zmem_busy_poll_backoffs",
                "spells of polling that found the core wanted elsewhere (polling then paused)",
                self.busy.backoffs,
            )
        if self.memories is None:
            return
        memories = self.memories.all()
        size = GaugeMetricFamily("zmem_memory_size_episodes", "episodes held", labels=["memory"])
        capacity = GaugeMetricFamily(
            "zmem_memory_capacity_episodes", "episodes a memory keeps", labels=["memory"]
        )
        held = GaugeMetricFamily(
            "zmem_memory_bytes",
            "bytes a memory holds, as --max-memory-bytes counts them (ring, index, ids, recorded queries)",
            labels=["memory"],
        )
        for memory in memories:
            size.add_metric([memory.name], memory.size)
            capacity.add_metric([memory.name], memory.settings.capacity)
            held.add_metric([memory.name], memory.nbytes)
        yield size
        yield capacity
        yield held
        budget = self.memories.settings.max_memory_bytes
        yield GaugeMetricFamily(
            "zmem_memory_budget_bytes", "--max-memory-bytes: all memories together", budget
        )
        names = {memory.name for memory in memories}
        for counter in (self.metrics.episodes, self.metrics.duplicates):
            families = list(counter.collect())
            for gone in {s.labels["memory"] for f in families for s in f.samples} - names:
                counter.remove(gone)
            yield from counter.collect()


def printable(text: str) -> str:
    """`text` with each non-printable character (newlines, ANSI escapes, …) as a Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class AccessLog:
    """Access log lines queued by requests and written by one daemon thread, about every 20 ms."""

    BOUND = 10_000
    PAUSE = 0.02

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[str, str, int, float]] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, method: str, path: str, status: int, seconds: float) -> bool:
        """Queue one line; False when it was dropped (the queue is full)."""
        if not access_log.isEnabledFor(logging.INFO):
            return True
        if len(self._queue) >= self.BOUND:
            return False
        self._queue.append((method, path, status, seconds))
        if self._thread is None:
            self._start()
        self._wake.set()
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zmem-access-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.PAUSE)  # let lines gather
            self.flush()

    def flush(self) -> None:
        """Write every queued line now (also at shutdown)."""
        with self._lock:
            while self._queue:
                method, path, status, seconds = self._queue.popleft()
                access_log.info("%s %s %d %.1fms", printable(method), printable(path), status, 1000 * seconds)


ACCESS = AccessLog()
"""The process's access log writer (the `zmem.access` logger is process-wide too)."""


class LogSummary:
    """What the metrics counted since the last summary line, as one INFO line.

    Read from the counters themselves (nothing on the request path); a series that went
    away (a deleted memory's) counts from zero when it comes back, and one that went down
    came back: its value is its increase, as Prometheus reads a counter reset. Nothing
    happened: no line.
    """

    QUERY_ROUTES = ("/neighbors", "/risk")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._seen: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._since = time.monotonic()
        self.line()  # what came before the first summary counts in none

    def line(self) -> str | None:
        """The summary of what happened since the last call, or None when nothing did."""
        now = time.monotonic()
        requests = client_errors = server_errors = queries = 0
        for labels, count in self._deltas(self.metrics.requests, ("route", "status")):
            route, status = labels
            requests += count
            client_errors += count if status.startswith("4") else 0
            server_errors += count if status.startswith("5") else 0
            queries += count if route.endswith(self.QUERY_ROUTES) else 0
        written = sum(count for _, count in self._deltas(self.metrics.episodes, ("memory",)))
        seconds, self._since = now - self._since, now
        if not requests and not written:
            return None
        return (
            f"last {seconds:.0f} s: {requests} requests ({server_errors} 5xx, {client_errors} 4xx), "
            f"{written} episodes written, {queries} queries"
        )

    def _deltas(self, metric: Any, names: tuple[str, ...]) -> list[tuple[tuple[str, ...], int]]:
        """(the `names` labels, increase) of each of a counter's series that grew since the last call."""
        out = []
        for family in metric.collect():
            before = self._seen.get(family.name, {})
            now = {}
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = tuple(sorted(sample.labels.items()))
                    now[key] = sample.value
                    last = before.get(key, 0.0)
                    grew = sample.value - last if sample.value >= last else sample.value  # a reset
                    if grew > 0:
                        out.append((tuple(sample.labels[n] for n in names), int(grew)))
            self._seen[family.name] = now
        return out


async def log_summaries(metrics: Metrics, every: float) -> None:
    """Log a `LogSummary` line every `every` seconds (at INFO, logger `zmem.summary`), until cancelled."""
    summary = LogSummary(metrics)
    while True:
        await asyncio.sleep(every)
        line = summary.line()
        if line is not None:
            summary_log.info("%s", line)


def configure_access_log(enabled: bool) -> None:
    """A line per request or none: the access log's logger at INFO or above it."""
    access_log.setLevel(logging.INFO if enabled else logging.WARNING)


class RequestLog:
    """Counts, times and logs finished requests (`zmem_http_requests_total`, the latency
    histogram, the access log), keeping the labelled series it has made."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # the labelled children

    def add(self, route: str, method: str, path: str, status: int, seconds: float) -> None:
        series = self._series.get((route, method, status))
        if series is None:
            m = self.metrics
            series = m.requests.labels(route, method, str(status)), m.latency.labels(route, method)
            if len(self._series) < 10_000:  # routes × methods × statuses: a few hundred
                self._series[(route, method, status)] = series
        series[0].inc()
        series[1].observe(seconds)
        if not self.metrics.access.add(method, path, status, seconds):
            self.metrics.access_dropped.inc()


class MetricsMiddleware:
    """Pure ASGI (no per-request task or body copy): counts, times and logs each request."""

    def __init__(self, app: ASGIApp, log: RequestLog) -> None:
        self.app = app
        self.log = log

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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.log.add(route, scope["method"], scope["path"], status, time.perf_counter() - start)
