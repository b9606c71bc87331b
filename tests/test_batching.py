"""Batched queries get exactly what a lone query gets.

The index thread stacks every query waiting for a memory into one index search at the
largest k and cuts each answer to its own k. These tests hold the index thread
busy so that many queries queue up (mixed k, memories, sigma, record, rows, some
refused), let writes land between batches, release it, and compare every answer
with the same query run alone against the same buffer state. No test here times
anything.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from zmem_core.wire import decode
from zmem_service.index import CpuEngine, FaissCpuIndex
from zmem_service.index_thread import IndexThread, SearchJob
from zmem_service.memory import Memory, Neighbors
from zmem_service.registry import Memories
from zmem_service.ring import Columns
from zmem_service.settings import ServiceSettings

from .conftest import ready_client
from .knn_oracle import brute_force

# name → (z_dim, capacity, min_size, k, sigma): small rings that wrap, one that starts inactive.
MEMORIES: dict[str, tuple[int, int, int, int, float | str]] = {
    "a": (4, 300, 1, 8, 1.0),
    "b": (4, 100, 40, 12, "auto"),
    "c": (3, 64, 1, 5, 0.5),
}


@dataclass
class Write:
    """Append these rows to one memory (seqs follow the memory's own)."""

    name: str
    z: np.ndarray
    risk_target: np.ndarray


def rows_for(memory: Memory, w: Write) -> Columns:
    cols = Columns.empty(w.z.shape[1], len(w.z))
    cols.z[:] = w.z
    cols.risk_target[:] = w.risk_target
    cols.seq[:] = np.arange(memory.next_seq, memory.next_seq + len(w.z))
    return cols


def apply(memory: Memory, w: Write) -> None:
    """What the writer does after a commit: reserve, then apply."""
    plan = memory.plan_rows(rows_for(memory, w))
    memory.reserve(plan)
    memory.apply(plan)


def make_memories(tmp_path) -> dict[str, Memory]:
    memories = Memories(ServiceSettings(data_dir=tmp_path), CpuEngine(threads=2))
    out = {}
    for name, (d, capacity, min_size, k, sigma) in MEMORIES.items():
        settings = memories.settings.memory_defaults(d).model_copy(
            update={"capacity": capacity, "min_size": min_size, "k": k, "sigma": sigma}
        )
        out[name] = memories.new(name, settings)
    return out


def random_write(rng: np.random.Generator, name: str) -> Write:
    d = MEMORIES[name][0]
    n = int(rng.choice([1, 7, 30, 90]))
    # A coarse grid: many rows share a z, so ties (broken by seq) decide who is in the first k.
    z = rng.integers(-2, 3, size=(n, d)).astype(np.float32) * 0.5
    z[rng.random(n) < 0.3] += rng.standard_normal((1, d)).astype(np.float32) * 0.1
    return Write(name, z, rng.standard_normal(n).astype(np.float32))


def random_query(rng: np.random.Generator, memory: Memory) -> SearchJob:
    name = memory.name
    d = MEMORIES[name][0]
    b = int(rng.choice([1, 1, 1, 2, 5, 17, 40]))
    if rng.random() < 0.05:
        d += 1  # refused: not the memory's z_dim
    z = rng.integers(-2, 3, size=(b, d)).astype(np.float32) * 0.5
    z += (rng.random((b, 1)) < 0.5) * rng.standard_normal((b, d)).astype(np.float32) * 0.2
    k = [None, 1, 3, 8, 20, 500][int(rng.integers(6))]
    sigma = [None, 0.7, "auto"][int(rng.integers(3))]
    max_floats = 2**24 if rng.random() > 0.05 else 50  # sometimes refused: answer too large
    record = int(rng.choice([0, 50]))
    return SearchJob(memory, z, k, sigma, max_floats, record)


def same_query(q: SearchJob, memory: Memory) -> SearchJob:
    return SearchJob(memory, q.z.copy(), q.k, q.sigma, q.max_floats, q.record)


def assert_same(got: Neighbors | BaseException, want: Neighbors | BaseException) -> None:
    if isinstance(want, BaseException):
        assert type(got) is type(want) and str(got) == str(want)
        return
    assert isinstance(got, Neighbors), got
    assert (got.size, got.active, got.sigma, got.k) == (want.size, want.active, want.sigma, want.k)
    for field in ("seq", "d2", "z", "risk_target"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def plan(seed: int, memories: dict[str, Memory]) -> list[list[SearchJob] | Write]:
    """Phases of queries with writes between them; the first writes fill every memory a bit."""
    rng = np.random.default_rng(seed)
    events: list[list[SearchJob] | Write] = [random_write(rng, name) for name in ("a", "c")]
    for _ in range(6):
        names = list(memories)
        events.append([random_query(rng, memories[str(rng.choice(names))]) for _ in range(12)])
        events.append(random_write(rng, str(rng.choice(names))))
    events.append([random_query(rng, memories[name]) for name in memories for _ in range(4)])
    return events


@pytest.fixture
def searches(monkeypatch) -> list[tuple[int, int]]:
    """(id of the index, query rows) of every FaissCpuIndex.search call."""
    calls: list[tuple[int, int]] = []
    search = FaissCpuIndex.search

    def counted(self: FaissCpuIndex, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((id(self), len(zq)))
        return search(self, zq, k, size)

    monkeypatch.setattr(FaissCpuIndex, "search", counted)
    return calls


async def run_batched(
    thread: IndexThread, events: list[list[SearchJob] | Write], memories: dict[str, Memory]
):
    """Queue every event behind a busy index thread (writes as index-thread jobs, so each lands between
    two batches), then release it. → the answers, phase by phase."""
    gate = threading.Event()
    thread.call(gate.wait)
    tasks: list[list[asyncio.Task[Neighbors]]] = []
    for event in events:
        if isinstance(event, Write):
            thread.call(functools.partial(apply, memories[event.name], event))
            continue
        phase = []
        for q in event:
            phase.append(asyncio.ensure_future(thread.search(q)))
            await asyncio.sleep(0)  # the task runs up to its wait: the query is queued, in order
        tasks.append(phase)
    gate.set()
    answers = []
    for phase in tasks:
        answers.append(await asyncio.gather(*phase, return_exceptions=True))
    return answers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_queries_answer_as_lone_queries(tmp_path, searches, seed: int) -> None:
    batched = make_memories(tmp_path / "batched")
    events = plan(seed, batched)
    thread = IndexThread()
    try:
        answers = asyncio.run(run_batched(thread, events, batched))
    finally:
        thread.shutdown()
    batched_calls = list(searches)

    # The same writes into twin memories, each query answered alone, in the same order.
    twins = make_memories(tmp_path / "lone")
    searches.clear()
    phase = 0
    for event in events:
        if isinstance(event, Write):
            apply(twins[event.name], event)
            continue
        lone = [twins[q.memory.name].query_many([same_query(q, twins[q.memory.name])])[0] for q in event]
        for q, got, want in zip(event, answers[phase], lone, strict=True):
            assert_same(got, want)
            if isinstance(want, Neighbors) and want.active:
                expect_k = min(MEMORIES[q.memory.name][3] if q.k is None else q.k, want.size)
                assert got.d2.shape == (len(q.z), expect_k)
        phase += 1
    for name in MEMORIES:
        got, want = batched[name].recorded_queries(), twins[name].recorded_queries()
        for column in ("risk", "wsum", "n_eff"):
            np.testing.assert_array_equal(got[column], want[column])

    # Batching happened: far fewer searches than queries, and each phase's valid rows of a memory
    # went into one search.
    lone_calls = list(searches)
    assert len(batched_calls) < len(lone_calls) / 2
    phase = 0
    for event in events:
        if isinstance(event, Write):
            continue
        for memory in batched.values():
            mine = [
                (q, a)
                for q, a in zip(event, answers[phase], strict=True)
                if q.memory is memory and isinstance(a, Neighbors) and a.active
            ]
            if len(mine) > 1:
                rows = sum(len(q.z) for q, _ in mine)
                assert (id(memory.index), rows) in batched_calls
        phase += 1


def test_answers_match_numpy_brute_force_whatever_the_batch(tmp_path) -> None:
    """Independent of the lone path: seqs and d2 equal a float64 numpy scan with ties by seq."""
    memories = make_memories(tmp_path)
    rng = np.random.default_rng(7)
    a = memories["a"]
    while a.total_written < 2 * MEMORIES["a"][1]:  # the ring wraps: slot order is not seq order
        apply(a, random_write(rng, "a"))
    held = a.snapshot()
    queries = [
        SearchJob(a, rng.integers(-2, 3, size=(b, 4)).astype(np.float32) * 0.5, k, 1.0, 2**24)
        for b, k in ((1, 1), (3, 3), (1, 8), (20, 64), (2, 300))
    ]
    thread = IndexThread()

    async def run() -> list[Any]:
        gate = threading.Event()
        thread.call(gate.wait)
        tasks = []
        for q in queries:
            tasks.append(asyncio.ensure_future(thread.search(q)))
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks)

    try:
        answers = asyncio.run(run())
    finally:
        thread.shutdown()
    for q, nb in zip(queries, answers, strict=True):
        k = min(q.k or 8, len(held))
        d2, idx = brute_force(held.z, held.seq, q.z, k)
        np.testing.assert_array_equal(nb.seq, held.seq[idx])
        np.testing.assert_allclose(nb.d2, d2, rtol=1e-6)


def test_an_answer_holds_only_its_own_neighbours(tmp_path) -> None:
    """A batch of one k shares one gathered copy; in a batch of mixed k, a small answer keeps
    no copy of a large one's rows alive."""
    memories = make_memories(tmp_path)
    rng = np.random.default_rng(3)
    a = memories["a"]
    while a.size < MEMORIES["a"][1]:
        apply(a, random_write(rng, "a"))
    z = rng.standard_normal((6, 4)).astype(np.float32)

    def ask(ks: list[int], rows: range = range(6)) -> list[Neighbors]:
        jobs = [SearchJob(a, z[i : i + 1], k, 1.0, 2**24) for i, k in zip(rows, ks, strict=True)]
        return [nb for nb in a.query_many(jobs) if isinstance(nb, Neighbors)]

    ks = [1, 1, 1, 1, 1, 60]
    for i, (nb, k) in enumerate(zip(ask(ks), ks, strict=True)):
        assert nb.z.shape == (1, k, 4)
        assert nb.z.base is None or nb.z.base.size <= nb.z.size  # its own rows only
        assert_same(nb, ask([k], range(i, i + 1))[0])
    same = ask([8] * 6)
    assert all(nb.z.base is not None and nb.z.base.size == 6 * 8 * 4 for nb in same)


def test_concurrent_http_queries_answer_as_lone_queries(tmp_path, searches) -> None:
    """Threads post /neighbors and /risk (JSON and safetensors) while the index thread is held and a
    write lands; each answer equals the same request sent alone afterwards."""
    settings = ServiceSettings(data_dir=tmp_path, capacity=200, min_size=5, k=6, durability="none")
    client = ready_client(settings)
    try:
        rng = np.random.default_rng(3)

        def episodes(n: int) -> dict[str, Any]:
            z = rng.integers(-2, 3, size=(n, 3)) * 0.5
            return {
                "episodes": [
                    {"z": row.tolist(), "soft_bind": float(s), "cone_vol": 1.0, "lambda_bind": 0.1}
                    for row, s in zip(z, rng.random(n), strict=True)
                ]
            }

        for name in ("x", "y"):
            assert client.post(f"/memories/{name}/episodes", json=episodes(150)).status_code == 200
        requests: list[tuple[str, dict[str, Any]]] = []
        for i in range(16):
            name = "xy"[i % 2]
            b = [1, 1, 3, 20][i % 4]
            body: dict[str, Any] = {"z": (rng.integers(-2, 3, size=(b, 3)) * 0.5).tolist()}
            if i % 3 == 0:
                body["k"] = [2, 9, 40][i % 9 // 3]
            if i % 5 == 0:
                body["sigma"] = "auto"
            if i % 4 == 1:
                body["z"] = body["z"][0]  # one row, no B axis
            route = "risk" if i % 4 == 2 else "neighbors"
            requests.append((f"/memories/{name}/{route}", body))

        zmem = client.app.state.zmem  # type: ignore[attr-defined]
        thread = zmem.index_thread
        arrived = threading.Semaphore(0)
        search = thread.search

        async def counted(query: SearchJob) -> Neighbors:
            arrived.release()
            return await search(query)

        thread.search = counted
        gate = threading.Event()
        thread.call(gate.wait)
        results: list[Any] = [None] * len(requests)

        def send(i: int) -> None:
            path, body = requests[i]
            results[i] = client.post(path, json=body)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        try:
            for t in threads[:8]:
                t.start()
            for _ in range(8):
                assert arrived.acquire(timeout=30)
            # A write lands while those eight wait: they, and the next eight, see it.
            assert client.post("/memories/x/episodes", json=episodes(70)).status_code == 200
            for t in threads[8:]:
                t.start()
            for _ in range(8):
                assert arrived.acquire(timeout=30)
        finally:
            gate.set()
            for t in threads:
                t.join(60)
        thread.search = search
        calls_batched = len(searches)
        assert calls_batched < len(requests)  # batched: fewer index searches than requests
        for (path, body), r in zip(requests, results, strict=True):
            assert r.status_code == 200, r.text
            alone = client.post(path, json=body)
            assert alone.json() == r.json(), path
        # Safetensors answers agree too, sent concurrently without holding anything.
        headers = {"accept": "application/x-safetensors"}
        done: dict[int, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

        def send_st(i: int) -> None:
            path, body = requests[i]
            done[i] = decode(client.post(path, json=body, headers=headers).content)

        threads = [threading.Thread(target=send_st, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, (path, body) in enumerate(requests):
            arrays, meta = decode(client.post(path, json=body, headers=headers).content)
            assert meta == done[i][1], path
            assert arrays.keys() == done[i][0].keys()
            for key, value in arrays.items():
                np.testing.assert_array_equal(value, done[i][0][key], err_msg=f"{path} {key}")
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("seed", [0, 1])
def test_queries_of_one_loop_turn_are_searched_together_inline(tmp_path, searches, seed: int) -> None:
    """With an idle index thread, small queries that reach `search` in the same turn of the event
    loop are answered on the loop's thread as one search per memory (at most MAX_INLINE_ROWS
    rows, the rest on the thread), each answer the lone one; with the thread busy, none runs inline."""
    from zmem_service.index_thread import INLINE_WORK, MAX_INLINE_ROWS

    gathered = make_memories(tmp_path / "gathered")
    twins = make_memories(tmp_path / "lone")
    rng = np.random.default_rng(seed)
    for name in ("a", "b", "c"):
        for memories in (gathered, twins):
            apply(memories[name], Write(name, *_rows(np.random.default_rng(hash(name) % 100), name)))
    queries = [random_query(rng, gathered[str(rng.choice(list(MEMORIES)))]) for _ in range(30)]
    thread = IndexThread(INLINE_WORK)
    on_loop: list[int] = []

    async def run(busy: bool) -> list[Any]:
        loop_thread = threading.get_ident()
        query_now = Memory.query_now

        def spied(self: Memory, qs: Any) -> Any:
            assert threading.get_ident() == loop_thread
            on_loop.append(sum(len(q.z) for q in qs))
            return query_now(self, qs)

        gate = threading.Event()
        if busy:
            thread.call(gate.wait)
        Memory.query_now = spied  # type: ignore[method-assign]
        try:
            tasks = [asyncio.ensure_future(thread.search(same_query(q, q.memory))) for q in queries]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            Memory.query_now = query_now  # type: ignore[method-assign]

    try:
        answers = asyncio.run(run(busy=False))
        inline = list(on_loop)
        on_loop.clear()
        searches.clear()
        busy_answers = asyncio.run(run(busy=True))
    finally:
        thread.shutdown()
    assert on_loop == []  # the index thread was busy: every query went to it
    # One inline search per memory with small queries in that turn, each within the row cap.
    small = {q.memory.name for q in queries if len(q.z) * q.memory.size * q.z.shape[1] <= INLINE_WORK}
    assert len(inline) == len(small) and all(0 < rows <= max(MAX_INLINE_ROWS, 40) for rows in inline)
    for q, got, busy_got in zip(queries, answers, busy_answers, strict=True):
        twin = twins[q.memory.name]
        want = twin.query_many([same_query(q, twin)])[0]
        assert_same(got, want)
        assert_same(busy_got, want)


def _rows(rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = MEMORIES[name][0]
    n = MEMORIES[name][1] // 2
    z = rng.integers(-2, 3, size=(n, d)).astype(np.float32) * 0.5
    return z, rng.standard_normal(n).astype(np.float32)


@pytest.mark.e2e
def test_requests_that_arrive_together_are_one_search_through_a_real_server(tmp_path) -> None:
    """Eight B=1 queries on eight connections, all in the server's sockets before it reads
    any (the process is stopped while they are sent): one index search on the loop's thread
    (two at most) answers them, as `/metrics` counts it, and each answer is the one it gets
    alone."""
    import os
    import signal
    import socket
    from pathlib import Path

    import httpx

    from zmem_core import wire

    from .server import Server, wait_until

    srv = Server(tmp_path / "data", "--min-size", "1", "--k", "8", "--durability", "none").start()
    try:
        rng = np.random.default_rng(0)
        z = rng.standard_normal((300, 4)).astype(np.float32)
        episodes = [{"z": row.tolist(), "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for row in z]
        assert httpx.post(f"{srv.url}/episodes", json={"episodes": episodes}).status_code == 200
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        bodies = [wire.encode({"z": z[i : i + 1] + 0.01}, {"record": True}) for i in range(8)]
        heads = [
            b"POST /neighbors HTTP/1.1\r\nhost: zmem\r\ncontent-type: %s\r\naccept: %s\r\n"
            b"content-length: %d\r\n\r\n" % (wire.SAFETENSORS.encode(), wire.SAFETENSORS.encode(), len(b))
            for b in bodies
        ]

        def counts() -> dict[str, float]:
            text = httpx.get(f"{srv.url}/metrics").text
            return {
                line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(("zmem_index_searches_total", "zmem_index_queries_total"))
            }

        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in bodies]
        httpx.get(f"{srv.url}/healthz")  # every connection accepted by now
        before = counts()
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{srv.proc.pid}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", 10, "the server stopped")
        try:
            for sock, head, body in zip(socks, heads, bodies, strict=True):
                sock.sendall(head + body)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        answers = []
        for sock in socks:
            with sock, sock.makefile("rb") as f:
                status = f.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                length = 0
                while (line := f.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                answers.append(wire.decode(f.read(length)))
        after = counts()
        # One turn of the loop normally reads all eight; a busy machine may split them over two.
        assert (
            after['zmem_index_searches_total{where="loop"}']
            - before['zmem_index_searches_total{where="loop"}']
            <= 2
        )
        assert (
            after['zmem_index_queries_total{where="loop"}'] - before['zmem_index_queries_total{where="loop"}']
            == 8
        )
        for body, (arrays, meta) in zip(bodies, answers, strict=True):
            alone = httpx.post(
                f"{srv.url}/neighbors",
                content=body,
                headers={"content-type": wire.SAFETENSORS, "accept": wire.SAFETENSORS},
            )
            want, want_meta = wire.decode(alone.content)
            assert meta == want_meta
            for name in ("seq", "d2", "z", "risk_target"):
                np.testing.assert_array_equal(arrays[name], want[name])
    finally:
        srv.stop()


def test_a_query_that_came_alone_is_searched_at_once(tmp_path) -> None:
    """With the server's count saying no other request waits to start, a small query is
    answered within its own task step (no waiting for the turn's end)."""
    from zmem_service.index_thread import INLINE_WORK

    memory = make_memories(tmp_path)["a"]
    apply(memory, Write("a", *_rows(np.random.default_rng(0), "a")))
    thread = IndexThread(INLINE_WORK)
    thread.arrivals = lambda: 0

    async def run() -> Neighbors:
        task = asyncio.ensure_future(
            thread.search(SearchJob(memory, np.zeros((1, 4), np.float32), 3, 1.0, 2**24))
        )
        await asyncio.sleep(0)  # one step of the task: it must be done already
        assert task.done()
        return task.result()

    try:
        nb = asyncio.run(run())
    finally:
        thread.shutdown()
    assert nb.k == 3 and thread.searches == {"loop": 1, "thread": 0}


def test_gathered_queries_wait_a_few_turns_for_arriving_requests(tmp_path) -> None:
    """While the server's count says requests wait to start, gathered queries wait for them,
    turn by turn: a request that arrives while a turn's queries are gathered joins their
    search. They wait at most GATHER_TURNS turns however many keep arriving, and no turn
    when none arrives."""
    from zmem_service.index_thread import GATHER_TURNS, INLINE_WORK

    memory = make_memories(tmp_path / "gathered")["a"]
    twin = make_memories(tmp_path / "lone")["a"]
    for m in (memory, twin):
        apply(m, Write("a", *_rows(np.random.default_rng(0), "a")))
    thread = IndexThread(INLINE_WORK)
    searched: list[int] = []
    query_now = Memory.query_now

    def spied(self: Memory, qs: Any) -> Any:
        searched.append(len(qs))
        return query_now(self, qs)

    def job(i: int) -> SearchJob:
        return SearchJob(memory, np.full((1, 4), 0.5 * i, np.float32), 3, 1.0, 2**24)

    waiting = [0]  # requests received whose task hasn't started, as the server counts them

    def arrive(i: int) -> asyncio.Future[Neighbors]:
        waiting[0] += 1

        async def started() -> Neighbors:
            waiting[0] -= 1
            return await thread.search(job(i))

        return asyncio.ensure_future(started())

    async def joined() -> list[Neighbors]:
        thread.arrivals = lambda: waiting[0]
        first = [arrive(0), arrive(1)]  # together: gathered, their search due next turn
        await asyncio.sleep(0)
        late = arrive(2)  # comes in before that turn: the search waits for it
        return list(await asyncio.gather(*first, late))

    async def turns(counts: list[int]) -> int:
        """Loop turns until a query is answered, the server's count reading `counts` in turn
        (then 1s): the first read is the query's own, which gathers it."""
        reads = iter(counts)
        thread.arrivals = lambda: next(reads, 1)
        task = asyncio.ensure_future(thread.search(job(3)))
        steps = 0
        while not task.done():
            await asyncio.sleep(0)
            steps += 1
        return steps

    Memory.query_now = spied  # type: ignore[method-assign]
    try:
        answers = asyncio.run(joined())
        assert searched == [3]  # one search for the three (without waiting: 2, then 1)
        quiet = asyncio.run(turns([1, 0]))  # gathered, then nobody arrives: no turn waited
        busy = asyncio.run(turns([1]))  # requests keep arriving: GATHER_TURNS turns, no more
    finally:
        Memory.query_now = query_now  # type: ignore[method-assign]
        thread.shutdown()
    assert busy - quiet == GATHER_TURNS
    for i, got in enumerate(answers):
        assert_same(got, twin.query_many([SearchJob(twin, job(i).z, 3, 1.0, 2**24)])[0])
