"""The access log is written by a thread of its own: a request only queues its line."""

from __future__ import annotations

import logging

import pytest

from zmem_service.metrics import AccessLog, Metrics


def test_lines_are_queued_then_written_escaped_and_dropped_past_the_bound(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AccessLog, "BOUND", 3)
    log = AccessLog()
    monkeypatch.setattr(log, "_start", lambda: None)  # no writer thread: flushed by hand below
    with caplog.at_level(logging.INFO, logger="zmem.access"):
        assert all(log.add("POST", f"/risk\n{i}", 200, 0.001) for i in range(3))
        assert not log.add("POST", "/risk", 200, 0.001)  # the queue is full: dropped
        assert not caplog.records  # nothing written on the request's path
        log.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"POST /risk\\n{i} 200 1.0ms" for i in range(3)]


def test_the_writer_thread_writes_queued_lines(caplog: pytest.LogCaptureFixture) -> None:
    from ..server import wait_until

    log = AccessLog()
    with caplog.at_level(logging.INFO, logger="zmem.access"):
        log.add("GET", "/stats", 200, 0.002)
        wait_until(lambda: caplog.records, 5, "the access log's line")
    assert caplog.records[0].getMessage() == "GET /stats 200 2.0ms"
    assert caplog.records[0].threadName == "zmem-access-log"


def test_dropped_lines_are_counted_in_metrics() -> None:
    metrics = Metrics()
    metrics.access_dropped.inc()
    text = __import__("prometheus_client").generate_latest(metrics.registry).decode()
    assert "zmem_access_log_dropped_total 1.0" in text
