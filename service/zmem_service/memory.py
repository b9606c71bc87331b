"""A memory: one named FIFO ring, its index, settings, idempotency ids and counters.

Writes come in three steps so that the store can commit between them: `plan` checks
a batch against the memory (z_dim, duplicate ids), assigns seqs and computes risk
targets without changing anything; `reserve` secures the room the batch needs (it
may fail, and then nothing was stored); `apply` puts a committed plan into the ring
and the index, and cannot fail for lack of room. Only the writer thread writes;
queries run on the index thread. The memory's lock, which only this module
takes, keeps a search from ever reading rows that a write is changing.

`sigma: "auto"` (`autosigma`), the stats' summaries (`stats`) and the changes feed's
pages (`feed`) are modules of their own; the memory calls them with its lock held and
hands them what they read (ring, index, settings, counters), so no other module takes
the lock or keeps the ring.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from zmem_core import params
from zmem_core.kernel import kernel_stats

from . import feed, stats
from .autosigma import AutoSigma
from .episodes import EpisodeBatch
from .errors import InsufficientStorage, ValidationFailed, ZMemError
from .feed import Changes
from .index import Engine, Index
from .querylog import QueryLog
from .ring import FLOAT_FIELDS, Columns, Ring, row_bytes
from .settings import MemorySettings

MAX_SEQ = 2**53
"""Seqs stay below it: exact as JSON numbers and as SQLite integers."""


class NeighborQuery(Protocol):
    """What `Memory.query_many` reads of a query (`index_thread.SearchJob`)."""

    z: np.ndarray  # float32 [B, d]
    k: int | None
    sigma: float | str | None
    max_floats: int
    record: int
    worker: str | None


@dataclass(frozen=True)
class WritePlan:
    """A checked batch ready to commit: the new rows (possibly fewer than sent), the reply, and
    what the memory will be once this plan and the earlier plans of its commit group are
    applied (`Memory.plan` builds the next plan of the group on this one).

    Nothing changes when a plan is made or dropped: `Memory.reserve` and `Memory.apply` take it.
    """

    memory: Memory
    rows: Columns
    duplicates: int
    new_bytes: int  # what the budget will count on top of the earlier plans of the group
    next_seq: int  # the memory's next seq once applied
    total_written: int  # the memory's total_written once applied
    rows_planned: int  # rows this plan and the earlier plans of its group append
    z_dim: int | None  # the memory's z_dim once applied (None: no rows and no z_dim yet)
    ids_planned: frozenset[str] = frozenset()  # ids this plan and the earlier ones store

    @property
    def reply(self) -> dict[str, Any]:
        n = len(self.rows)
        return {
            "accepted": n,
            "duplicates": self.duplicates,
            "first_seq": int(self.rows.seq[0]) if n else None,
            "last_seq": int(self.rows.seq[-1]) if n else None,
        }


@dataclass
class Neighbors:
    """The answer to a query of B rows: k neighbours each (k = 0 while inactive)."""

    size: int
    active: bool
    sigma: float
    z: np.ndarray  # float32 [B, k, d]
    risk_target: np.ndarray  # float32 [B, k]
    d2: np.ndarray  # float32 [B, k]
    seq: np.ndarray  # int64 [B, k]
    _stats: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def k(self) -> int:
        return int(self.d2.shape[1])

    def kernel_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the seed's kernel risk, Σw and n_eff, float64 [B] (`zmem_core.kernel`).

        Computed once per answer, when asked (`POST …/risk`); a recorded query's are computed
        by the query log, in a batch with others (`QueryLog.pend`)."""
        if self._stats is None:
            self._stats = kernel_stats(self.d2, self.risk_target, self.sigma)
        return self._stats


def new_generation() -> str:
    """A fresh random id for one incarnation of a memory (never a counter that could repeat)."""
    return uuid.uuid4().hex


