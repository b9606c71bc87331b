"""The default log: start-up, warnings, errors and a summary line now and then; a line per
request only on request (`--access-log`, or `--log-level debug`)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from zmem_service.metrics import LogSummary, Metrics

from .server import Server, wait_until

EPISODE = {"z": [0.1, 0.2], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1}


def test_a_summary_counts_what_happened_since_the_last_one() -> None:
    metrics = Metrics()
    metrics.requests.labels("/episodes", "POST", "200").inc()  # before the summary began: not counted
    summary = LogSummary(metrics)
    assert summary.line() is None  # nothing happened
    metrics.requests.labels("/episodes", "POST", "200").inc(3)
    metrics.requests.labels("/memories/{name}/neighbors", "POST", "200").inc(5)
    metrics.requests.labels("/risk", "POST", "422").inc(2)
    metrics.requests.labels("/stats", "GET", "503").inc()
    metrics.episodes.labels("a").inc(30)
    metrics.episodes.labels("b").inc(12)
    line = summary.line()
    assert line is not None
    assert line.endswith("11 requests (1 5xx, 2 4xx), 42 episodes written, 7 queries"), line
    assert summary.line() is None
    metrics.episodes.remove("a")  # a deleted memory's series goes, then comes back from zero
    metrics.episodes.labels("a").inc(4)
    metrics.requests.labels("/episodes", "POST", "200").inc()
    assert (summary.line() or "").endswith("1 requests (0 5xx, 0 4xx), 4 episodes written, 0 queries")


ACCESS_LINE = re.compile(r"zmem\.access: (GET|POST) /\S* \d{3} [0-9.]+ms")


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("flags", "per_request"),
    [((), False), (("--access-log",), True), (("--log-level", "debug"), True)],
    ids=["default", "access-log", "debug"],
)
def test_the_default_log_summarises_and_access_lines_come_on_request(
    tmp_path: Path, flags: tuple[str, ...], per_request: bool
) -> None:
    # The tests' servers log at warning by default; this one starts at the real default.
    srv = Server(tmp_path / "data", "--log-level", "info", "--log-summary-seconds", "1", *flags)
    srv.start()
    try:
        httpx.post(srv.url + "/episodes", json={"episodes": [EPISODE] * 3}).raise_for_status()
        assert httpx.post(srv.url + "/neighbors", json={"z": [0.1, 0.2]}).status_code == 200
        assert httpx.get(srv.url + "/stats").status_code == 200
        assert httpx.get(srv.url + "/memories/nope/stats").status_code == 404
        wait_until(lambda: "zmem.summary" in srv.log.read_text(), 10, "a summary line")
    finally:
        srv.stop()
    log = srv.log.read_text()
    summary = next(line for line in log.splitlines() if "zmem.summary" in line)
    # (5xx: /readyz says 503 while the store loads, and the harness polls it)
    assert re.search(
        r"INFO zmem\.summary: last \d+ s: \d+ requests \(\d+ 5xx, 1 4xx\), 3 episodes written, 1 queries",
        summary,
    ), summary
    access = [line for line in log.splitlines() if ACCESS_LINE.search(line)]
    if per_request:
        assert any("POST /episodes 200" in line for line in access), log
        assert any("GET /memories/nope/stats 404" in line for line in access), log
    else:
        assert not access, access
        assert "Uvicorn running on" in log  # start-up lines stay
