"""The index thread: the one thread that runs every index search, batching concurrent queries.

FAISS GPU resources are not thread-safe even for reads, and OpenMP's thread count is
per calling thread, so every search runs here. The thread takes every query waiting
when it wakes, groups them by memory and answers each group with one index search
over the stacked rows at the largest k; each query then keeps its own first k
columns. That cut is exact because ties break by seq (a total order), so a query
gets the same answer alone or in a batch. A lone query waits for nothing. Writes
reach an index between batches (the memory's lock orders them). Other work that
searches an index runs here too, in turn with the queries (`call`): the changes
feed's pages (resolving `sigma: "auto"` searches) and the warm-up.

Small queries on a CPU index (`inline_work`: at most that many multiply-adds each,
B·N·d) are answered on the event loop's thread instead, without a thread hop (handing a
query to the thread and back costs more than a small search), and still batched: the
queries that reach `search` in one turn of the event loop (requests that arrived
together, each task run up to its search) are gathered and searched together at the end
of that turn, as one batch of at most MAX_INLINE_ROWS rows, when the index thread is idle
and the memory's lock is free; otherwise they go to the thread as usual. A query that
starts while no other request waits to start (`arrivals`, counted by the server) has
nobody to wait for and is searched at once. Gathered queries wait up to GATHER_TURNS
more turns while requests keep arriving (the server's count says some wait to start,
read after the turn's zero-timeout poll): the requests that came in while this turn's
were parsed join the batch instead of making the next, smaller one. A search per query
costs less in a larger batch (the CPU index reads its base once per batch), and waiting
costs a turn only when a request has already arrived to fill it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .memory import Memory, Neighbors

T = TypeVar("T")
MAX_BATCH_ROWS = 4096
"""At most this many query rows go into one batch (bounds the stacked arrays)."""


@dataclass
class SearchJob:
    """A query queued for the index thread: its rows against one memory, and where its answer goes."""

    memory: Memory
    z: np.ndarray  # float32 [B, d]
    k: int | None
    sigma: float | str | None
    max_floats: int
    record: int = 0  # keep the rows' kernel stats among the last `record` recorded queries
    worker: str | None = None  # who asked (kept with the recorded query)
    future: concurrent.futures.Future[Neighbors] = field(default_factory=concurrent.futures.Future)


INLINE_WORK = 2**21
"""A query of at most this many multiply-adds (B·N·d; 50,000 × 32 at B=1 is 1.6M) may run inline."""
MAX_INLINE_ROWS = 32
"""At most this many gathered rows are searched inline at once; the rest go to the thread."""
GATHER_TURNS = 2
"""Gathered queries wait at most this many more loop turns for arriving requests to join them
(8 workers on 2 cores, `bench_concurrency`: 2.6 → 4.8 queries per search with the torch
workers, 3.4–3.8 → 7.9 with the light ones, and each query answered sooner)."""
_TO_THREAD = object()


class IndexThread:
    def __init__(self, inline_work: int = 0) -> None:
        self.inline_work = inline_work
        # How many requests are received and not yet started (the server counts them): a small
        # query that starts while none waits, with none gathered, is searched at once. None:
        # unknown, so every small query waits for the end of its loop turn.
        self.arrivals: Callable[[], int] | None = None
        self._queued = 0  # items put and not yet done: inline answers wait for none of them
        self._gathered: list[tuple[SearchJob, asyncio.Future[Any]]] = []  # for this loop turn
        self._gathered_rows = 0
        self._waited = 0  # loop turns the gathered queries have waited for others to join
        # Index searches and the queries they answered, by where they ran ("loop", "thread").
        self.searches = {"loop": 0, "thread": 0}
        self.queries = {"loop": 0, "thread": 0}
        self._queue: queue.SimpleQueue[SearchJob | Callable[[], Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="zmem-index", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing queued for the thread (a hint: read without a lock)."""
        return self._queued == 0

    async def search(self, query: SearchJob) -> Neighbors:
        small = len(query.z) * query.memory.size * query.z.shape[1] <= self.inline_work
        if small and self._queued == 0:
            arrivals = self.arrivals() if self.arrivals is not None else None
            if not self._gathered and arrivals == 0:
                answers = self._now(query.memory, [query])  # nobody else can join: no need to wait
                if answers is not None:
                    if isinstance(answers[0], BaseException):
                        raise answers[0]
                    return answers[0]
            else:
                loop = asyncio.get_running_loop()
                waiter: asyncio.Future[Any] = loop.create_future()
                self._gathered.append((query, waiter))
                self._gathered_rows += len(query.z)
                if len(self._gathered) == 1:
                    loop.call_soon(self._search_gathered)  # after the tasks runnable in this turn
                answer = await waiter
                if answer is not _TO_THREAD:
                    assert isinstance(answer, Neighbors)
                    return answer
        self._put(query)
        return await asyncio.wrap_future(query.future)

    def _search_gathered(self) -> None:
        """Answer the queries gathered in this loop turn (see the module docstring): each
        waiter gets its answer or error, or `_TO_THREAD`; or, while requests arrive, wait
        another turn for them (GATHER_TURNS)."""
        if self._waited < GATHER_TURNS and self._gathered_rows < MAX_INLINE_ROWS and self._arriving():
            self._waited += 1
            asyncio.get_running_loop().call_soon(self._search_gathered)  # after the arrivals' tasks
            return
        self._waited = self._gathered_rows = 0
        gathered, self._gathered = self._gathered, []
        by_memory: dict[Memory, list[tuple[SearchJob, asyncio.Future[Any]]]] = {}
        for item in gathered:
            by_memory.setdefault(item[0].memory, []).append(item)
        for memory, items in by_memory.items():
            rows, now = 0, 0
            while now < len(items) and rows + len(items[now][0].z) <= MAX_INLINE_ROWS:
                rows += len(items[now][0].z)
                now += 1
            now = max(now, 1)
            answers = self._now(memory, [q for q, _ in items[:now]]) if self._queued == 0 else None
            for i, (_, waiter) in enumerate(items):
                if waiter.done():  # its request was cancelled
                    continue
                answer = answers[i] if answers is not None and i < now else _TO_THREAD
                if isinstance(answer, BaseException):
                    waiter.set_exception(answer)
                else:
                    waiter.set_result(answer)

    def _arriving(self) -> bool:
        """Whether requests have arrived whose tasks haven't started (False: unknown)."""
        return self.arrivals is not None and self.arrivals() > 0

    def _now(self, memory: Memory, queries: list[SearchJob]) -> Sequence[Neighbors | BaseException] | None:
        """`queries` answered by one search on this (the loop's) thread, counted; None when the
        memory can't answer them at once (`Memory.query_now`)."""
        answers: Sequence[Neighbors | BaseException] | None
        try:
            answers = memory.query_now(queries)
        except BaseException as e:  # a bug must reach the requests
            answers = [e] * len(queries)
        if answers is not None:
            self.searches["loop"] += 1
            self.queries["loop"] += len(queries)
        return answers

    def _put(self, item: SearchJob | Callable[[], Any] | None) -> None:
        self._queued += 1
        self._queue.put(item)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the index thread (e.g. to warm a device up)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

        self._put(job)
        return future

    def shutdown(self) -> None:
        """Answer what is queued, then stop."""
        self._put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[SearchJob] = []
            rows = 0
            while True:
                if item is None:
                    self._answer(batch)
                    return
                if isinstance(item, SearchJob):
                    if item.future.set_running_or_notify_cancel():  # skip queries whose caller left
                        batch.append(item)
                        rows += len(item.z)
                    else:
                        self._queued -= 1
                else:
                    self._answer(batch)
                    batch, rows = [], 0
                    item()
                    self._queued -= 1  # counted until done: nothing runs inline meanwhile
                if rows >= MAX_BATCH_ROWS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._answer(batch)

    def _answer(self, batch: list[SearchJob]) -> None:
        try:
            self._answer_batch(batch)
        finally:
            self._queued -= len(batch)  # under the GIL; only a hint for `search`

    def _answer_batch(self, batch: list[SearchJob]) -> None:
        by_memory: dict[Memory, list[SearchJob]] = {}
        for q in batch:
            by_memory.setdefault(q.memory, []).append(q)
        for memory, queries in by_memory.items():
            self.searches["thread"] += 1
            self.queries["thread"] += len(queries)
            answers: list[Neighbors | BaseException]
            try:
                answers = list(memory.query_many(queries))
            except BaseException as e:  # a bug must reach the requests, not kill the thread
                answers = [e] * len(queries)
            for q, answer in zip(queries, answers, strict=True):
                if isinstance(answer, BaseException):
                    q.future.set_exception(answer)
                else:
                    q.future.set_result(answer)