@dataclass(eq=False)  # identity: memories are held in sets and dicts
class Memory:
    """One named FIFO memory: its settings, ring, index, ids, counters and recorded queries.

    Built only by `Memories` (the one factory). The memory is the only owner of its
    lock and its ring: the writer, the index thread and the pictures ask it.
    """

    name: str
    settings: MemorySettings
    engine: Engine
    generation: str = field(default_factory=new_generation)
    next_seq: int = 1
    total_written: int = 0
    version: int = 0
    ring: Ring | None = None
    index: Index | None = None
    ids: dict[str, int] = field(default_factory=dict)
    workers: collections.Counter[str] = field(default_factory=collections.Counter)
    queries: QueryLog = field(default_factory=lambda: QueryLog(100_000))
    room: Callable[[], int] = lambda: 2**62  # bytes the memory budget has left (`Memories` sets it)
    _id_bytes: int = 0  # ids and distinct worker names: what the budget counts for text
    _auto: AutoSigma = field(default_factory=AutoSigma)  # sigma "auto": kept value, whether asked
    _stats_cache: tuple[int, dict[str, Any]] | None = None  # (version, summaries)
    _sigma_refreshes: int = 0  # values of sigma "auto" computed for the feed
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.settings.z_dim is not None:
            self._build(self.settings.z_dim)

    def _build(self, z_dim: int) -> None:
        self.ring = Ring(z_dim, self.settings.capacity)
        self.index = self.engine.new_index(z_dim)

    @property
    def size(self) -> int:
        return self.ring.size if self.ring else 0

    @property
    def active(self) -> bool:
        return self.size > 0 and self.size >= self.settings.min_size

    @property
    def nbytes(self) -> int:
        """What the budget counts for this memory: ring, index, ids and recorded queries (the
        log at its full bound, see `_log_bytes`)."""
        return self._bytes_after(0, self.settings.z_dim) + self._id_bytes

    def _bytes_after(self, count: int, z_dim: int | None) -> int:
        """Ring, index and recorded-query bytes once `count` more episodes of dimension `z_dim`
        are appended."""
        if z_dim is None:
            return self._log_bytes(0)
        if self.ring is None or self.index is None or self.ring.z_dim != z_dim:
            ring = Ring(z_dim, self.settings.capacity)
            slots = ring.allocation_after(count)
            held = slots * row_bytes(z_dim) + self.engine.new_index(z_dim).bytes_after(slots)
        else:
            slots = self.ring.allocation_after(count)
            held = slots * row_bytes(z_dim) + self.index.bytes_after(slots)
        return held + self._log_bytes(slots)

    def _log_bytes(self, slots: int) -> int:
        """What the budget counts for the recorded queries while the ring has room for `slots`
        rows: their full bound from the moment the memory has room for rows or keeps a recorded
        query, nothing before. Counted up front, the log's growth never takes room that
        episodes need, and what reads record can't decide whether a write fits."""
        return self.queries.bound_bytes if slots or len(self.queries) else 0

    # -- writes (writer thread) ------------------------------------------------------

    def plan(self, batch: EpisodeBatch, now: float, after: WritePlan | None = None) -> WritePlan:
        """Check `batch` against this memory, assign seqs and compute risk targets; changes nothing.

        `after` is the last plan of the same commit group accepted for this memory (not
        applied yet): the new plan follows its seqs, ids and z_dim. Raises the ZMemError
        that refuses the batch.
        """
        assert after is None or after.memory is self
        next_seq = after.next_seq if after else self.next_seq
        z_dim = after.z_dim if after else self.settings.z_dim
        count = after.rows_planned if after else 0
        planned_ids = after.ids_planned if after else frozenset()
        d = batch.z.shape[1]
        if z_dim is not None and d != z_dim:
            raise ValidationFailed.at(
                ["episodes", 0, "z"], f"z has {d} dimensions; memory {self.name!r} has z_dim {z_dim}"
            )
        targets = batch.risk_targets(self.settings.risk)
        if not np.isfinite(targets).all():
            i = int(np.flatnonzero(~np.isfinite(targets))[0])
            raise ValidationFailed.at(
                ["episodes", i, "cone_vol"],
                f"the risk target a·(1−soft_bind) + b·log(cone_vol+eps) + c·lambda_bind is "
                f"{targets[i]} with this memory's weights; it must be a finite float32",
            )
        keep = np.array(
            [i is None or (i not in self.ids and i not in planned_ids) for i in batch.ids], dtype=bool
        )
        n = int(keep.sum())
        if next_seq + n >= MAX_SEQ:
            raise InsufficientStorage(f"memory {self.name!r} has used up its seqs (they stay below 2**53)")
        seq = np.arange(next_seq, next_seq + n, dtype=np.int64)
        ids = np.array(batch.ids, dtype=object)[keep]
        rows = Columns(
            z=np.ascontiguousarray(batch.z[keep], dtype=np.float32),
            risk_target=targets[keep],
            seq=seq,
            ts=np.full(n, now, np.float64),
            id=ids,
            worker=np.array([None if w is None else sys.intern(w) for w in batch.workers], object)[keep],
            **{f: batch.values[f][keep].astype(np.float32) for f in FLOAT_FIELDS},
        )
        grown = self._bytes_after(count + n, d) - self._bytes_after(count, d)
        names = {w for w in rows.worker if w is not None and w not in self.workers}
        return WritePlan(
            self,
            rows,
            duplicates=len(batch) - n,
            new_bytes=grown + id_bytes([*ids, *names]),
            next_seq=next_seq + n,
            total_written=(after.total_written if after else self.total_written) + n,
            rows_planned=count + n,
            z_dim=d,
            ids_planned=planned_ids.union(i for i in ids if i is not None),
        )

    def plan_rows(
        self, rows: Columns, next_seq: int | None = None, total_written: int | None = None
    ) -> WritePlan:
        """A plan that appends rows already carrying their seqs (a restore, an import, the
        warm-up); changes nothing. The counters it leaves default to those rows following
        what the memory holds: seqs never go back (a file's seqs are kept, and later writes
        never reuse a seq of an earlier incarnation)."""
        n = len(rows)
        if next_seq is None:
            next_seq = max(int(rows.seq[-1]) + 1 if n else 1, self.next_seq)
        if total_written is None:
            total_written = self.total_written + n
        z_dim = rows.z.shape[1] if n else self.settings.z_dim
        return WritePlan(self, rows, 0, 0, next_seq, total_written, n, z_dim)

    def reserve(self, plan: WritePlan) -> None:
        """Secure everything `plan` and the earlier plans of its group need (ring and index room).

        Runs before the commit: it may raise (MemoryError, InsufficientStorage), and then
        the write fails with nothing stored. After it, `apply` cannot fail for lack of room.
        """
        assert plan.memory is self
        count, z_dim = plan.rows_planned, plan.z_dim
        if z_dim is None:  # no rows, and no z_dim to build a ring for
            return
        with self._lock:
            if self.ring is None or (self.ring.z_dim != z_dim and self.ring.size == 0):
                self._build(z_dim)
            assert self.ring is not None and self.index is not None
            self.index.reserve(self.ring.allocation_after(count))
            self.ring.reserve(count)

    def apply(self, plan: WritePlan) -> None:
        """Append a committed plan's rows to the ring and the index, and move the counters to
        the plan's. Plans of one group are applied in the order they were made.

        `reserve` has made room for them."""
        assert plan.memory is self
        rows = plan.rows
        n = len(rows)
        with self._lock:
            self.next_seq, self.total_written = plan.next_seq, plan.total_written
            if n == 0:
                return
            if self.ring is None or self.ring.z_dim != rows.z.shape[1]:
                self._build(rows.z.shape[1])
            assert self.ring is not None and self.index is not None
            if self.settings.z_dim is None:
                self.settings = self.settings.model_copy(update={"z_dim": rows.z.shape[1]})
            gone = self.ring.evicted_by(n)
            for id_, seq in zip(gone.id, gone.seq, strict=True):
                if id_ is not None and self.ids.get(id_) == seq:
                    del self.ids[id_]
                    self._id_bytes -= id_bytes([id_])
            for w in gone.worker:
                self.workers[w or ""] -= 1
                if w and not self.workers[w]:
                    self._id_bytes -= id_bytes([w])
            if n > self.settings.capacity:
                rows = rows.take(slice(n - self.settings.capacity, None))
            self.index.reserve(self.ring.allocation_after(len(rows)))  # a no-op after `reserve`
            slots = self.ring.append(rows)
            self.index.write(slots, rows.z, rows.seq)
            new_ids = [(i, int(s)) for i, s in zip(rows.id, rows.seq, strict=True) if i is not None]
            self.ids.update(new_ids)
            self._id_bytes += id_bytes([i for i, _ in new_ids])
            self._id_bytes += id_bytes({w for w in rows.worker if w and not self.workers[w]})
            self.workers.update(w or "" for w in rows.worker)
            self.workers = +self.workers  # drop zero counts
            self.version += 1

    def oldest_seq(self) -> int | None:
        """The seq of the oldest episode held (None when empty)."""
        with self._lock:
            if self.ring is None or self.ring.size == 0:
                return None
            return int(self.ring.column("seq")[self.ring.order()[0]])

    def bytes_for(self, rows: Columns) -> int:
        """What this (empty) memory will hold once `rows` are appended."""
        names = {w for w in rows.worker if w is not None}
        return self._bytes_after(len(rows), self.settings.z_dim) + id_bytes([*rows.id, *names])

    def clear(self) -> None:
        """Drop everything held, device memory included: the memory was deleted or replaced.

        A query still holding this object answers as for an empty memory."""
        with self._lock:
            if self.index is not None:
                self.index.clear()
            self.ring = self.index = None
            self.ids.clear()
            self.queries = QueryLog(0)
            self._id_bytes = 0

    # -- reads (index thread) -------------------------------------------------------------

    def query_many(self, queries: Sequence[NeighborQuery]) -> list[Neighbors | ZMemError]:
        """Answer several queries with one index search over their stacked rows (index thread).

        Each query gets its own k nearest (of the rows searched at the largest k, its
        first k columns: exact, as ties break by seq), or the ZMemError that refuses it:
        a z that isn't the memory's z_dim, or an answer of more than its `max_floats`
        floats, both checked under the lock against the memory as the search sees it.
        A query with `record` > 0 adds its rows' kernel stats to the recorded queries.
        """
        with self._lock:
            return self._query_many(queries)

    def query_now(self, queries: Sequence[NeighborQuery]) -> list[Neighbors | ZMemError] | None:
        """`query_many` on the calling thread if that is cheap right now, else None: the lock is
        free and no query's `sigma: "auto"` needs recomputing (which searches a sample)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            auto = any(params.is_auto(q.sigma, self.settings.sigma) for q in queries)
            if auto and not self._auto_fresh():
                return None
            return self._query_many(queries)
        finally:
            self._lock.release()

    def _query_many(self, queries: Sequence[NeighborQuery]) -> list[Neighbors | ZMemError]:
        """`query_many` with the lock held."""
        answers: list[Neighbors | ZMemError | None] = []  # None: answered below
        wanted: list[tuple[int, int, float]] = []  # (answer index, k asked for, sigma)
        for q in queries:
            try:
                want, sigma = self._prepare(q.z, q.k, q.sigma, q.max_floats)
            except ZMemError as e:
                answers.append(e)
                continue
            wanted.append((len(answers), want, sigma))
            answers.append(None)
        if not wanted or not self.active or self.ring is None or self.index is None:
            for i, _, sigma in wanted:
                answers[i] = self._empty(queries[i].z, sigma)
            return cast("list[Neighbors | ZMemError]", answers)
        size = self.size
        stacked = [queries[i].z for i, _, _ in wanted]
        zq = stacked[0] if len(stacked) == 1 else np.concatenate(stacked)
        d2, slots = self.index.search(zq, min(max(w for _, w, _ in wanted), size), size)
        self._check_log_room(sum(len(queries[i].z) for i, _, _ in wanted if queries[i].record))
        answered = [params.answered_k(want, size, True) for _, want, _ in wanted]
        # One k for all (the common batch): gathered at once, each answer a slice of it. Mixed k:
        # each query's own columns, so a small answer holds no copy of a large one's rows.
        whole = self._gather(slots) if min(answered) == slots.shape[1] else None
        start = 0
        for (i, _, sigma), z, kk in zip(wanted, stacked, answered, strict=True):
            stop = start + len(z)
            rows = slice(start, stop)
            if whole is not None:
                z_nb, risk_target, seq = (column[rows] for column in whole)
            else:
                z_nb, risk_target, seq = self._gather(slots[rows, :kk])
            nb = Neighbors(size, True, sigma, z_nb, risk_target, d2[rows, :kk], seq)
            start = stop
            answers[i] = nb
            if queries[i].record:
                self.queries.pend(nb.d2, nb.risk_target, nb.sigma, time.time(), queries[i].worker)
        return cast("list[Neighbors | ZMemError]", answers)

    def _empty(self, zq: np.ndarray, sigma: float) -> Neighbors:
        b, d = zq.shape
        return Neighbors(
            self.size,
            False,
            sigma,
            np.zeros((b, 0, d), np.float32),
            np.zeros((b, 0), np.float32),
            np.zeros((b, 0), np.float32),
            np.zeros((b, 0), np.int64),
        )

    def _keep_queries(
        self, risk: np.ndarray, wsum: np.ndarray, n_eff: np.ndarray, worker: str | None = None
    ) -> None:
        """Append rows computed elsewhere to the query log (lock held)."""
        self._check_log_room(len(risk))
        self.queries.extend(risk, wsum, n_eff, time.time(), worker)

    def _check_log_room(self, rows: int) -> None:
        """The query log keeps its last `capacity` rows. A memory with rows has its log's bound
        counted already (`_log_bytes`); one without takes it with its first recorded query, and
        raises InsufficientStorage (nothing kept) when the memory budget has no room for it."""
        slots = self.ring.allocated if self.ring is not None else 0
        need = self.queries.bound_bytes
        if rows and need and not self._log_bytes(slots) and self.room() < need:
            raise InsufficientStorage(
                f"memory {self.name!r} holds no episodes yet and the memory budget (--max-memory-bytes) "
                f"has no room for its recorded queries ({need} bytes)"
            )

    def _prepare(
        self, zq: np.ndarray, k: int | None, sigma: float | str | None, max_floats: int
    ) -> tuple[int, float]:
        """Check a query against the memory (lock held) → (k asked for, numeric sigma)."""
        b, d = zq.shape
        z_dim = self.settings.z_dim
        if z_dim is not None and d != z_dim:
            raise ValidationFailed.at(["z"], f"z has {d} dimensions; memory {self.name!r} has z_dim {z_dim}")
        want = params.asked_k(k, self.settings.k)
        floats = b * min(want, self.size) * d
        if floats > max_floats:
            raise ValidationFailed.at(
                ["k"],
                f"the answer would hold {floats} floats (rows × k × z_dim); the limit is "
                f"{max_floats}: ask for fewer rows or a smaller k",
            )
        return want, self._sigma(params.asked_sigma(sigma, self.settings.sigma))

    def _gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The z [B, k, d], risk target and seq [B, k] of the rows at slots [B, k] (lock held)."""
        assert self.ring is not None
        b, kk = slots.shape
        flat = slots.reshape(-1)
        return (
            self.ring.column("z")[flat].reshape(b, kk, self.ring.z_dim),
            self.ring.column("risk_target")[flat].reshape(b, kk),
            self.ring.column("seq")[flat].reshape(b, kk),
        )

    def _sigma(self, sigma: float | str) -> float:
        """A numeric sigma; "auto" from the rows of the current window (lock held)."""
        if sigma != params.AUTO:
            return float(sigma)
        return self._auto.value(self.ring, self.index, self.active, self.next_seq, self.settings)

    def _auto_fresh(self) -> bool:
        """Whether "auto" resolves without a search right now (lock held)."""
        return self._auto.fresh(self.ring, self.active, self.next_seq, self.settings)

    @property
    def feed_token(self) -> tuple[int, int, bool]:
        """What a page of the feed depends on besides its position: it changes with every
        write and every new value of sigma "auto" (a lock-free read: a page kept for an older
        token is cut again, one kept for this one is as of a state no older)."""
        return self.version, self._sigma_refreshes, self._auto.asked

    def changes(self, after: int, generation: str | None, limit: int, auto: bool = False) -> Changes:
        """The rows with seq > `after` still held, oldest first, at most `limit`; `feed.page`
        says when it is a reset. Any thread: it never searches.

        A page that reaches the newest row carries the value of `sigma: "auto"` when the
        memory's sigma is "auto" or anyone (this follower included, with `auto`) has asked for
        "auto", and only the value kept for the page's state (`AutoSigma.kept`): when none is,
        the page says null and `sigma_missing`, and its caller has the index thread compute
        it (`refresh_sigma_auto`) before cutting the page again, once for every follower."""
        with self._lock:
            changes = feed.page(
                self.ring, self.generation, self.next_seq, self.settings, after, generation, limit
            )
            if auto:
                self._auto.asked = True
            wanted = self._auto.asked or self.settings.sigma == "auto"
            if changes.complete and wanted and self.active:
                changes.sigma_auto = self._auto.kept(self.ring, self.active, self.next_seq, self.settings)
                changes.sigma_missing = changes.sigma_auto is None
            return changes

    def refresh_sigma_auto(self) -> None:
        """Compute the value of `sigma: "auto"` for the current window unless it is kept (index
        thread: it searches), so that the feed's next page carries it."""
        with self._lock:
            if self.active and not self._auto_fresh():
                self._sigma(params.AUTO)
            self._sigma_refreshes += 1  # a query may have computed it meanwhile: pages cut again

    def record_queries(
        self, risk: np.ndarray, wsum: np.ndarray, n_eff: np.ndarray, worker: str | None = None
    ) -> None:
        """Keep recorded queries' kernel risk, weight sum Σw and 1/Σw_norm² (each [n]), e.g.
        those a client computed from its replica, with the worker that asked them."""
        with self._lock:
            self._keep_queries(risk, wsum, n_eff, worker)

    def recorded_queries(self) -> dict[str, np.ndarray]:
        """A copy of the recorded queries, oldest first (``QueryLog.snapshot``)."""
        with self._lock:
            return self.queries.snapshot()

    def snapshot(self) -> Columns:
        """A copy of the buffer in arrival order."""
        with self._lock:
            if self.ring is None:
                return Columns.empty(self.settings.z_dim or 0)
            return self.ring.ordered()

    def stats(self) -> dict[str, Any]:
        """Counters, settings and per-field summaries, cheaply: the summaries are computed over
        at most `stats.STATS_SAMPLE` episodes spread evenly over arrival order (all of them
        when the memory holds fewer), and reused while the memory is unchanged."""
        with self._lock:
            out: dict[str, Any] = {
                "name": self.name,
                "size": self.size,
                "capacity": self.settings.capacity,
                "z_dim": self.settings.z_dim,
                "active": self.active,
                "settings": self.settings.model_dump(),
                "total_written": self.total_written,
                "next_seq": self.next_seq,
                "generation": self.generation,
                "recorded_queries": len(self.queries),
                "bytes": self.nbytes,
                "workers": dict(sorted(self.workers.items())),
            }
            cached = self._stats_cache
            if cached is not None and cached[0] == self.version:
                return {**out, **cached[1]}
            version = self.version
            picked = stats.sample(self.ring)
        summaries = stats.summaries(picked)  # outside the lock: the sample is a copy
        with self._lock:
            if self.version == version:
                self._stats_cache = (version, summaries)
        return {**out, **summaries}


ID_ENTRY_BYTES = 96
"""What one id (or worker name) costs beyond `sys.getsizeof` of its string: allocator slack
and its dict entry with the seq it maps to (measured: 200 B per 128-character string, 70 B
per dict entry)."""


def id_bytes(ids: Iterable[str | None]) -> int:
    return sum(sys.getsizeof(i) + ID_ENTRY_BYTES for i in ids if i is not None)
