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


@pytest.mark.parametrize(
    ("args", "flag", "says"),
    [
        (["--workers", "0"], "--workers", "between 1 and 64, got 0"),
        (["--workers", "many"], "--workers", "not a whole number"),
        (["--seeds", "0"], "--seeds", "at least 1, got 0"),
        (["--episodes", "-5"], "--episodes", "at least 1, got -5"),
        (["--w-mem", "1e100"], "--w-mem", "finite number between 0 and 10000, got 1e100"),
        (["--w-mem", "inf"], "--w-mem", "got inf"),
        (["--w-mem", "nan"], "--w-mem", "got nan"),
        (["--w-mem", "0.2", "-1"], "--w-mem", "got -1"),
        (["--w-mem", "0.1", "0.10"], "--w-mem", "0.1 is given twice"),
        (["--w-mem", "0", "-0"], "--w-mem", "0.0 is given twice"),
        (["--w-mem", "0.1234567", "0.1234568"], "--w-mem", "name the same memory (demo-w0.123457-s0)"),
    ],
)
def test_the_demo_refuses_odd_arguments_in_one_line(capsys, args: list[str], flag: str, says: str) -> None:
    """Odd demo arguments end in argparse's usage and one error line naming the flag (exit 2),
    before any service starts: no traceback, no two runs sharing one memory."""
    from zmem_service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", "never-written", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flag}:" in errors[0] and says in errors[0], err
    assert "Traceback" not in err
    assert not Path("never-written").exists()


def test_the_demo_takes_sane_arguments() -> None:
    import argparse

    from zmem_demo.run import add_arguments, memory_name

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--workers", "1", "--seeds", "1", "--w-mem", "0", "1e-5", "0.25", "10000"])
    assert args.workers == 1 and args.seeds == 1 and args.w_mem == [0.0, 1e-5, 0.25, 10000.0]
    names = {memory_name(w, 0) for w in args.w_mem}
    assert len(names) == 4 and all("+" not in n for n in names)  # valid, distinct memory names
    assert parser.parse_args([]).w_mem == [0.0, 0.02, 0.2, 2.0, 20.0]


def test_record_stays_a_boolean_in_safetensors_metadata(make_client) -> None:
    """`record: true` in the metadata records the query; a boolean for k is refused (422
    naming k), as in JSON bodies, rather than taken as k = 1."""
    import json

    import numpy as np
    import safetensors.numpy

    client = make_client(capacity=100, min_size=1)
    assert client.post("/memories/m/episodes", json={"episodes": [EPISODE] * 5}).status_code == 200
    z = {"z": np.zeros((2, 3), np.float32)}
    st = {"content-type": "application/x-safetensors"}

    def query(**meta: object) -> int:
        body = safetensors.numpy.save(z, metadata={k: json.dumps(v) for k, v in meta.items()})
        return client.post("/memories/m/neighbors", content=body, headers=st).status_code

    assert query(record=True, k=2) == 200
    assert client.get("/memories/m/stats").json()["recorded_queries"] == 2
    assert query(k=True) == 422 and query(k=False) == 422 and query(sigma=True) == 422
    body = safetensors.numpy.save(z, metadata={"k": "true"})
    problem = client.post("/memories/m/neighbors", content=body, headers=st).json()
    assert problem["errors"] == [{"loc": ["k"], "msg": "must be a number, not a boolean"}]
    assert client.get("/memories/m/stats").json()["recorded_queries"] == 2
