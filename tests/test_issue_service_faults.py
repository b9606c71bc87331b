"""Service faults found by probing the changes feed, the demo's arguments and wire metadata:
the feed keeps nothing for names nobody polls, the demo refuses odd arguments in one line,
and safetensors metadata takes no boolean for a number."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .server import Server

EPISODE = {"z": [0.0, 1.0, 2.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
LONG = 12_000  # characters in a long name: the request head stays under the 16 KiB limit


def rss_bytes(pid: int) -> int:
    """The resident set of process `pid` (Linux /proc), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def poll_paths(i: int) -> tuple[str, dict[str, str | int], int]:
    """The i-th poll of unknown or invalid names: (path, params, status expected). Each name is
    new, so anything kept per name would grow with the number of polls."""
    kind = i % 4
    if kind == 0:  # too long to be a name
        return f"/memories/{'n' * LONG}{i}/changes", {"wait": 5}, 422
    if kind == 1:  # a valid name nobody made, with a long poll asked for
        return f"/memories/nobody-{i}/changes", {"wait": 30, "after": 5}, 404
    if kind == 2:  # characters a name may not have
        return f"/memories/-bad~{i}/changes", {"wait": 1}, 422
    return f"/memories/{'u' * 59}{i:05d}/changes", {}, 404  # valid (64 characters), unknown


def test_the_changes_feed_keeps_no_event_for_names_nobody_polls(make_client) -> None:
    """Polls of unknown or invalid names, polls that time out and polls woken by a write all
    leave the signal empty once answered."""
    client = make_client(capacity=100, min_size=1)
    signal = client.app.state.zmem.signal
    for i in range(40):
        path, params, status = poll_paths(i)
        assert client.get(path, params=params).status_code == status
    assert len(signal) == 0

    assert client.post("/memories/m/episodes", json={"episodes": [EPISODE] * 3}).status_code == 200
    gen = client.get("/memories/m/changes").json()["generation"]
    idle = client.get("/memories/m/changes", params={"after": 3, "generation": gen, "wait": 0.05})
    assert idle.status_code == 200 and idle.json()["seq"] == []
    assert len(signal) == 0

    answers: list[dict] = []

    def follow() -> None:
        params = {"after": 3, "generation": gen, "wait": 20}
        answers.append(client.get("/memories/m/changes", params=params).json())

    t = threading.Thread(target=follow)
    t.start()
    deadline = time.monotonic() + 10
    while len(signal) == 0 and time.monotonic() < deadline:  # the poll is waiting
        time.sleep(0.01)
    assert len(signal) == 1
    assert client.post("/memories/m/episodes", json={"episodes": [EPISODE] * 2}).status_code == 200
    t.join(15)
    assert answers and answers[0]["seq"] == [4, 5]
    assert len(signal) == 0


@pytest.mark.e2e
def test_polls_of_unknown_and_invalid_names_do_not_grow_the_server(tmp_path: Path) -> None:
    """The leak probe: 20,000 polls of unknown and invalid names (12 kB names included, long
    polls asked for) move the server's RSS by less than 10 MiB."""
    srv = Server(tmp_path / "data", "--durability", "none").start()
    try:
        assert srv.proc is not None
        threads, polls, warm_up = 4, 20_000, 2_000

        def run(start: int, count: int, step: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                for i in range(start, count, step):
                    path, params, status = poll_paths(i)
                    r = http.get(path, params=params)
                    assert r.status_code == status, (path[:80], r.status_code, r.text[:200])

        def burst(first: int, count: int) -> None:
            with ThreadPoolExecutor(threads) as pool:
                done = [pool.submit(run, first + t, first + count, threads) for t in range(threads)]
                for f in done:
                    f.result()

        burst(0, warm_up)  # allocator pools and caches reach their working size first
        before = rss_bytes(srv.proc.pid)
        t0 = time.monotonic()
        burst(warm_up, polls)
        after = rss_bytes(srv.proc.pid)
        print(
            f"\n{polls} polls in {time.monotonic() - t0:.1f} s: server RSS {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MiB ({(after - before) / 2**20:+.1f} MiB)"
        )
        assert after - before < 10 * 2**20
        assert httpx.get(srv.url + "/healthz").status_code == 200
    finally:
        srv.stop()
