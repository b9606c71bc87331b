"""A per-app cache of a memory's pictures and diagnostics, computed off the event loop.

Renders and evaluations run in one worker *process*: a render holds the GIL for
hundreds of milliseconds, and in a thread of the server it would stall the kNN path
(measured: neighbour calls fell to a quarter while a map re-rendered every 100 ms).
One dedicated thread takes the snapshot (a copy under the memory's lock) and hands
it to that process, so nothing runs on the event loop or the kNN thread, and one
process bounds the CPU that dashboards can take from training. Only the short copy
of the recorded query risks, which the risk key needs, runs on asyncio's default pool.

Results are cached, least recently used first out, under a key that names the memory
object, what it held (its ``version``; for the risk series, a digest of the recorded
query risks) and the kind and parameters of the picture. Concurrent requests for the same
key share one computation. A key is read before the snapshot is taken, so a cached result
is never older than its key says.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import multiprocessing
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from .diagnostics import evaluate
from .memory import Memory
from .plots import render_map, render_risk, render_trail
from .ring import Columns

T = TypeVar("T")


@dataclass(frozen=True)
class Picture:
    """PNG bytes and their entity tag (a quoted SHA-1 of the bytes, stable across restarts)."""

    png: bytes
    etag: str

    @classmethod
    def of(cls, png: bytes) -> Picture:
        return cls(png, f'"{hashlib.sha1(png).hexdigest()}"')


class PictureCache:
    """Pictures and diagnostics of memories, each computed once per content and parameters.

    Args:
        max_entries: how many results are kept (least recently used dropped first).

    The methods are coroutines for the event loop; the work itself runs on the cache's
    worker thread. Errors raised by a computation reach every request waiting on it and
    are not cached.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be ≥ 1, got {max_entries}")
        self.max_entries = max_entries
        self._done: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zmem-pictures")
        # spawn, not fork: the server has threads (uvicorn, FAISS, the writer) by now.
        self._process = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
        )
        # A deleted and re-created memory starts again at version 0: tell the objects apart.
        self._generation: weakref.WeakKeyDictionary[Memory, int] = weakref.WeakKeyDictionary()
        self._counter = itertools.count()

    def close(self) -> None:
        """Stop the worker thread and process once their current job is done; later calls fail."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._process.shutdown(wait=True, cancel_futures=True)

    def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._process.submit(fn, *args, **kwargs).result()

    async def map(self, memory: Memory, *, max_points: int, seed: int, dpi: int) -> Picture:
        """The seed's 2×2 PCA map (``plots.render_map``)."""

        def job() -> Picture:
            cols = memory.snapshot()
            return Picture.of(
                self._run(
                    render_map,
                    cols.z,
                    cols.soft_bind,
                    cols.cone_vol,
                    cols.lambda_bind,
                    cols.risk_target,
                    title=_title(memory.name, cols),
                    max_points=max_points,
                    seed=seed,
                    dpi=dpi,
                    eps=memory.settings.risk.eps,
                )
            )

        return await self._get(self._key(memory, memory.version, "map", max_points, seed, dpi), job)

    async def trail(self, memory: Memory, *, last: int, max_points: int, seed: int, dpi: int) -> Picture:
        """The last ``last`` z's in arrival order over the buffer (``plots.render_trail``)."""

        def job() -> Picture:
            cols = memory.snapshot()
            return Picture.of(
                self._run(
                    render_trail,
                    cols.z,
                    last=last,
                    title=_title(memory.name, cols),
                    max_points=max_points,
                    seed=seed,
                    dpi=dpi,
                )
            )

        return await self._get(self._key(memory, memory.version, "trail", last, max_points, seed, dpi), job)

    async def risk(self, memory: Memory, *, dpi: int) -> Picture:
        """The kernel risk of the recorded queries (``plots.render_risk``)."""
        risk, digest = await asyncio.to_thread(_recorded_risk, memory)

        def job() -> Picture:
            title = f"{memory.name}: kernel risk of the last {risk.size} recorded queries"
            return Picture.of(self._run(render_risk, risk, title=title, dpi=dpi))

        return await self._get(self._key(memory, "risk", risk.size, digest, dpi), job)

    async def diagnostics(self, memory: Memory) -> dict[str, Any]:
        """The seed's acceptance criteria (``diagnostics.evaluate``); the caller must not
        change the returned dict (it is the cached one)."""
        risk, digest = await asyncio.to_thread(_recorded_risk, memory)

        def job() -> dict[str, Any]:
            cols = memory.snapshot()
            return self._run(
                evaluate, cols.z, cols.soft_bind, cols.lambda_bind, risk, min_size=memory.settings.min_size
            )

        return await self._get(self._key(memory, memory.version, "diagnostics", risk.size, digest), job)

    def _key(self, memory: Memory, *parts: Hashable) -> tuple[Hashable, ...]:
        """The cache key of `parts` (what the result depends on) for this memory object.

        Callers read `memory.version` without the lock (an int read is atomic) before the
        snapshot is taken, so a result is never older than its key.
        """
        generation = self._generation.get(memory)
        if generation is None:
            generation = self._generation[memory] = next(self._counter)
        return (memory.name, generation, *parts)

    async def _get(self, key: Hashable, job: Callable[[], T]) -> T:
        if key in self._done:
            self._done.move_to_end(key)
            result: T = self._done[key]
            return result
        running = self._running.get(key)
        if running is None:
            running = asyncio.get_running_loop().run_in_executor(self._executor, job)
            self._running[key] = running
            running.add_done_callback(lambda f: self._finish(key, f))
        # A request that goes away must not cancel the others' computation.
        return await asyncio.shield(running)

    def _finish(self, key: Hashable, future: asyncio.Future[Any]) -> None:
        del self._running[key]
        # Retrieving the exception also keeps asyncio from logging it when nobody waited.
        if future.cancelled() or future.exception() is not None:
            return
        self._done[key] = future.result()
        while len(self._done) > self.max_entries:
            self._done.popitem(last=False)


def _init_worker() -> None:
    """The render process: one OpenMP thread for FAISS, so it takes at most one core."""
    import faiss

    faiss.omp_set_num_threads(1)


def _recorded_risk(memory: Memory) -> tuple[np.ndarray, str]:
    """A copy of the memory's recorded query risks, float64 [Q], and a digest of them.

    The digest, not the count, keys the risk: once the series is at its length limit a
    new query changes the contents but not the count.
    """
    risk = memory.recorded_risk()
    return risk, hashlib.sha1(risk.tobytes()).hexdigest()


def _title(name: str, cols: Columns) -> str:
    n = len(cols)
    if n == 0:
        return f"{name}: no episodes"
    first, last = (
        datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for t in (cols.ts[0], cols.ts[-1])
    )
    return f"{name}: {n} episode{'' if n == 1 else 's'}, {first} → {last}"
