"""The service: memories, the writer and the index thread behind one async facade.

The edge decodes a request into the domain's objects (an `EpisodeBatch`, a `Query`,
columns), calls one method here and encodes the answer; this module knows nothing of
HTTP. Every blocking step runs off the event loop: writes on the writer thread,
searches on the index thread (or on the loop's thread, gathered per loop turn, for small
queries on a CPU index), file building on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zmem_core import params

from .episodes import EpisodeBatch, validate
from .errors import Conflict, InsufficientStorage, PayloadTooLarge, Unavailable, ValidationFailed
from .feed import Changes, ChangeSignal, Pages
from .index import CpuEngine, make_engine
from .index_thread import INLINE_WORK, IndexThread, SearchJob
from .memory import Memory, Neighbors
from .metrics import Metrics
from .npz import read_npz, write_npz
from .registry import Memories, check_name
from .ring import Columns
from .settings import MemorySettings, MemorySettingsIn, ServiceSettings
from .store import open_store
from .writer import Writer

log = logging.getLogger("zmem")


MAX_CONCURRENT_IMPORTS = 1
"""Imports received or unpacked at once: each may hold its file's columns in memory."""


@dataclass
class Query:
    """A neighbours/risk query: its rows and the options it asked for (None: the memory's own)."""

    z: np.ndarray  # float32 [B, d]
    one_row: bool  # sent as a single row [d]: answered without the batch axis
    k: int | None = None
    sigma: float | str | None = None
    record: bool = False
    worker: str | None = None  # who asked: kept with a recorded query


