"""Hostile clients: oversized heads, slow connections, huge bodies and answers, overflowing z,
big echoes, cross-site writes, forged log lines, memory churn (issue 9, items 1, 4, 6, 9, 12-15).

Tests about the server process run over a real socket; bounds on time are generous
(they catch a stalled loop, not a slow machine).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy
from fastapi.testclient import TestClient

from zmem_service.http.app import create_app
from zmem_service.settings import ServiceSettings

from ..server import Server

PROBLEM = "application/problem+json"
ST = "application/x-safetensors"
EP = {"episodes": [{"z": [0.0, 1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}]}


def exchange(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    """Send `payload` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server answered and closed before taking it all
            s.sendall(payload)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def guarded(tmp_path: Path):  # type: ignore[no-untyped-def]
    srv = Server(
        tmp_path / "data",
        *("--max-header-bytes", "4096", "--header-timeout", "1", "--body-timeout", "1"),
        *("--max-connections", "16", "--min-size", "1", "--durability", "none"),
        env={"ZMEM_TOKEN": "w-secret"},
    ).start()
    yield srv
    srv.stop()


# -- item 1: heads are bounded -------------------------------------------------------------


@pytest.mark.e2e
def test_a_head_over_the_limit_gets_431_before_any_token_check(guarded: Server) -> None:
    ok = exchange(guarded.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200
    for name, payload in [
        ("one big header", b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"),
        ("many headers", b"GET /stats HTTP/1.1\r\n" + b"X-A: bbbbbbbbbbbbbbbb\r\n" * 400 + b"\r\n"),
        ("a long URL", b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("100 MiB header", b"GET /stats HTTP/1.1\r\nX-Big: " + b"a" * (100 << 20) + b"\r\n\r\n"),
    ]:
        answer = exchange(guarded.port, payload)
        assert status_of(answer) == 431, (name, answer[:200])
        head, body = answer.split(b"\r\n\r\n", 1)
        assert b"application/problem+json" in head and json.loads(body)["status"] == 431
    # A head just under the limit is served (401 here: the token is checked after the head).
    fits = b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 3000 + b"\r\nConnection: close\r\n\r\n"
    assert status_of(exchange(guarded.port, fits)) == 401
    assert httpx.get(guarded.url + "/healthz").status_code == 200


# -- item 6: slow connections are timed out, connections capped ------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /episodes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
        b"POST /episodes HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /episodes HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    ],
    ids=["bad_chunk", "two_lengths", "negative_length", "unknown_method", "control_byte"],
)
def test_requests_the_http_parser_refuses_get_problem_json(guarded: Server, request_bytes: bytes) -> None:
    answer = exchange(guarded.port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 400, answer[:200]
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["status"] == 400


@pytest.mark.e2e
def test_half_a_head_or_silence_is_timed_out(guarded: Server) -> None:
    t0 = time.monotonic()
    half = exchange(guarded.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    silent = exchange(guarded.port, b"")
    assert status_of(half) == 408 and status_of(silent) == 408
    assert time.monotonic() - t0 < 15  # --header-timeout 1: closed, not held open


@pytest.mark.e2e
def test_a_stalled_body_is_dropped_and_nothing_is_written(guarded: Server) -> None:
    head = (
        b"POST /episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer w-secret\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    exchange(guarded.port, head + b'{"episodes": [')  # returns once the server closes it
    stats = httpx.get(guarded.url + "/stats", headers={"authorization": "Bearer w-secret"})
    assert stats.json()["size"] == 0


@pytest.mark.e2e
def test_slow_read_bodies_holding_every_read_slot_leave_writes_alone(tmp_path: Path) -> None:
    """Eight large neighbors bodies (a read token is enough) trickle in and hold all eight
    read decode slots: further large reads get 503, but a large write still goes through."""
    srv = Server(
        tmp_path / "data",
        *("--min-size", "1", "--durability", "none"),
        env={"ZMEM_TOKEN": "w-secret", "ZMEM_READ_TOKEN": "r-secret"},
    ).start()
    head = (
        b"POST /neighbors HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer r-secret\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    holders = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
    try:
        for s in holders:
            s.sendall(head)
        time.sleep(0.5)  # each request now holds a read slot, waiting for the rest of its body
        big_read = httpx.post(
            srv.url + "/neighbors",
            content=json.dumps({"z": [[0.0, 1.0]] * 300}),
            headers={"authorization": "Bearer r-secret", "content-type": "application/json"},
        )
        assert big_read.status_code == 503
        write = httpx.post(
            srv.url + "/episodes",
            content=json_episodes(40, 2),  # over the 2 KiB decoded on the loop: it needs a slot
            headers={"authorization": "Bearer w-secret", "content-type": "application/json"},
        )
        assert write.status_code == 200, write.text
    finally:
        for s in holders:
            s.close()
        srv.stop()


def big_answer_request(url: str) -> tuple[bytes, bytes]:
    """Fill the server at `url` with 2,000 z's of d = 64; → (the raw bytes of one `POST /neighbors`
    whose answer is large (50 rows × k = 512 × 64 floats, about 6.5 MB), its body alone)."""
    z = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    ones = np.ones(2000, np.float32)
    st = safetensors.numpy.save({"z": z, "soft_bind": ones / 2, "cone_vol": ones, "lambda_bind": ones})
    assert httpx.post(url + "/episodes", content=st, headers={"content-type": ST}).status_code == 200
    query = safetensors.numpy.save({"z": z[:50]}, metadata={"k": "512"})
    head = (
        b"POST /neighbors HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-safetensors\r\n"
        b"Accept: application/x-safetensors\r\nContent-Length: %d\r\n\r\n" % len(query)
    )
    return head + query, query


@pytest.mark.e2e
def test_large_answers_nobody_reads_are_bounded_and_dropped(tmp_path: Path) -> None:
    """Eight clients ask for 6.5 MB answers and never read them: they hold the eight answer
    slots (a ninth large answer is a 503, small ones still flow); once they have read nothing
    for --body-timeout seconds their answers are dropped and the slots are free again."""
    srv = Server(
        tmp_path / "data",
        *("--min-size", "1", "--capacity", "2000", "--body-timeout", "1"),
        "--durability",
        "none",
    ).start()
    try:
        request, query = big_answer_request(srv.url)
        silent = []
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            s.sendall(request)
            silent.append(s)
        time.sleep(0.5)
        big = httpx.post(srv.url + "/neighbors", content=query, headers={"content-type": ST, "accept": ST})
        assert big.status_code == 503 and big.headers["retry-after"] == "1"
        small = httpx.post(srv.url + "/neighbors", json={"z": [0.0] * 64, "k": 4})
        assert small.status_code == 200
        deadline = time.monotonic() + 20
        while True:  # the silent clients' answers are dropped after 1 s without progress
            big = httpx.post(
                srv.url + "/neighbors", content=query, headers={"content-type": ST, "accept": ST}
            )
            if big.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert big.status_code == 200 and len(big.content) > 6_000_000
        for s in silent:
            s.close()
    finally:
        srv.stop()


@pytest.mark.e2e
def test_connections_past_the_cap_get_503_with_retry_after(guarded: Server) -> None:
    idle = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(16)]
    try:
        time.sleep(0.3)  # let the server accept them
        answer = exchange(guarded.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 503 and b"retry-after: 1" in answer.lower()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if status_of(exchange(guarded.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not take connections again")


# -- item 4: big bodies and answers stay off the event loop, answers bounded in bytes -------


def json_episodes(n: int, d: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d)).round(6).tolist()
    eps = [{"z": row, "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for row in z]
    return json.dumps({"episodes": eps}).encode()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_30_mib_json_write_does_not_stall_healthz(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", "--capacity", "10000", "--durability", "none").start()
    try:
        body = json_episodes(10_000, 256)
        assert len(body) > 25 << 20
        worst, polls, done = 0.0, 0, threading.Event()

        def write() -> None:
            try:
                r = httpx.post(
                    srv.url + "/episodes",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=300,
                )
                assert r.status_code == 200, r.text[:300]
            finally:
                done.set()

        writer = threading.Thread(target=write)
        writer.start()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                polls += 1
                time.sleep(0.02)
        writer.join()
        assert httpx.get(srv.url + "/stats").json()["size"] == 10_000
        assert polls > 5 and worst < 1.0, (polls, worst)
    finally:
        srv.stop()


def test_json_answers_are_bounded_in_bytes_and_say_safetensors_fits(make_client) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(min_size=1, k=64, max_response_bytes=64 * 1024)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((200, 32)).astype(np.float32)
    ones = np.ones(200, np.float32)
    st = safetensors.numpy.save({"z": z, "soft_bind": ones / 2, "cone_vol": ones, "lambda_bind": ones})
    assert c.post("/episodes", content=st, headers={"content-type": ST}).status_code == 200
    query = {"z": z[:4].tolist(), "k": 64}  # 4 × 64 × 32 floats: ~35 KiB as safetensors, ~150 KiB as JSON
    r = c.post("/neighbors", json=query)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert "safetensors" in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["k"]
    r = c.post("/neighbors", json=query, headers={"accept": ST})
    assert r.status_code == 200 and len(r.content) <= 64 * 1024
    r = c.post("/neighbors", json={"z": z[:1].tolist(), "k": 8})
    assert r.status_code == 200 and np.array(r.json()["seq"]).shape == (1, 8)
    big = {"z": z[:40].tolist(), "k": 64}  # over the limit in either format
    r = c.post("/neighbors", json=big, headers={"accept": ST})
    assert r.status_code == 422 and "fewer rows" in r.json()["detail"]


def test_large_json_bodies_decode_like_small_ones(make_client) -> None:  # type: ignore[no-untyped-def]
    """Bodies past the inline threshold take the pool and the stepwise parser: same answers, same errors."""
    c: TestClient = make_client(min_size=1)
    body = json_episodes(500, 16)
    assert (
        c.post("/episodes", content=body, headers={"content-type": "application/json"}).json()["accepted"]
        == 500
    )
    bad = json.loads(body)
    bad["episodes"][321]["soft_bind"] = "x"
    r = c.post("/episodes", json=bad)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["episodes", 321, "soft_bind"]
    r = c.post("/episodes", content=body[:-5], headers={"content-type": "application/json"})
    assert r.status_code == 400
    rows = np.zeros((300, 16)).tolist()
    rows[250] = rows[250][:3]
    r = c.post("/neighbors", json={"z": rows})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["z", 250]
    assert c.get("/stats").json()["size"] == 500


@pytest.mark.e2e
@pytest.mark.slow
def test_rss_stays_bounded_under_big_heads_bodies_and_answers(tmp_path: Path) -> None:
    """Scaled-down loads of items 1 and 4 against --max-memory-bytes 64 MiB: the server's RSS
    stays under its idle RSS + the budget + 512 MiB (four 8 MiB JSON bodies parsed at once,
    their Python objects, answers being encoded)."""
    budget = 64 << 20
    srv = Server(
        tmp_path / "data",
        *("--max-memory-bytes", str(budget), "--capacity", "20000", "--durability", "none"),
    ).start()
    assert srv.proc is not None
    try:
        idle = rss(srv.proc.pid)
        peak, stop = idle, threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss(srv.proc.pid))  # type: ignore[union-attr]
                time.sleep(0.01)

        body = json_episodes(2500, 256)  # ~8 MiB of JSON
        heads = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n"

        def post(i: int) -> None:
            headers = {"content-type": "application/json"}
            r = httpx.post(srv.url + f"/memories/m{i}/episodes", content=body, headers=headers, timeout=300)
            assert r.status_code == 200, r.text[:200]

        watcher = threading.Thread(target=watch)
        watcher.start()
        loads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        loads += [threading.Thread(target=exchange, args=(srv.port, heads)) for _ in range(8)]
        for t in loads:
            t.start()
        for t in loads:
            t.join()
        query = {"z": np.zeros((64, 256)).tolist(), "k": 64}  # 1M floats back as JSON, 4 at once
        answers = [
            threading.Thread(
                target=lambda: httpx.post(srv.url + "/memories/m0/neighbors", json=query, timeout=300)
            )
            for _ in range(4)
        ]
        for t in answers:
            t.start()
        for t in answers:
            t.join()
        stop.set()
        watcher.join()
        overhead = 512 << 20
        bound = idle + budget + overhead
        print(f"\nRSS idle {idle >> 20} MiB, peak {peak >> 20} MiB; bound {bound >> 20} MiB")
        assert peak < bound
    finally:
        srv.stop()


# -- item 9: z whose squared distances could overflow float32 -------------------------------


def test_z_too_large_for_float32_distances_is_refused(make_client) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(min_size=1)
    big = [1e19, 1e19]  # squared norm 2e38 > float32 max / 4
    ok = [9e18, 0.0]  # 8.1e37: fits
    eps = {"episodes": [{**EP["episodes"][0], "z": ok}, {**EP["episodes"][0], "z": big}]}
    r = c.post("/episodes", json=eps)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["episodes", 1, "z"]
    z = np.array([ok, big], np.float32)
    ones = np.ones(2, np.float32)
    st = safetensors.numpy.save({"z": z, "soft_bind": ones / 2, "cone_vol": ones, "lambda_bind": ones})
    r = c.post("/episodes", content=st, headers={"content-type": ST})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["episodes", 1, "z"]
    assert c.get("/stats").json()["size"] == 0
    r = c.post("/neighbors", json={"z": [ok, big]})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["z", 1]
    r = c.post("/risk", content=safetensors.numpy.save({"z": z}), headers={"content-type": ST})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["z", 1]
    # The largest admissible z's, far apart: every number in the answer is finite, valid JSON.
    edge = {
        "episodes": [{**EP["episodes"][0], "z": [9.2e18, 0.0]}, {**EP["episodes"][0], "z": [-9.2e18, 0.0]}]
    }
    assert c.post("/episodes", json=edge).status_code == 200
    for path in ("/neighbors", "/risk"):
        r = c.post(path, json={"z": [9.2e18, 0.0], "sigma": "auto"})
        assert r.status_code == 200
        json.loads(r.text, parse_constant=lambda name: pytest.fail(f"answered {name}"))


def test_the_client_refuses_z_too_large_early() -> None:
    from zmem_client import ZMemClient

    client = ZMemClient(
        "http://zmem.invalid", transport=httpx.MockTransport(lambda request: httpx.Response(500))
    )
    try:
        with pytest.raises(ValueError, match="too large"):
            client.record([1e19, 1e19], soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
    finally:
        client.close(timeout=1)


# -- item 12: errors echo little; 503s say when to retry ------------------------------------


def test_a_10_mb_request_never_gets_a_big_error(make_client) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(min_size=1)
    z = np.zeros((1, 2), np.float32)
    ones = np.ones(1, np.float32)
    meta = {"id": "x" * (10 << 20)}  # not a JSON literal: refused, naming the key
    st = safetensors.numpy.save(
        {"z": z, "soft_bind": ones, "cone_vol": ones, "lambda_bind": ones}, metadata=meta
    )
    r = c.post("/episodes", content=st, headers={"content-type": ST})
    assert r.status_code == 422 and len(r.content) < 4096, len(r.content)
    huge_key = {"episodes": [], "k" * (10 << 20): 1}
    r = c.post("/episodes", json=huge_key)
    assert r.status_code == 422 and len(r.content) < 4096, len(r.content)
    r = c.put("/memories/x", json={"z_dim": "y" * (10 << 20)})
    assert r.status_code == 422 and len(r.content) < 4096, len(r.content)


def test_every_503_carries_retry_after(tmp_path: Path) -> None:
    client = TestClient(create_app(ServiceSettings(data_dir=tmp_path)))  # lifespan not run: still loading
    for method, path in [("GET", "/memories"), ("GET", "/readyz"), ("GET", "/stats")]:
        r = client.request(method, path)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (path, r.status_code)


# -- item 13: no writes by cookie, no bodies a browser sends cross-site without a preflight --


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_simple_request_bodies_get_415(make_client, content_type: str) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(min_size=1)
    body = json.dumps(EP).encode()
    headers = {"content-type": content_type}
    for method, path in [
        ("POST", "/episodes"),
        ("POST", "/neighbors"),
        ("POST", "/memories/a/risk"),
        ("PUT", "/memories/a"),
        ("POST", "/memories/a/import"),
    ]:
        r = c.request(method, path, content=body, headers=headers)
        assert r.status_code == 415 and r.headers["content-type"] == PROBLEM, (method, path, r.status_code)
    assert c.get("/stats").json()["size"] == 0
    assert c.get("/memories/a").status_code == 404


# -- item 14: the access log can't be forged -------------------------------------------------


@pytest.mark.e2e
def test_control_characters_in_paths_are_escaped_in_the_access_log(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data")
    srv.args += ["--log-level", "info", "--access-log"]
    srv.start()
    try:
        fake = "/x%0A2026-11-26 12:00:00,000 INFO zmem.access: DELETE /memories/prod 204 1.0ms%1B[2K"
        assert httpx.get(srv.url + fake).status_code == 404
    finally:
        srv.stop()
    lines = srv.log.read_text().splitlines()
    assert not any(line.startswith("2026-11-26 12:00:00,000") for line in lines)
    assert any("GET /x\\n2026-11-26" in line and "\\x1b[2K" in line for line in lines), lines[-5:]


# -- item 15: /metrics forgets deleted memories ----------------------------------------------


@pytest.mark.slow
def test_metrics_forget_deleted_memories(make_client) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(min_size=1, durability="none")
    c.post("/episodes", json=EP)
    c.post("/memories/warm/episodes", json=EP)  # the routes' own series exist from here on
    c.delete("/memories/warm")
    c.get("/metrics")
    before = len(c.get("/metrics").content)
    for i in range(2000):
        name = f"ghost{i}"
        assert c.post(f"/memories/{name}/episodes", json=EP).status_code == 200
        if i % 100 == 0:
            assert f'memory="{name}"' in c.get("/metrics").text
        assert c.delete(f"/memories/{name}").status_code == 204
    text = c.get("/metrics").text
    assert "ghost" not in text
    assert len(text) < before * 1.1 + 2048, (before, len(text))
