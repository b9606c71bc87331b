"""The service: memories, the writer and the searcher behind one async facade.

Routers decode a request, call one method here and encode the answer. Every
blocking step runs off the event loop: writes on the writer thread, searches on
the searcher thread, file building on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from .episodes import EpisodeBatch, validate
from .errors import Unavailable, ValidationFailed
from .index import make_engine
from .memory import Memory, Neighbors
from .metrics import Metrics
from .npz import read_npz, write_npz
from .registry import Memories, check_name
from .ring import Columns
from .searcher import Query, Searcher
from .settings import MemorySettings, MemorySettingsIn, ServiceSettings
from .store import open_store
from .wire import Query as WireQuery
from .writer import Writer

log = logging.getLogger("zmem")


class ZMem:
    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine = make_engine(settings.device, settings.knn_threads)
        self.memories = Memories(settings, self.engine)
        self.searcher = Searcher()
        self._writer: Writer | None = None
        self.ready = False

    # -- lifecycle --------------------------------------------------------------------

    def load(self) -> None:
        """Open the store, rebuild every memory from it and warm the index up (blocking).

        Raises StoreUnreadable when the store can't be read at all; a memory whose rows
        are corrupt is skipped (listed in `memories.skipped`, /readyz and the log)."""
        store = open_store(self.settings.data_dir, self.settings.durability)
        stored, self.memories.skipped = store.load()
        self.memories.restore(stored)
        self._warm_up()
        self._writer = Writer(self.memories, store)
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
        """One search through a throwaway memory on the searcher thread, so that loading
        FAISS (or CUDA) happens before /readyz says 200."""
        settings = self.settings.memory_defaults(1).model_copy(update={"min_size": 1})
        memory = self.memories.new("warm-up", settings)
        row = Columns.empty(1, 1)
        row.seq[:] = 1
        memory.reserve(1, 1)
        memory.apply(row)
        query = Query(memory, np.zeros((1, 1), np.float32), 1, None, 1)
        answer = self.searcher.call(lambda: memory.query_many([query])).result()[0]
        memory.clear()
        if isinstance(answer, Exception):
            raise answer

    def close(self) -> None:
        """Finish queued writes and close the store; later writes get 503."""
        self.ready = False
        if self._writer is not None:
            self._writer.close()
        self.searcher.shutdown()

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

    async def import_npz(self, name: str, body: bytes) -> dict[str, Any]:
        check_name(name)
        settings, rows = await asyncio.to_thread(read_npz, body)
        return await self.writer.import_rows(name, settings, rows)

    # -- reads ------------------------------------------------------------------------

    async def neighbors(self, name: str, query: WireQuery) -> Neighbors:
        """The k nearest stored episodes of each query row (recorded when asked)."""
        memory = self.memory(name)
        b = query.z.shape[0]
        if b > self.settings.max_batch:
            raise ValidationFailed.at(["z"], f"{b} query rows; the limit is {self.settings.max_batch}")
        o = query.options
        keep = self.settings.recorded_queries if o.record else 0
        return await self.searcher.search(
            Query(memory, query.z, o.k, o.sigma, self.settings.max_response_floats, keep)
        )

    async def risk(self, name: str, query: WireQuery) -> tuple[Neighbors, np.ndarray]:
        """The kernel risk of each query row, float64 [B], with the neighbours it came from."""
        nb = await self.neighbors(name, query)
        risk, _, _ = nb.kernel_stats()
        return nb, risk

    async def stats(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.memory(name).stats)

    async def export_npz(self, name: str) -> bytes:
        memory = self.memory(name)
        return await asyncio.to_thread(lambda: write_npz(memory.settings, memory.snapshot()))
