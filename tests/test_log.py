"""The default log: start-up, warnings, errors and a summary line now and then; a line per
request only on request (`--access-log`, or `--log-level debug`); as text or as JSON lines
(`--log-format json`)."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import httpx
import pytest

from zmem_service.cli import JsonLines, parser
from zmem_service.metrics import LogSummary, Metrics
from zmem_service.settings import ServiceSettings

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


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("zmem.test").makeRecord(
        "zmem.test", logging.WARNING, __file__, 1, msg, args, sys.exc_info() if exc else None, extra=extra
    )
    record.created = 1_764_800_000.25  # 2025-12-03T22:13:20.250Z
    return record


def test_a_json_line_holds_time_level_logger_message_and_the_extra_fields() -> None:
    line = JsonLines().format(_record("%d rows from %s", 3, "w1", memory="m", rows=3, ratio=0.5))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2025-12-03T22:13:20.250Z",
        "level": "WARNING",
        "logger": "zmem.test",
        "message": "3 rows from w1",
        "memory": "m",
        "rows": 3,
        "ratio": 0.5,
    }


def test_a_json_line_takes_exceptions_and_values_json_cannot_hold() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = _record("failed", exc=True, path=Path("/x"), color_message="\x1b[1mfailed\x1b[0m")
    line = JsonLines().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "failed" and out["path"] == "/x" and "color_message" not in out
    assert out["exception"].startswith("Traceback") and "ValueError: bad\nvalue" in out["exception"]
    # A NaN would make the line invalid JSON: every extra field goes as its repr instead.
    out = json.loads(JsonLines().format(_record("odd", sigma=math.nan, keys={(1, 2): 3})))
    assert (out["message"], out["sigma"], out["keys"]) == ("odd", "nan", "{(1, 2): 3}")


def test_the_log_format_is_a_setting_with_a_flag_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings().log_format == "text"
    monkeypatch.setenv("ZMEM_LOG_FORMAT", "JSON")
    assert ServiceSettings().log_format == "json"
    assert parser().parse_args(["serve", "--log-format", "json"]).log_format == "json"


@pytest.mark.e2e
def test_json_logs_are_one_object_a_line_uvicorns_own_lines_too(tmp_path: Path) -> None:
    srv = Server(
        tmp_path / "data",
        *("--log-level", "info", "--log-summary-seconds", "1", "--access-log"),
        env={"ZMEM_LOG_FORMAT": "json"},
    )
    srv.start()
    try:
        httpx.post(srv.url + "/episodes", json={"episodes": [EPISODE] * 3}).raise_for_status()
        assert httpx.get(srv.url + "/memories/nope/stats").status_code == 404
        wait_until(lambda: "zmem.summary" in srv.log.read_text(), 10, "a summary line")
    finally:
        srv.stop()
    lines = [json.loads(line) for line in srv.log.read_text().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines), lines
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines)
    said = [(line["logger"], line["message"]) for line in lines]
    assert any(logger.startswith("uvicorn") and "Uvicorn running on" in message for logger, message in said)
    assert any(
        logger == "zmem.access" and "GET /memories/nope/stats 404" in message for logger, message in said
    )
    assert any(logger == "zmem.summary" and "3 episodes written" in message for logger, message in said)