class ZMem:
    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        graphs = settings.cuda_graphs == "on"
        self.engine = make_engine(settings.device, settings.knn_threads, cuda_graphs=graphs)
        self.memories = Memories(settings, self.engine)
        # Small searches on a CPU index run inline: a thread hop costs more than they do.
        self.index_thread = IndexThread(INLINE_WORK if isinstance(self.engine, CpuEngine) else 0)
        self.signal = ChangeSignal()
        self.pages = Pages()  # the feed's pages, one per position, shared by its followers
        self.long_polls = 0  # changes-feed requests waiting now (at most `max_long_polls`)
        self._sigma_jobs: dict[Memory, asyncio.Future[None]] = {}  # sigma "auto" for the feed
        self._exports = asyncio.Semaphore(settings.max_concurrent_exports)
        self._exports_waiting = 0
        self._imports = 0  # imports being received or unpacked (at most MAX_CONCURRENT_IMPORTS)
        self._writer: Writer | None = None
        self.ready = False

    # -- lifecycle --------------------------------------------------------------------

    def load(self) -> None:
        """Open the store, rebuild every memory from it and warm the index up (blocking).

        Raises StoreUnreadable when the store can't be read at all; a memory whose rows
        are corrupt is skipped (listed in `memories.skipped`, /readyz and the log)."""
        store = open_store(self.settings.data_dir, self.settings.durability)
        stored, self.memories.skipped = store.load()
        self.memories.retired = store.retired()
        self.memories.restore(stored)
        self._warm_up()
        self._writer = Writer(self.memories, store, on_change=self.signal.changed)
        self.ready = True
        device = self.engine.device_bytes()
        log.info(
            "ready: %d memories, %d episodes, kNN %s (%s)%s",
            len(self.memories.all()),
            sum(m.size for m in self.memories.all()),
            self.engine.name,
            self.engine.reason,
            f", device memory {device / 2**30:.1f} GiB" if device else "",
        )

    def _warm_up(self) -> None:
        """One search through a throwaway memory on the index thread, so that loading
        FAISS (or CUDA) happens before /readyz says 200."""
        settings = self.settings.memory_defaults(1).model_copy(update={"min_size": 1})
        memory = self.memories.new("warm-up", settings)
        row = Columns.empty(1, 1)
        row.seq[:] = 1
        plan = memory.plan_rows(row)
        memory.reserve(plan)
        memory.apply(plan)
        query = SearchJob(memory, np.zeros((1, 1), np.float32), 1, None, 1)
        answer = self.index_thread.call(lambda: memory.query_many([query])).result()[0]
        memory.clear()
        if isinstance(answer, Exception):
            raise answer

    def close(self) -> None:
        """Finish queued writes and close the store; later writes get 503."""
        self.ready = False
        self.signal.closed = True
        if self._writer is not None:
            self._writer.close()
        self.index_thread.shutdown()

    @property
    def writer(self) -> Writer:
        if not self.ready or self._writer is None:
            raise Unavailable("the service is loading its memories; retry shortly")
        return self._writer

    def memory(self, name: str) -> Memory:
        if not self.ready:
            raise Unavailable("the service is loading its memories; retry shortly")
        return self.memories.get(name)

    # -- writes (each one writer job) ------------------------------------------------------

    async def write(self, name: str, batch: EpisodeBatch) -> dict[str, Any]:
        check_name(name)
        validate(batch, max_batch=self.settings.max_batch)
        writer = self.writer
        if len(batch) == 0:
            size = self.memories.get(name).size if name in self.memories else 0
            return {"accepted": 0, "duplicates": 0, "size": size, "first_seq": None, "last_seq": None}
        reply = await writer.write(name, batch)
        self.metrics.episodes.labels(name).inc(reply["accepted"])
        self.metrics.duplicates.labels(name).inc(reply["duplicates"])
        return reply

    async def put(self, name: str, body: MemorySettingsIn) -> tuple[MemorySettings, bool]:
        check_name(name)
        return await self.writer.put(name, body)

    async def delete(self, name: str) -> None:
        self.memory(name)
        await self.writer.delete(name)

    async def import_npz(
        self, name: str, chunks: AsyncIterator[bytes], declared: int | None = None
    ) -> dict[str, Any]:
        """Import an export file arriving as `chunks` (`declared` bytes, when the request says):
        streamed to a temporary file (never held whole in memory), checked from there, then
        loaded by the writer. What can be refused without the file is refused first (a
        declared size over the limit, a memory that isn't empty), and at most
        MAX_CONCURRENT_IMPORTS are received or unpacked at once (503 past that)."""
        check_name(name)
        if not self.ready:
            raise Unavailable("the service is loading its memories; retry shortly")
        limit = self.settings.max_import_bytes
        if declared is not None and declared > limit:
            raise PayloadTooLarge(
                f"import file of {declared} bytes; the limit is {limit} (--max-import-bytes)"
            )
        current = self.memories.find(name)
        if current is not None and current.size:
            raise Conflict(f"memory {name!r} holds {current.size} episodes; import needs an empty memory")
        if self._imports >= MAX_CONCURRENT_IMPORTS:
            raise Unavailable("another import is being loaded; retry shortly")
        self._imports += 1
        try:
            settings, rows = await self._receive_import(chunks, limit)
        finally:
            self._imports -= 1
        return await self.writer.import_rows(name, settings, rows)

    async def _receive_import(
        self, chunks: AsyncIterator[bytes], limit: int
    ) -> tuple[MemorySettings, Columns]:
        with tempfile.TemporaryDirectory(prefix="zmem-import-") as tmp:
            path = Path(tmp) / "import.npz"
            size = 0
            try:
                with open(path, "wb") as f:
                    async for chunk in chunks:
                        size += len(chunk)
                        if size > limit:
                            raise PayloadTooLarge(f"import file over {limit} bytes (--max-import-bytes)")
                        f.write(chunk)  # page cache: microseconds per chunk
            except OSError as e:
                raise InsufficientStorage(f"no room for the import file: {e}") from None
            room = self.settings.max_memory_bytes - self.memories.total_bytes()
            return await asyncio.to_thread(read_npz, path, room)

    # -- reads ------------------------------------------------------------------------

    def answer_floats(self, name: str, query: Query) -> tuple[int, int]:
        """(floats, k) of the neighbours answer `query` would get now (rows × k × z_dim): what
        the edge sizes the answer's slot by, before the search. The memory may grow before
        the search; the answer never shrinks below this."""
        memory = self.memory(name)
        if not memory.active:
            return 0, 0
        k = min(params.asked_k(query.k, memory.settings.k), memory.size)
        return query.z.shape[0] * k * query.z.shape[1], k

    async def neighbors(self, name: str, query: Query) -> Neighbors:
        """The k nearest stored episodes of each query row (recorded when asked)."""
        memory = self.memory(name)
        b = query.z.shape[0]
        if b > self.settings.max_batch:
            raise ValidationFailed.at(["z"], f"{b} query rows; the limit is {self.settings.max_batch}")
        keep = self.settings.recorded_queries if query.record else 0
        floats = self.settings.max_response_floats
        job = SearchJob(memory, query.z, query.k, query.sigma, floats, keep, worker=query.worker)
        return await self.index_thread.search(job)

    async def record_queries(
        self, name: str, columns: dict[str, np.ndarray], worker: str | None = None
    ) -> int:
        """Keep query rows a client computed itself (`risk`, `wsum`, `n_eff` float64 [n]) among
        `name`'s recorded queries → how many it now keeps."""
        memory = self.memory(name)

        def record() -> int:
            memory.record_queries(columns["risk"], columns["wsum"], columns["n_eff"], worker)
            return len(memory.queries)

        return await asyncio.to_thread(record)

    async def risk(self, name: str, query: Query) -> tuple[Neighbors, np.ndarray]:
        """The kernel risk of each query row, float64 [B], with the neighbours it came from."""
        nb = await self.neighbors(name, query)
        risk, _, _ = nb.kernel_stats()
        return nb, risk

    async def changes(
        self, name: str, after: int, generation: str | None, limit: int, wait: float, auto: bool = False
    ) -> Changes:
        """A page of `name`'s changes feed; with `wait`, a long poll for rows after `after`.

        Followers at one position share one page (`Pages`), cut on a worker thread, never
        queued behind searches (but for sigma "auto": when a page would carry it and no value
        is kept for the page's state, the page waits for one index-thread job computing it,
        shared by every page that needs it: once per capacity/10 writes). At most
        `max_long_polls` long polls wait at once; past that they answer at once, as with
        `wait=0`, so long polls never hold what writes, queries and `/healthz` need. A long
        poll that finds rows answers at once, unless they are the newest and a wake-up for
        them is coming (`ChangeSignal`): then it waits for it, so that caught-up followers
        ask again together, from one position."""
        polling = wait > 0 and self.long_polls < self.settings.max_long_polls
        deadline = time.monotonic() + (wait if polling else 0)
        self.long_polls += polling
        try:
            woken = False
            while True:
                self.memory(name)  # an unknown or invalid name is refused before anything is kept
                with self.signal.watch(name) as changed:
                    memory = self.memory(name)  # after the watch: a re-creation since is seen too
                    page = await self._page(memory, after, generation, limit, auto)
                    left = deadline - time.monotonic()
                    if page.reset or left <= 0 or self.signal.closed:
                        return page
                    if len(page.rows) and (woken or not page.complete or not self.signal.pending(name)):
                        return page
                    await self.signal.wait(changed, left)
                    woken = True
        finally:
            self.long_polls -= polling

    async def _page(
        self, memory: Memory, after: int, generation: str | None, limit: int, auto: bool
    ) -> Changes:
        z_dim = memory.settings.z_dim or 1
        rows = max(1, min(limit, self.settings.max_response_floats // z_dim))

        async def compute() -> Changes:
            page = await asyncio.to_thread(memory.changes, after, generation, rows, auto)
            if page.sigma_missing:  # a replica keeps its value until a page brings the next
                await self._refresh_sigma(memory)
                page = await asyncio.to_thread(memory.changes, after, generation, rows, auto)
            return page

        return await self.pages.get(memory, (generation, after, rows, auto), memory.feed_token, compute)

    async def _refresh_sigma(self, memory: Memory) -> None:
        """Have the index thread compute sigma "auto" of `memory`'s current window: one job for
        every page that waits for it (a new value is needed once per capacity/10 writes)."""
        job = self._sigma_jobs.get(memory)
        if job is None:
            job = self._sigma_jobs[memory] = asyncio.wrap_future(
                self.index_thread.call(memory.refresh_sigma_auto)
            )
            job.add_done_callback(lambda _: self._sigma_jobs.pop(memory, None))
        try:
            await asyncio.shield(job)
        except Exception:  # the page says null; the next one asks again
            log.exception("computing sigma 'auto' of memory %r for the changes feed failed", memory.name)

    async def stats(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.memory(name).stats)

    async def export_npz(self, name: str) -> Path:
        """The export file of `name`, written to a temporary file that the caller deletes.

        At most `max_concurrent_exports` are built at once (each holds one copy of the
        buffer while it is written); a few more wait their turn, the rest get 503."""
        memory = self.memory(name)
        if self._exports_waiting >= 4 * self.settings.max_concurrent_exports:
            raise Unavailable("too many exports are being built; retry shortly")
        self._exports_waiting += 1
        try:
            async with self._exports:
                return await asyncio.to_thread(self._write_export, memory)
        finally:
            self._exports_waiting -= 1

    @staticmethod
    def _write_export(memory: Memory) -> Path:
        fd, name = tempfile.mkstemp(prefix="zmem-export-", suffix=".npz")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                write_npz(memory.settings, memory.snapshot(), f)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
