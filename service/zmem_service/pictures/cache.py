"""A per-app cache of a memory's pictures and diagnostics, computed off the event loop.

Renders and evaluations run in one worker *process*: a render holds the GIL for
hundreds of milliseconds, and in a thread of the server it would stall the kNN path
(measured: neighbour calls fell to a quarter while a map re-rendered every 100 ms).
One dedicated thread takes the snapshots (copies the memory makes under its own lock)
and hands them to that process, so nothing runs on the event loop or the kNN thread, and
one process bounds the CPU that dashboards can take from training. Only the short copy
of the recorded queries, which the risk and diagnostics keys need, runs on asyncio's
default pool.

Results are cached, least recently used first out, under a key that names the memory
object, what it held (its ``version``; for recorded queries, a digest of them; for a map
drawn in another memory's basis, that memory and its version too) and the kind and
parameters of the picture. Concurrent requests for the same key share one computation.
A key is read before the snapshot is taken, so a cached result is never older than its key.

The queue of computations is bounded (``RenderQueueFull``, a 503 with Retry-After, past
``max_queued``); a computation whose requesters have all gone before it starts is dropped.
If the render process dies (the OOM killer, ``kill -9``), the next computation starts a
new one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import itertools
import logging
import multiprocessing
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from ..diagnostics.criteria import evaluate
from ..errors import Unavailable
from ..memory import Memory
from ..ring import Columns
from .plots import Limits, render_map, render_risk, render_trail

T = TypeVar("T")
log = logging.getLogger("zmem.pictures")


class RenderQueueFull(Unavailable):
    """Too many different pictures are waiting to be drawn; retry after `retry_after` s."""

    retry_after = 2


@dataclass(frozen=True)
class Picture:
    """PNG bytes and their entity tag (a quoted SHA-1 of the bytes, stable across restarts);
    `cached` says whether this answer came from the cache (no computation waited on)."""

    png: bytes
    etag: str
    cached: bool = False

    @classmethod
    def of(cls, png: bytes) -> Picture:
        return cls(png, f'"{hashlib.sha1(png).hexdigest()}"')


@dataclass(frozen=True)
class View:
    """How a map, trail or the diagnostics see a memory beyond their own parameters: in the
    basis of memory `basis` (None: its own), in `projection` ("pca", the map's principal
    components, or "risk": a first axis that best predicts the risk target and the leading
    principal component orthogonal to it), with fixed colour limits `clim` (by field name)."""

    basis: Memory | None = None
    clim: Limits = field(default_factory=dict)
    projection: str = "pca"

    def key(self, cache: PictureCache) -> tuple[Hashable, ...]:
        basis = cache._key(self.basis, self.basis.version) if self.basis is not None else None
        return (basis, tuple(sorted(self.clim.items())), self.projection)

    def basis_z(self) -> np.ndarray | None:
        return self.basis.snapshot().z if self.basis is not None else None

    def basis_columns(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The basis memory's z [M, d] and risk targets [M] (None, None: the memory's own)."""
        if self.basis is None:
            return None, None
        cols = self.basis.snapshot()
        return cols.z, cols.risk_target


@dataclass
class _Pending:
    """A computation queued or running on the cache's thread, and how many requests wait on it."""

    work: concurrent.futures.Future[Any]
    result: asyncio.Future[Any]
    waiters: int = 0


