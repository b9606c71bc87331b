"""Slots nobody can hold: answers computed are sent, slow readers and trickling bodies lose their
slots, one client gets at most half, and JSON of many tiny elements is refused before parsing.

Checked by structure (which requests searched, which slots are held, how many parsing steps
ran), not by CPU time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
from fastapi.testclient import TestClient

from zmem_service.errors import Unavailable
from zmem_service.http import jsonchunks, streaming
from zmem_service.http.pools import Slots
from zmem_service.index_thread import SearchJob
from zmem_service.memory import Neighbors

from ..server import Server, wait_until
from .test_hostile import big_answer_request

ST = "application/x-safetensors"
PROBLEM = "application/problem+json"


def fill(client: TestClient, n: int, d: int) -> np.ndarray:
    z = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    ones = np.ones(n, np.float32)
    body = safetensors.numpy.save({"z": z, "soft_bind": ones / 2, "cone_vol": ones, "lambda_bind": ones})
    assert client.post("/episodes", content=body, headers={"content-type": ST}).status_code == 200
    return z


# -- a computed answer is never thrown away ---------------------------------------------------


def test_large_answers_take_their_slot_before_the_search_so_no_search_is_wasted(make_client) -> None:  # type: ignore[no-untyped-def]
    """Twelve concurrent 1.6 MB answers from one client, which may hold two answer slots: the
    requests that get no slot (the two holders' searches are held up past the longest wait)
    are refused (503, Retry-After) before they search; every search that ran was answered 200,
    and every slot is back afterwards."""
    client: TestClient = make_client(min_size=1, durability="none")
    z = fill(client, 300, 32)
    state = client.app.state  # type: ignore[attr-defined]
    state.codecs.answers = Slots(4, wait=0.05, max_wait=0.3)  # two per peer
    thread = state.zmem.index_thread
    searched: list[int] = []
    search = thread.search

    async def counted(job: SearchJob) -> Neighbors:
        searched.append(len(job.z))
        return await search(job)

    thread.search = counted
    gate = threading.Event()
    thread.call(gate.wait)  # searches queue behind this until the gate opens
    query = safetensors.numpy.save({"z": z[:200]}, metadata={"k": "64"})  # 200 × 64 × 32 floats
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(client.post("/neighbors", content=query, headers={"content-type": ST, "accept": ST}))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 10, 30, "the refusals")  # two hold slots, waiting on the gate
        assert len(searched) == 2
    finally:
        gate.set()
        for t in threads:
            t.join(60)
        thread.search = search
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 2 + [503] * 10
    assert all(r.headers["retry-after"] == "1" for r in results if r.status_code == 503)
    assert len(searched) == statuses.count(200)  # no search was done for a refused request
    assert all(len(r.content) > 1_600_000 for r in results if r.status_code == 200)
    assert state.codecs.answers.shares.taken == 0


def test_one_peer_holds_at_most_half_the_answer_slots() -> None:
    async def scenario() -> None:
        slots = Slots(8, wait=0.05)
        mine = [await slots.take("10.0.0.1", working=False) for _ in range(4)]
        with pytest.raises(Unavailable):
            await slots.take("10.0.0.1")
        theirs = [await slots.take("10.0.0.2", working=False) for _ in range(4)]
        with pytest.raises(Unavailable):
            await slots.take("10.0.0.3")  # all eight are held
        waiting = asyncio.ensure_future(slots.take("10.0.0.3", working=False))
        await asyncio.sleep(0.01)
        mine[0].release()
        mine[0].release()  # a ticket gives its slot back once
        third = await waiting  # a waiter gets the slot given back
        assert slots.shares.taken == 8 and slots.shares.held["10.0.0.1"] == 3
        for ticket in [*mine, *theirs, third]:
            ticket.release()
        assert slots.shares.taken == 0 and not slots.shares.held

    asyncio.run(scenario())


def test_a_request_waits_for_a_slot_while_slots_keep_coming_back() -> None:
    """Answers to fast readers free their slots within milliseconds: a waiter keeps waiting while
    that happens (past `wait`), and gives up `wait` after the last slot came back; a holder
    that is working (a search) is waited for as long as `max_wait`."""

    async def scenario() -> float:
        slots = Slots(4, wait=0.05)
        held = [slots.force(p, working=False) for p in ("b", "b", "c", "c")]

        async def turnover() -> None:
            for _ in range(10):  # a slot comes back and is taken again every 20 ms, for 0.2 s
                await asyncio.sleep(0.02)
                held.pop().release()
                held.insert(0, slots.force("c", working=False))
            await asyncio.sleep(0.02)
            held.pop().release()  # and then one stays free

        start = time.monotonic()
        spinning = asyncio.ensure_future(turnover())
        ticket = await slots.take("a")
        waited = time.monotonic() - start
        await spinning
        ticket.release()
        with pytest.raises(Unavailable):  # nothing comes back now: refused after `wait`
            for _ in range(3):
                held.append(await slots.take("d", working=False))
        for ticket in held:
            ticket.release()
        searching = [slots.force("e") for _ in range(4)]  # working: e.g. searches
        assert slots.working == 4
        later = asyncio.get_running_loop().call_later(0.3, searching[0].release)
        start = time.monotonic()
        await slots.take("f")  # waited for past `wait`: the holders were working
        assert time.monotonic() - start > 0.25
        later.cancel()
        return waited

    assert asyncio.run(scenario()) > 0.15


def test_an_answer_read_below_the_minimum_rate_is_dropped_and_its_slot_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that reads, but slower than the minimum rate, loses the answer once it is GRACE
    seconds behind, however steadily it reads (the stall timeout alone would never fire)."""
    monkeypatch.setattr(streaming, "GRACE", 0.2)
    released: list[bool] = []

    async def scenario() -> int:
        sent: list[int] = []

        async def slow_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                await asyncio.sleep(0.1)  # 256 KiB per 0.1 s: 2.5 MiB/s
                sent.append(len(message["body"]))

        answer = streaming.SentInChunks(
            b"x" * (8 << 20), ST, done=lambda: released.append(True), stall=30, rate=8 << 20
        )
        await answer({}, None, slow_send)
        return sum(sent)

    got = asyncio.run(scenario())
    assert released == [True]
    assert 0 < got < 8 << 20


@pytest.mark.e2e
def test_slow_readers_lose_their_answer_slots_and_big_answers_flow_again(tmp_path: Path) -> None:
    """Eight clients ask for 6.5 MB answers and then read 64 KiB/s, steadily (never stalling):
    the first four hold slots (half, for one address), the others are refused; after the grace
    period they fall behind --min-transfer-rate and lose their answers, and big answers flow."""
    srv = Server(
        tmp_path / "data",
        *("--min-size", "1", "--capacity", "2000", "--durability", "none"),
        *("--min-transfer-rate", "1MiB"),
    ).start()
    try:
        request, query = big_answer_request(srv.url)
        received = [0] * 8
        heads: list[bytes] = [b""] * 8
        stop = threading.Event()

        def slow_reader(i: int) -> None:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                s.connect(("127.0.0.1", srv.port))
                s.sendall(request)
                s.settimeout(30)
                while not stop.is_set():
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    if not heads[i]:
                        heads[i] = chunk[:12]
                    received[i] += len(chunk)
                    time.sleep(4096 / (64 << 10))

        readers = [threading.Thread(target=slow_reader, args=(i,), daemon=True) for i in range(8)]
        start = time.monotonic()
        for t in readers:
            t.start()
        try:
            wait_until(lambda: all(heads), 10, "every reader's status line")
            assert sorted(h[9:12] for h in heads) == [b"200"] * 4 + [b"503"] * 4

            def big_answer() -> bool:
                r = httpx.post(
                    srv.url + "/neighbors", content=query, headers={"content-type": ST, "accept": ST}
                )
                return r.status_code == 200 and len(r.content) > 6_000_000

            wait_until(big_answer, 20, "a big answer once the slow readers are dropped")
            # Well before --body-timeout (30 s): they kept reading, but too slowly.
            assert time.monotonic() - start < 20
            assert all(n < 6_000_000 for n in received)
        finally:
            stop.set()
    finally:
        srv.stop()


# -- bodies that trickle ----------------------------------------------------------------------


@pytest.mark.e2e
def test_trickling_bodies_lose_their_decode_slots(tmp_path: Path) -> None:
    """Bodies that keep trickling (a byte every 0.2 s, so the stall timeout never fires) hold
    read decode slots only until they fall GRACE seconds behind --min-transfer-rate: then a 408
    problem, and large reads are decoded again. One address gets at most half the slots."""
    srv = Server(tmp_path / "data", *("--min-size", "1", "--durability", "none")).start()
    head = (
        b"POST /neighbors HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    answers: list[bytes] = [b""] * 8
    stop = threading.Event()

    def trickle(i: int) -> None:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(head)
            s.settimeout(0.2)
            out = b""
            while not stop.is_set():
                try:
                    s.sendall(b" ")
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out += chunk
                    answers[i] = out
                except TimeoutError:
                    continue
                except OSError:
                    break

    big = json.dumps({"z": [[0.0, 1.0]] * 300})
    try:
        threads = [threading.Thread(target=trickle, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        r = httpx.post(srv.url + "/neighbors", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 503  # this address holds its half of the read slots
        wait_until(lambda: sum(a.startswith(b"HTTP/1.1 408") for a in answers) == 4, 20, "the 408s")
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
        assert len(refused) == 4 and len(timed_out) == 4
        problem = json.loads(timed_out[0].split(b"\r\n\r\n", 1)[1])
        assert problem["status"] == 408 and "min-transfer-rate" in problem["detail"]
        r = httpx.post(srv.url + "/neighbors", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
    finally:
        stop.set()
        srv.stop()


# -- JSON of many tiny elements ---------------------------------------------------------------


def test_json_of_many_tiny_containers_is_refused_before_it_is_parsed(make_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(min_size=1, max_batch=100)
    parsed: list[int] = []
    monkeypatch.setattr(jsonchunks, "loads", lambda text: parsed.append(len(text)))
    for body in (
        '{"z": [' + ",".join(["[]"] * 40_000) + "]}",
        '{"z": [' + ",".join(["{}"] * 40_000) + "]}",
        '{"episodes": [' + ",".join(['{"a": 1, "b": 2}'] * 10_000) + "]}",
    ):
        path = "/episodes" if "episodes" in body else "/neighbors"
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, r.text
        assert r.json()["errors"][0]["loc"] == ["body"] and "at most 2624" in r.json()["detail"]
    assert parsed == []  # refused from the count alone
    monkeypatch.undo()
    # Brackets and colons inside strings are not counted.
    strings = '{"z": [[0.5, 1.0]], "sigma": "' + "[:{" * 30_000 + '"}'
    r = c.post("/neighbors", content=strings, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["sigma"]


def test_the_stepwise_parser_takes_runs_of_scalars_a_window_at_a_time(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    steps: list[int] = []
    value = jsonchunks._value

    def counted(text: str, pos: int, depth: int) -> tuple[Any, int]:
        steps.append(pos)
        return value(text, pos, depth)

    monkeypatch.setattr(jsonchunks, "_value", counted)
    numbers = [0.5, -1, 2e-3, 7, True, None, "a,b", 'c"]d', "\\u00e9"] * 40_000
    text = json.dumps({"z": numbers, "rows": [[1.0, 2.0]] * 100, "x": {"y": [1, [2, 3]]}})
    assert jsonchunks.loads(text) == json.loads(text)
    assert len(steps) < 400  # ~360,000 scalars, a few hundred steps
    for bad in ('{"z": [1, 2, 01, 3' + ", 4" * 30_000 + "]}", '{"z": [1' + ", 2" * 30_000 + ",]}"):
        with pytest.raises(ValueError):
            jsonchunks.loads(bad)
        with pytest.raises(ValueError):
            json.loads(bad)
