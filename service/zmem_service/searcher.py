"""The searcher: the one thread that runs every index search, batching concurrent queries.

FAISS GPU resources are not thread-safe even for reads, and OpenMP's thread count is
per calling thread, so every search runs here. The thread takes every query waiting
when it wakes, groups them by memory and answers each group with one index search
over the stacked rows at the largest k; each query then keeps its own first k
columns. That cut is exact because ties break by seq (a total order), so a query
gets the same answer alone or in a batch. A lone query waits for nothing. Writes
reach an index between batches (the memory's lock orders them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .memory import Memory, Neighbors

T = TypeVar("T")
MAX_BATCH_ROWS = 4096
"""At most this many query rows go into one batch (bounds the stacked arrays)."""


@dataclass
class Query:
    """One request's query rows against one memory, and where its answer goes."""

    memory: Memory
    z: np.ndarray  # float32 [B, d]
    k: int | None
    sigma: float | str | None
    max_floats: int
    record: int = 0  # keep the rows' kernel stats among the last `record` recorded queries
    future: concurrent.futures.Future[Neighbors] = field(default_factory=concurrent.futures.Future)


class Searcher:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Query | Callable[[], Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="zmem-searcher", daemon=True)
        self._thread.start()

    async def search(self, query: Query) -> Neighbors:
        self._queue.put(query)
        return await asyncio.wrap_future(query.future)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the searcher thread (e.g. to warm a device up)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

        self._queue.put(job)
        return future

    def shutdown(self) -> None:
        """Answer what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[Query] = []
            rows = 0
            while True:
                if item is None:
                    self._answer(batch)
                    return
                if isinstance(item, Query):
                    if item.future.set_running_or_notify_cancel():  # skip queries whose caller left
                        batch.append(item)
                        rows += len(item.z)
                else:
                    self._answer(batch)
                    batch, rows = [], 0
                    item()
                if rows >= MAX_BATCH_ROWS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._answer(batch)

    @staticmethod
    def _answer(batch: list[Query]) -> None:
        by_memory: dict[Memory, list[Query]] = {}
        for q in batch:
            by_memory.setdefault(q.memory, []).append(q)
        for memory, queries in by_memory.items():
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
