"""Pictures over a real socket: a killed render process is replaced; renders whose clients
hung up are not drawn (issue 9, items 5 and 7)."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..server import Server

pytestmark = pytest.mark.e2e


def fill(url: str, n: int = 3000, d: int = 8) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, d))
    eps = [{"z": row.tolist(), "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0} for row in z]
    assert httpx.post(url + "/episodes", json={"episodes": eps}, timeout=30).status_code == 200


def children(pid: int) -> list[int]:
    """Child process ids of `pid`, from /proc (no psutil)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def render_process(pid: int) -> int:
    """The server's render worker: its spawned child that is not multiprocessing's resource tracker."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in children(pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return child
        time.sleep(0.05)
    raise AssertionError("no render process found")


def test_after_kill_9_of_the_render_process_the_next_map_is_drawn(server: Server) -> None:
    fill(server.url, 500)
    assert httpx.get(server.url + "/map.png?dpi=20", timeout=60).status_code == 200
    assert server.proc is not None
    victim = render_process(server.proc.pid)
    os.kill(victim, signal.SIGKILL)
    for route in ("/map.png?dpi=21", "/trail.png?dpi=21", "/diagnostics", "/risk.png?dpi=21"):
        r = httpx.get(server.url + route, timeout=60)
        assert r.status_code == 200, (route, r.text)
    assert render_process(server.proc.pid) != victim


def hang_up_after_sending(port: int, path: str) -> None:
    """Send a GET and close the connection without reading the answer (a client that left)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def test_renders_whose_clients_hung_up_are_not_drawn(server: Server) -> None:
    fill(server.url)
    slow = server.url + "/map.png?dpi=300&max_points=50000"
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=120) as c:
        busy = pool.submit(httpx.get, slow, timeout=120)  # keeps the render process busy
        wait_until_rendering(server)
        abandoned = [f"/map.png?dpi={dpi}" for dpi in range(30, 35)]
        for path in abandoned:
            hang_up_after_sending(server.port, path)
        kept = c.get(server.url + "/map.png?dpi=40")  # queued behind the abandoned ones
        assert kept.status_code == 200
        assert kept.headers["x-cache"] == "MISS"
        assert busy.result().status_code == 200
        # None of the abandoned maps was drawn, so none is in the cache now.
        for path in abandoned:
            r = c.get(server.url + path)
            assert r.status_code == 200
            assert r.headers["x-cache"] == "MISS", path
        assert c.get(server.url + abandoned[0]).headers["x-cache"] == "HIT"


def wait_until_rendering(server: Server) -> None:
    """Until the render process uses CPU (the slow picture is being drawn)."""
    assert server.proc is not None
    pid = render_process(server.proc.pid)

    def cpu() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    before = cpu()
    deadline = time.monotonic() + 30
    while cpu() < before + 20 and time.monotonic() < deadline:  # 20 ticks: imports done, drawing
        time.sleep(0.05)


def test_a_full_render_queue_answers_503_with_retry_after_over_a_socket(server: Server) -> None:
    fill(server.url)
    slow = server.url + "/map.png?dpi=300&max_points=50000"
    paths = [f"/map.png?dpi={30 + i}" for i in range(24)]  # more different pictures than the queue holds
    with ThreadPoolExecutor(len(paths) + 1) as pool:
        busy = pool.submit(httpx.get, slow, timeout=120)
        wait_until_rendering(server)
        answers = list(pool.map(lambda p: httpx.get(server.url + p, timeout=120), paths))
        assert busy.result().status_code == 200
    codes = [r.status_code for r in answers]
    assert 503 in codes and 200 in codes
    refused = answers[codes.index(503)]
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["content-type"] == "application/problem+json"
