"""A memory: one named FIFO ring with its settings, idempotency ids and counters.

Writes come in two steps so that the store can commit between them: `plan` checks
a batch against the memory (z_dim, duplicate ids), assigns seqs and computes risk
targets without changing anything; `apply` puts a committed plan into the ring.
Only the writer thread calls `plan`/`apply`; searches run on the kNN thread. The
lock keeps a search from ever reading rows that a write is changing.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .episodes import EpisodeBatch
from .errors import ValidationFailed
from .knn import KnnBackend
from .querylog import QueryLog
from .ring import FLOAT_FIELDS, Columns, Ring, row_bytes
from .settings import MemorySettings

AUTO_SIGMA_SAMPLE = 1000


@dataclass
class Pending:
    """What earlier plans of the same commit group will have done to one memory."""

    next_seq: int
    z_dim: int | None
    count: int = 0
    ids: set[str] = field(default_factory=set)


@dataclass
class WritePlan:
    """A checked batch ready to commit: the new rows (possibly fewer than sent) and the reply."""

    memory: Memory
    rows: Columns
    duplicates: int
    new_bytes: int = 0

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

    @property
    def k(self) -> int:
        return int(self.d2.shape[1])

    def kernel_risk(self) -> np.ndarray:
        """The seed's kernel risk per row, float64 [B] (0 where there are no neighbours)."""
        w = np.exp(-self.d2.astype(np.float64) / (2.0 * self.sigma**2))
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-8)
        return (w * self.risk_target).sum(axis=-1)


