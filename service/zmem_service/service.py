"""The service: memories, the writer and the kNN thread behind one async facade.

Routers decode a request, call one method here and encode the answer. Every
blocking step runs off the event loop: writes on the writer thread, searches on
the kNN thread, file building on a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import numpy as np

from .episodes import MAX_ID_CHARS, MAX_WORKER_CHARS, EpisodeBatch, string_problem, validate
from .errors import Conflict, Unavailable, ValidationFailed
from .knn import KnnExecutor, make_backend
from .memory import Memory, Neighbors
from .registry import Memories, check_name, conflict
from .ring import FLOAT_FIELDS, Columns, row_bytes
from .settings import MemorySettings, MemorySettingsIn, ServiceSettings
from .store import open_store
from .wire import Query
from .writer import Writer

log = logging.getLogger("zmem")
MAX_SEQ = 2**53  # seqs stay exact as JSON numbers and as SQLite integers
EXPORT_FIELDS = (
    "z",
    "soft_bind",
    "cone_vol",
    "E_T",
    "lambda_bind",
    "lambda_T",
    "Hr",
    "risk_target",
    "seq",
    "ts",
    "id",
    "worker",
)


class ZMem:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.memories = Memories(settings)
        self.knn = make_backend(settings.device, settings.knn_threads)
        self._knn_thread = KnnExecutor()
        self._writer: Writer | None = None
        self.ready = False

    # -- lifecycle --------------------------------------------------------------------

    def load(self) -> None:
        """Open the store, rebuild every ring from it and warm the kNN backend (blocking)."""
        store = open_store(self.settings.data_dir, self.settings.durability)
        self.memories.restore(store.load())
        one = np.zeros((1, 1), np.float32)
        self._knn_thread.submit(self.knn.search, one, one, 1).result()
        self._writer = Writer(self.memories, store)
        self.ready = True
        log.info(
            "ready: %d memories, %d episodes, kNN backend %s",
            len(self.memories.all()),
            sum(m.size for m in self.memories.all()),
            self.knn.name,
        )

    def close(self) -> None:
        """Finish queued writes and close the store; later writes get 503."""
        self.ready = False
        if self._writer is not None:
            self._writer.close()
        self._knn_thread.shutdown()

    @property
    def writer(self) -> Writer:
        if not self.ready or self._writer is None:
            raise Unavailable("the service is loading its memories; retry shortly")
        return self._writer

    def memory(self, name: str) -> Memory:
        if not self.ready:
            raise Unavailable("the service is loading its memories; retry shortly")
        return self.memories.get(name)

    # -- writes -----------------------------------------------------------------------

    async def write(self, name: str, batch: EpisodeBatch) -> dict[str, Any]:
        check_name(name)
        validate(batch, max_batch=self.settings.max_batch)
        writer = self.writer
        if len(batch) == 0:
            size = self.memories.get(name).size if name in self.memories else 0
            return {"accepted": 0, "duplicates": 0, "size": size, "first_seq": None, "last_seq": None}
        return await writer.write(name, batch)

    async def put(self, name: str, body: MemorySettingsIn) -> tuple[MemorySettings, bool]:
        check_name(name)

        def put() -> tuple[MemorySettings, bool]:
            settings, changed = self.memories.resolve_put(name, body)
            if changed:
                self.writer.store.save_memory(name, settings, 1, 0)
                self.writer.store.commit()  # the registry follows the store, never leads it
                self.memories.add(Memory(name, settings))
            return settings, changed

        return await self.writer.call(put)

    async def delete(self, name: str) -> None:
        self.memory(name)

        def delete() -> None:
            self.writer.store.delete_memory(name)
            self.writer.store.commit()
            self.memories.remove(name)

        await self.writer.call(delete)

    async def import_npz(self, name: str, body: bytes) -> dict[str, Any]:
        check_name(name)
        settings, rows = await asyncio.to_thread(read_npz, body)
        writer = self.writer

        def load() -> dict[str, Any]:
            current = self.memories.find(name)
            if current is not None and current.size:
                raise Conflict(f"memory {name!r} holds {current.size} episodes; import needs an empty memory")
            if current is not None and current.settings.z_dim is not None:
                diffs = current.settings.differences(settings)
                if diffs:
                    raise conflict(name, diffs)
            kept = rows.take(slice(max(0, len(rows) - settings.capacity), None))
            memory = Memory(name, settings)
            assert memory.ring is not None
            self.memories.check_budget(
                memory.ring.allocation_after(len(kept)) * row_bytes(memory.ring.z_dim)
                - (current.ring_bytes if current else 0)
            )
            writer.store.save_memory(name, settings, int(rows.seq[-1]) + 1 if len(rows) else 1, len(kept))
            writer.store.insert(name, kept)
            writer.store.commit()
            memory.apply(kept)
            memory.total_written = len(kept)
            self.memories.add(memory)
            return {"imported": len(kept), "size": memory.size}

        return await writer.call(load)

    # -- reads ------------------------------------------------------------------------

    async def search(self, name: str, query: Query) -> Neighbors:
        memory = self.memory(name)
        b = query.z.shape[0]
        if b > self.settings.max_batch:
            raise ValidationFailed.at(["z"], f"{b} query rows; the limit is {self.settings.max_batch}")
        keep = self.settings.recorded_queries if query.options.record else 0
        max_floats = self.settings.max_response_floats

        def search() -> Neighbors:
            nb = memory.search(self.knn, query.z, query.options.k, query.options.sigma, max_floats)
            if keep and nb.active:
                memory.record_risk(nb.kernel_risk(), keep)
            return nb

        # Everything that takes the memory's lock runs off the event loop: a long search
        # holds it, and the loop must keep serving other requests meanwhile.
        return await asyncio.wrap_future(self._knn_thread.submit(search))

    async def stats(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.memory(name).stats)

    async def export_npz(self, name: str) -> bytes:
        memory = self.memory(name)
        return await asyncio.to_thread(lambda: write_npz(memory.settings, memory.snapshot()))


def write_npz(settings: MemorySettings, rows: Columns) -> bytes:
    arrays: dict[str, np.ndarray] = {f: getattr(rows, f) for f in EXPORT_FIELDS}
    for key in ("id", "worker"):
        arrays[key] = np.array(["" if v is None else v for v in arrays[key]], dtype=np.str_)
    arrays["settings"] = np.array(settings.model_dump_json())
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: kwargs as bools
    return buf.getvalue()


def read_npz(body: bytes) -> tuple[MemorySettings, Columns]:
    """Settings and rows of an export file; a 422 names what is wrong with it."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as f:
            data = {key: f[key] for key in f.files}
    except Exception as e:
        raise ValidationFailed.at(["body"], f"not a zmem export (.npz): {e}") from None
    missing = [k for k in (*EXPORT_FIELDS, "settings") if k not in data]
    if missing:
        raise ValidationFailed.at([missing[0]], f"missing from the file (also: {missing[1:]})")
    try:
        settings = MemorySettings.model_validate(json.loads(str(data["settings"])))
    except ValueError as e:
        raise ValidationFailed.at(["settings"], f"invalid settings: {e}") from None
    n = len(data["seq"])
    z = data["z"]
    if z.ndim != 2 or z.shape != (n, settings.z_dim or z.shape[1]):
        raise ValidationFailed.at(
            ["z"], f"shape {list(z.shape)} does not match {n} rows of z_dim {settings.z_dim}"
        )
    if settings.z_dim is None:
        try:  # validated like any memory's settings: a bad file must not poison the store
            settings = MemorySettings.model_validate({**settings.model_dump(), "z_dim": int(z.shape[1])})
        except ValueError as e:
            raise ValidationFailed.at(["z"], f"z_dim {z.shape[1]} is not valid: {e}") from None
    for key in (*FLOAT_FIELDS, "risk_target", "ts", "id", "worker"):
        if data[key].shape != (n,):
            raise ValidationFailed.at([key], f"shape {list(data[key].shape)}; expected [{n}]")
    if data["seq"].dtype.kind not in "iu":
        raise ValidationFailed.at(["seq"], f"seqs must be integers, not {data['seq'].dtype}")
    seq = data["seq"].astype(np.int64)
    if n and (np.diff(seq) <= 0).any():
        raise ValidationFailed.at(["seq"], "seqs must increase strictly")
    if n and (seq[0] < 1 or seq[-1] >= MAX_SEQ):
        raise ValidationFailed.at(["seq"], f"seqs must lie in [1, 2**53), got {seq[0]}..{seq[-1]}")
    ids = [str(v) or None for v in data["id"]]
    workers = [str(v) or None for v in data["worker"]]
    for key, values, limit in (("id", ids, MAX_ID_CHARS), ("worker", workers, MAX_WORKER_CHARS)):
        for i, text in enumerate(values):
            problem = string_problem(text, limit, allow_empty=True)
            if problem:
                raise ValidationFailed.at([key, i], problem)
    numeric = [z, *(data[k] for k in (*FLOAT_FIELDS, "risk_target", "ts"))]
    if not all(np.isfinite(a.astype(np.float64)).all() for a in numeric):
        raise ValidationFailed.at(["body"], "the file holds NaN or inf")
    return settings, Columns(
        z=np.ascontiguousarray(z, np.float32),
        seq=seq,
        ts=data["ts"].astype(np.float64),
        id=np.array(ids, object),
        worker=np.array(workers, object),
        **{k: data[k].astype(np.float32) for k in (*FLOAT_FIELDS, "risk_target")},
    )
