"""The FIFO ring: up to `capacity` episodes in columnar numpy arrays, written round-robin.

Semantics equal `collections.deque(maxlen=capacity)` over arrival order. The arrays
grow on demand (doubling, capped at `capacity`) so an idle memory costs little; once
full, each write overwrites the oldest slots. Slot order is not arrival order after
the ring wraps: `order()` gives the slots oldest first. The ring is not thread-safe;
its owner (`Memory`) serialises access.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT_FIELDS = ("soft_bind", "cone_vol", "lambda_bind", "E_T", "lambda_T", "Hr")
"""Per-episode scalars a client sends (float32 on the wire and in the ring)."""


@dataclass
class Columns:
    """A batch of episodes, column by column; all arrays have length B.

    `z` float32 [B, d]; each of FLOAT_FIELDS and `risk_target` float32 [B];
    `seq` int64 [B]; `ts` float64 [B] (epoch seconds); `id`, `worker`: object [B]
    holding `str` or None.
    """

    z: np.ndarray
    soft_bind: np.ndarray
    cone_vol: np.ndarray
    lambda_bind: np.ndarray
    E_T: np.ndarray
    lambda_T: np.ndarray
    Hr: np.ndarray
    risk_target: np.ndarray
    seq: np.ndarray
    ts: np.ndarray
    id: np.ndarray
    worker: np.ndarray

    NAMES = (*FLOAT_FIELDS, "z", "risk_target", "seq", "ts", "id", "worker")

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def take(self, index: np.ndarray | slice) -> Columns:
        return Columns(**{name: getattr(self, name)[index] for name in self.NAMES})

    @classmethod
    def empty(cls, z_dim: int, n: int = 0) -> Columns:
        cols = {name: np.zeros(n, np.float32) for name in (*FLOAT_FIELDS, "risk_target")}
        return cls(
            z=np.zeros((n, z_dim), np.float32),
            seq=np.zeros(n, np.int64),
            ts=np.zeros(n, np.float64),
            id=np.full(n, None, object),
            worker=np.full(n, None, object),
            **cols,
        )

    @classmethod
    def concat(cls, parts: list[Columns]) -> Columns:
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.NAMES})


def row_bytes(z_dim: int) -> int:
    """Ring bytes per slot: z plus the scalar columns and the two object references."""
    return 4 * z_dim + 4 * (len(FLOAT_FIELDS) + 1) + 8 + 8 + 2 * 8


class Ring:
    """Up to `capacity` episodes of dimension `z_dim`, oldest overwritten first."""

    def __init__(self, z_dim: int, capacity: int) -> None:
        self.z_dim = z_dim
        self.capacity = capacity
        self.size = 0
        self._head = 0  # next slot to write once full; == size before the first wrap
        self._cols = Columns.empty(z_dim)

    @property
    def allocated(self) -> int:
        return len(self._cols)

    def allocation_after(self, n: int) -> int:
        """How many slots the ring will hold after appending `n` episodes."""
        need = min(self.capacity, self.size + n)
        if need <= self.allocated:
            return self.allocated
        return min(self.capacity, max(need, 2 * self.allocated, 64))

    @property
    def z(self) -> np.ndarray:
        """The filled rows of z, [size, d] float32, C-contiguous, in slot order."""
        return self._cols.z[: self.size]

    def column(self, name: str) -> np.ndarray:
        """A filled column in slot order (a view: copy before releasing the lock)."""
        return getattr(self._cols, name)[: self.size]

    def order(self) -> np.ndarray:
        """Slots oldest first, int64 [size]."""
        if self.size < self.capacity:
            return np.arange(self.size)
        return (self._head + np.arange(self.capacity)) % self.capacity

    def position_after(self, seq: int) -> int:
        """How many held episodes have a seq ≤ `seq` (seqs increase in arrival order), without
        copying a column: the arrival position of the first episode after `seq`."""
        seqs = self._cols.seq
        if self.size < self.capacity:
            return int(np.searchsorted(seqs[: self.size], seq, side="right"))
        older, newer = seqs[self._head : self.capacity], seqs[: self._head]  # oldest first
        n = int(np.searchsorted(older, seq, side="right"))
        return n if n < len(older) else n + int(np.searchsorted(newer, seq, side="right"))

    def slots(self, start: int, stop: int) -> np.ndarray:
        """The slots of arrival positions [start, stop) (0 = the oldest held), int64."""
        stop = min(stop, self.size)
        first = 0 if self.size < self.capacity else self._head
        return (first + np.arange(start, max(start, stop), dtype=np.int64)) % self.capacity

    def rows(self, slots: np.ndarray) -> Columns:
        return self._cols.take(slots)

    def ordered(self) -> Columns:
        return self.rows(self.order())

    def evicted_by(self, n: int) -> Columns:
        """The episodes that appending `n` more would overwrite, oldest first."""
        drop = max(0, self.size + n - self.capacity)
        return self.rows(self.order()[: min(drop, self.size)])

    def reserve(self, n: int) -> None:
        """Allocate now what appending `n` episodes needs (may raise MemoryError; then nothing changed)."""
        self._grow(self.allocation_after(n))

    def append(self, batch: Columns) -> np.ndarray:
        """Append episodes in order (when more than `capacity` arrive, the last ones win);
        returns the slots written, int64 [min(n, capacity)], in arrival order."""
        n = len(batch)
        if n > self.capacity:
            batch, n = batch.take(slice(n - self.capacity, None)), self.capacity
        self._grow(self.allocation_after(n))
        start = self._head
        first = min(n, self.capacity - start)
        self._write(start, batch.take(slice(0, first)))
        if first < n:
            self._write(0, batch.take(slice(first, n)))
        self._head = (start + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        return (start + np.arange(n, dtype=np.int64)) % self.capacity

    def _write(self, start: int, batch: Columns) -> None:
        stop = start + len(batch)
        for name in Columns.NAMES:
            getattr(self._cols, name)[start:stop] = getattr(batch, name)

    def _grow(self, slots: int) -> None:
        if slots <= self.allocated:
            return
        # Growth only happens before the first wrap, so slot order is arrival order here.
        bigger = Columns.empty(self.z_dim, slots)
        for name in Columns.NAMES:
            getattr(bigger, name)[: self.size] = getattr(self._cols, name)[: self.size]
        self._cols = bigger