@dataclass(eq=False)  # identity: memories are held in sets and dicts
class Memory:
    name: str
    settings: MemorySettings
    next_seq: int = 1
    total_written: int = 0
    ring: Ring | None = None
    ids: dict[str, int] = field(default_factory=dict)
    workers: collections.Counter[str] = field(default_factory=collections.Counter)
    query_risk: collections.deque[float] = field(default_factory=collections.deque)
    queries: QueryLog = field(default_factory=lambda: QueryLog(100_000))
    version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _auto_sigma: tuple[int, float] | None = None  # (total_written // (capacity/10), sigma)

    def __post_init__(self) -> None:
        if self.settings.z_dim is not None and self.ring is None:
            self.ring = Ring(self.settings.z_dim, self.settings.capacity)

    @property
    def size(self) -> int:
        return self.ring.size if self.ring else 0

    @property
    def active(self) -> bool:
        return self.size > 0 and self.size >= self.settings.min_size

    @property
    def ring_bytes(self) -> int:
        return self.ring.allocated * row_bytes(self.ring.z_dim) if self.ring else 0

    # -- writes (writer thread) ------------------------------------------------------

    def pending(self) -> Pending:
        return Pending(self.next_seq, self.settings.z_dim)

    def plan(self, batch: EpisodeBatch, now: float, pending: Pending) -> WritePlan:
        """Check `batch` against this memory and assign seqs; changes only `pending`.

        `pending` carries the seqs, ids and z_dim of plans made earlier in the same
        commit group (they are not applied yet).
        """
        d = batch.z.shape[1]
        if pending.z_dim is not None and d != pending.z_dim:
            raise ValidationFailed.at(
                ["episodes", 0, "z"], f"z has {d} dimensions; memory {self.name!r} has z_dim {pending.z_dim}"
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
            [i is None or (i not in self.ids and i not in pending.ids) for i in batch.ids], dtype=bool
        )
        n = int(keep.sum())
        seq = np.arange(pending.next_seq, pending.next_seq + n, dtype=np.int64)
        ids = np.array(batch.ids, dtype=object)[keep]
        rows = Columns(
            z=np.ascontiguousarray(batch.z[keep], dtype=np.float32),
            risk_target=targets[keep],
            seq=seq,
            ts=np.full(n, now, np.float64),
            id=ids,
            worker=np.array(batch.workers, dtype=object)[keep],
            **{f: batch.values[f][keep].astype(np.float32) for f in FLOAT_FIELDS},
        )
        ring = self.ring or Ring(d, self.settings.capacity)
        grown = ring.allocation_after(pending.count + n) - ring.allocation_after(pending.count)
        pending.ids.update(i for i in ids if i is not None)
        pending.next_seq += n
        pending.count += n
        pending.z_dim = d
        return WritePlan(self, rows, duplicates=len(batch) - n, new_bytes=grown * row_bytes(d))

    def apply(self, rows: Columns) -> None:
        """Append committed rows (already carrying their seqs) to the ring."""
        n = len(rows)
        if n == 0:
            return
        with self.lock:
            if self.ring is None:
                self.settings = self.settings.model_copy(update={"z_dim": rows.z.shape[1]})
                self.ring = Ring(rows.z.shape[1], self.settings.capacity)
            gone = self.ring.evicted_by(n)
            for id_, seq in zip(gone.id, gone.seq, strict=True):
                if id_ is not None and self.ids.get(id_) == seq:
                    del self.ids[id_]
            for w in gone.worker:
                self.workers[w or ""] -= 1
            if n > self.settings.capacity:
                rows = rows.take(slice(n - self.settings.capacity, None))
            self.ring.append(rows)
            self.ids.update((i, int(s)) for i, s in zip(rows.id, rows.seq, strict=True) if i is not None)
            self.workers.update(w or "" for w in rows.worker)
            self.workers = +self.workers  # drop zero counts
            self.next_seq = int(rows.seq[-1]) + 1
            self.total_written += n
            self.version += 1

    # -- reads (kNN thread) -------------------------------------------------------------

    def search(
        self, knn: KnnBackend, zq: np.ndarray, k: int | None, sigma: float | str | None, max_floats: int
    ) -> Neighbors:
        """The k nearest stored episodes to each row of zq (float32 [B, d]).

        Raises ValidationFailed when d isn't the memory's z_dim or the answer would
        hold more than `max_floats` floats; both are checked under the lock, against
        the memory as the search sees it.
        """
        b, d = zq.shape
        with self.lock:
            z_dim = self.settings.z_dim
            if z_dim is not None and d != z_dim:
                raise ValidationFailed.at(
                    ["z"], f"z has {d} dimensions; memory {self.name!r} has z_dim {z_dim}"
                )
            want = self.settings.k if k is None else k
            size = self.size
            floats = b * min(want, size) * d
            if floats > max_floats:
                raise ValidationFailed.at(
                    ["k"],
                    f"the answer would hold {floats} floats (rows × k × z_dim); the limit is "
                    f"{max_floats}: ask for fewer rows or a smaller k",
                )
            resolved = self._sigma(knn, self.settings.sigma if sigma is None else sigma)
            if not self.active or self.ring is None:
                return Neighbors(
                    size,
                    False,
                    resolved,
                    np.zeros((b, 0, d), np.float32),
                    np.zeros((b, 0), np.float32),
                    np.zeros((b, 0), np.float32),
                    np.zeros((b, 0), np.int64),
                )
            kk = min(want, size)
            d2, slots = knn.search(self.ring.z, zq, kk)
            rows = self.ring.rows(slots.reshape(-1))
        return Neighbors(
            size,
            True,
            resolved,
            rows.z.reshape(b, kk, d),
            rows.risk_target.reshape(b, kk),
            d2,
            rows.seq.reshape(b, kk),
        )

    def _sigma(self, knn: KnnBackend, sigma: float | str) -> float:
        """A numeric sigma; "auto" is recomputed once per capacity/10 writes (lock held).

        While the memory is inactive "auto" is 1.0 and nothing is kept, so a value
        computed on a nearly empty memory never outlives its emptiness.
        """
        if sigma != "auto":
            return float(sigma)
        if not self.active or self.ring is None or self.size < 2:
            return 1.0
        bucket = self.total_written // max(1, self.settings.capacity // 10)
        if self._auto_sigma and self._auto_sigma[0] == bucket:
            return self._auto_sigma[1]
        rng = np.random.default_rng(0)
        n = min(self.size, AUTO_SIGMA_SAMPLE)
        sample = self.ring.z[np.sort(rng.choice(self.size, n, replace=False))]
        kk = min(self.settings.k, self.size - 1)
        d2, _ = knn.search(self.ring.z, sample, kk + 1)  # the first hit is the row itself
        mean = float(d2[:, kk].astype(np.float64).mean())
        value = float(np.sqrt(mean)) if mean > 0 else 1.0
        self._auto_sigma = (bucket, value)
        return value

    def record_risk(self, risk: np.ndarray, keep: int) -> None:
        with self.lock:
            if self.query_risk.maxlen != keep:
                self.query_risk = collections.deque(self.query_risk, maxlen=keep)
            self.query_risk.extend(float(r) for r in risk)

    def record_queries(self, risk: np.ndarray, wsum: np.ndarray, n_eff: np.ndarray) -> None:
        """Keep recorded queries' kernel risk, weight sum Σw and 1/Σw_norm² (each [n])."""
        with self.lock:
            self.queries.extend(risk, wsum, n_eff, time.time())

    def recorded_queries(self) -> dict[str, np.ndarray]:
        """A copy of the recorded queries, oldest first (``QueryLog.snapshot``)."""
        with self.lock:
            return self.queries.snapshot()

    def snapshot(self) -> Columns:
        """A copy of the buffer in arrival order."""
        with self.lock:
            if self.ring is None:
                return Columns.empty(self.settings.z_dim or 0)
            return self.ring.ordered()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            cols = self.ring.ordered() if self.ring else None
            out: dict[str, Any] = {
                "name": self.name,
                "size": self.size,
                "capacity": self.settings.capacity,
                "z_dim": self.settings.z_dim,
                "active": self.active,
                "settings": self.settings.model_dump(),
                "total_written": self.total_written,
                "next_seq": self.next_seq,
                "recorded_queries": len(self.query_risk),
                "workers": dict(sorted(self.workers.items())),
            }
        out["seq_range"] = [int(cols.seq[0]), int(cols.seq[-1])] if cols is not None and len(cols) else None
        out["ts_range"] = [float(cols.ts[0]), float(cols.ts[-1])] if cols is not None and len(cols) else None
        out["fields"] = {
            f: summary(getattr(cols, f)) if cols is not None else None for f in (*FLOAT_FIELDS, "risk_target")
        }
        out["z_norm"] = summary(np.linalg.norm(cols.z, axis=1)) if cols is not None else None
        return out


def summary(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    q = np.percentile(x.astype(np.float64), [0, 50, 100])
    return {
        "min": float(q[0]),
        "median": float(q[1]),
        "max": float(q[2]),
        "mean": float(x.mean(dtype=np.float64)),
        "std": float(x.std(dtype=np.float64)),
    }