class PictureCache:
    """Pictures and diagnostics of memories, each computed once per content and parameters.

    Args:
        max_entries: how many results are kept (least recently used dropped first).
        max_queued: how many different computations may wait to start; one more is refused
            with ``RenderQueueFull``.

    The methods are coroutines for the event loop; the work itself runs on the cache's
    worker thread and process. Errors raised by a computation reach every request waiting
    on it and are not cached.
    """

    def __init__(self, max_entries: int = 64, max_queued: int = 16) -> None:
        if max_entries < 1 or max_queued < 1:
            raise ValueError(f"max_entries and max_queued must be ≥ 1, got {max_entries}, {max_queued}")
        self.max_entries = max_entries
        self.max_queued = max_queued
        self._done: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._running: dict[Hashable, _Pending] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zmem-pictures")
        self._process_lock = threading.Lock()
        self._process = self._new_process()
        # A deleted and re-created memory starts again at version 0: tell the objects apart.
        self._generation: weakref.WeakKeyDictionary[Memory, int] = weakref.WeakKeyDictionary()
        self._counter = itertools.count()

    @staticmethod
    def _new_process() -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads (uvicorn, FAISS, the writer) by now.
        return ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
        )

    def close(self) -> None:
        """Stop the worker thread and process once their current job is done; later calls fail."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._process_lock:
            process = self._process
        process.shutdown(wait=True, cancel_futures=True)

    def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the render process; a dead process is replaced once."""
        for attempt in (1, 2):
            with self._process_lock:
                process = self._process
            try:
                return process.submit(fn, *args, **kwargs).result()
            except BrokenProcessPool:
                with self._process_lock:
                    if self._process is process:
                        log.warning("the render process died; starting a new one")
                        process.shutdown(wait=False, cancel_futures=True)
                        self._process = self._new_process()
                if attempt == 2:
                    raise Unavailable("the render process died twice drawing this; retry later") from None
        raise AssertionError("unreachable")

    async def map(
        self, memory: Memory, *, max_points: int, seed: int, dpi: int, view: View = View()
    ) -> Picture:
        """The seed's 2×2 PCA map (``plots.render_map``)."""

        def job() -> Picture:
            cols = memory.snapshot()
            basis_z, basis_rt = view.basis_columns()
            return Picture.of(
                self._run(
                    render_map,
                    cols.z,
                    cols.soft_bind,
                    cols.cone_vol,
                    cols.lambda_bind,
                    cols.risk_target,
                    title=_title(memory.name, cols, view),
                    max_points=max_points,
                    seed=seed,
                    dpi=dpi,
                    eps=memory.settings.risk.eps,
                    basis_z=basis_z,
                    clim=view.clim,
                    projection=view.projection,
                    basis_risk_target=basis_rt,
                )
            )

        key = self._key(memory, memory.version, "map", max_points, seed, dpi, *view.key(self))
        return await self._get(key, job)

    async def trail(
        self,
        memory: Memory,
        *,
        last: int,
        max_points: int,
        seed: int,
        dpi: int,
        worker: str | None = None,
        view: View = View(),
    ) -> Picture:
        """The last ``last`` z's, one path per worker, over the buffer (``plots.render_trail``)."""

        def job() -> Picture:
            cols = memory.snapshot()
            basis_z, basis_rt = view.basis_columns()
            return Picture.of(
                self._run(
                    render_trail,
                    cols.z,
                    worker=cols.worker,
                    only=worker,
                    last=last,
                    title=_title(memory.name, cols, view),
                    max_points=max_points,
                    seed=seed,
                    dpi=dpi,
                    basis_z=basis_z,
                    clim=view.clim,
                    projection=view.projection,
                    risk_target=cols.risk_target,
                    basis_risk_target=basis_rt,
                )
            )

        key = self._key(memory, memory.version, "trail", last, max_points, seed, dpi, worker, *view.key(self))
        return await self._get(key, job)

    async def risk(self, memory: Memory, *, dpi: int, worker: str | None = None) -> Picture:
        """The kernel risk of the recorded queries (``plots.render_risk``), one colour per
        worker where the queries name theirs (a ``worker`` column), or only `worker`'s."""
        queries, digest = await asyncio.to_thread(_recorded, memory)
        risk = queries["risk"]

        def job() -> Picture:
            title = f"{memory.name}: kernel risk of the last {risk.size} recorded queries"
            targets = memory.snapshot().risk_target
            # Spikes are measured on the risk targets' scale, as the convergence verdict does;
            # the picture is keyed by the queries alone (writes don't redraw it), so the scale
            # is the buffer's as of the last new query.
            scale = float(np.subtract(*np.percentile(targets, [90, 10]))) if targets.size >= 2 else None
            return Picture.of(
                self._run(
                    render_risk,
                    risk,
                    title=title,
                    worker=queries.get("worker"),
                    only=worker,
                    scale=scale,
                    dpi=dpi,
                )
            )

        return await self._get(self._key(memory, "risk", risk.size, digest, dpi, worker), job)

    async def diagnostics(self, memory: Memory, view: View = View()) -> dict[str, Any]:
        """The acceptance criteria (``diagnostics.evaluate``), on the 2-D map of `view`'s basis
        and projection; the caller must not change the returned dict (it is the cached one)."""
        queries, digest = await asyncio.to_thread(_recorded, memory)
        basis_key = view.key(self)
        key = self._key(memory, memory.version, "diagnostics", digest, basis_key[0], view.projection)

        def job() -> dict[str, Any]:
            cols = memory.snapshot()
            basis_z, basis_rt = view.basis_columns()
            s = memory.settings
            return self._run(
                evaluate,
                cols.z,
                cols.soft_bind,
                cols.lambda_bind,
                queries,
                min_size=s.min_size,
                sigma=s.sigma,
                k=s.k,
                risk_target=cols.risk_target,
                worker=cols.worker,
                projection=view.projection,
                basis_z=basis_z,
                basis_risk_target=basis_rt,
                basis_name=view.basis.name if view.basis is not None else None,
            )

        result: dict[str, Any] = await self._get(key, job)
        return result

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
            return _from_cache(result)
        pending = self._running.get(key)
        if pending is None:
            queued = sum(1 for p in self._running.values() if not p.work.running())
            if queued >= self.max_queued:
                raise RenderQueueFull(
                    f"{queued} pictures are waiting to be drawn (the limit is {self.max_queued}); "
                    f"retry in {RenderQueueFull.retry_after} s"
                )
            work = self._executor.submit(job)
            pending = _Pending(work, asyncio.wrap_future(work))
            self._running[key] = pending
            pending.result.add_done_callback(functools.partial(self._finish, key, pending))
        pending.waiters += 1
        try:
            # A request that goes away must not cancel the others' computation.
            return await asyncio.shield(pending.result)
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.result.done() and pending.work.cancel():
                # Every requester has gone before it started: drop it (not run, not cached).
                self._running.pop(key, None)

    def _finish(self, key: Hashable, pending: _Pending, future: asyncio.Future[Any]) -> None:
        if self._running.get(key) is pending:
            del self._running[key]
        # Retrieving the exception also keeps asyncio from logging it when nobody waited.
        if future.cancelled() or future.exception() is not None:
            return
        self._done[key] = future.result()
        while len(self._done) > self.max_entries:
            self._done.popitem(last=False)


def _from_cache(result: T) -> T:
    if isinstance(result, Picture):
        return Picture(result.png, result.etag, cached=True)  # type: ignore[return-value]
    return result


def _init_worker() -> None:
    """The render process: one OpenMP thread for FAISS, so it takes at most one core."""
    import faiss

    faiss.omp_set_num_threads(1)


def _recorded(memory: Memory) -> tuple[dict[str, np.ndarray], str]:
    """A copy of the memory's recorded queries (``Memory.recorded_queries``) and a digest.

    The digest, not the count, keys them: once the log is at its length limit a new query
    changes the contents but not the count.
    """
    queries = memory.recorded_queries()
    digest = hashlib.sha1()
    for name in sorted(queries):
        column = queries[name]
        if column.dtype == object:  # names (a worker column): their text, not their addresses
            digest.update("\0".join("" if v is None else str(v) for v in column).encode())
        else:
            digest.update(np.ascontiguousarray(column).tobytes())
    return queries, digest.hexdigest()


def _title(name: str, cols: Columns, view: View = View()) -> str:
    n = len(cols)
    kind = "risk projection" if view.projection == "risk" else "PCA basis"
    basis = f" ({kind} of {view.basis.name!r})" if view.basis is not None else ""
    basis = basis or (" (risk projection)" if view.projection == "risk" else "")
    if n == 0:
        return f"{name}: no episodes{basis}"
    first, last = (
        datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for t in (cols.ts[0], cols.ts[-1])
    )
    return f"{name}: {n} episode{'' if n == 1 else 's'}, {first} → {last}{basis}"
