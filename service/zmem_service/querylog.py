"""The recorded queries of one memory: a fixed-size columnar ring of per-query kernel numbers.

Each recorded query row keeps its kernel risk, the unnormalised weight sum Σw (below the
1e-8 guard the kernel has switched off: risk ≈ 0 and no gradient), the effective number
of neighbours carrying the weight 1/Σw_norm², when it was recorded, and the worker that
asked it (when the query said: `worker`). The diagnostics' convergence and kernel
criteria and ``risk.png`` read them.

A query answered by the service is kept as its neighbours' distances and risk targets
(`pend`) and its kernel numbers are computed later, many queries in one numpy pass: when
PENDING_ELEMENTS distances wait, or when the log is read or extended. A training step's
query then pays a list append for being recorded, not a kernel evaluation.

Not thread-safe: the owning memory serialises every call under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zmem_core.kernel import kernel_stats

COLUMNS = ("risk", "wsum", "n_eff", "ts")
MAX_WORKERS = 1024
"""Distinct worker names a log keeps; rows of further names are kept without one."""
PENDING_ELEMENTS = 2**14
"""Queries wait with at most about this many neighbour distances before their numbers are computed."""


@dataclass(frozen=True)
class _Pending:
    """A query's rows waiting for their kernel numbers: d2, risk_target [B, k], its sigma and time."""

    d2: np.ndarray
    risk_target: np.ndarray
    sigma: float
    ts: float
    worker: int


class QueryLog:
    """The last `capacity` recorded queries: risk float64, wsum float64 (unnormalised Σw),
    n_eff float64 (1/Σw_norm²), ts float64, and the worker's name (held as a code into a
    table of at most MAX_WORKERS names); columnar numpy ring.

    Args:
        capacity: how many rows are kept (≥ 0; 0 keeps nothing). The columns grow on
            demand (doubling) up to `capacity`, so a memory nobody queries holds nothing; the
            memory budget counts them at full size (`bound_bytes`), so they never take room
            that episodes need.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be ≥ 0, got {capacity}")
        self.capacity = int(capacity)
        self._cols = {c: np.zeros(0, np.float64) for c in (*COLUMNS, "worker")}  # worker: codes, −1 none
        self._workers: dict[str, int] = {}
        self._next = 0  # slot of the next row
        self._size = 0
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        self._pending_elements = 0

    def __len__(self) -> int:
        return min(self.capacity, self._size + self._pending_rows)

    def pend(
        self, d2: np.ndarray, risk_target: np.ndarray, sigma: float, ts: float, worker: str | None = None
    ) -> None:
        """Keep a query's rows (d2, risk_target [B, k]) recorded at `ts` for `worker`; their
        kernel risk, Σw and n_eff (`zmem_core.kernel.kernel_stats` at `sigma`) are computed
        later, in order."""
        if self.capacity == 0 or len(d2) == 0:
            return
        self._pending.append(_Pending(d2, risk_target, float(sigma), float(ts), self._code(worker)))
        self._pending_rows += len(d2)
        self._pending_elements += d2.size
        if self._pending_elements >= PENDING_ELEMENTS:
            self.settle()

    def settle(self) -> None:
        """Compute the waiting queries' numbers and append them: runs of queries with the same k
        in one pass each (a per-row sigma), in the order they were recorded."""
        pending, self._pending = self._pending, []
        self._pending_rows = self._pending_elements = 0
        start = 0
        while start < len(pending):
            k = pending[start].d2.shape[1]
            stop = start + 1
            while stop < len(pending) and pending[stop].d2.shape[1] == k:
                stop += 1
            run = pending[start:stop]
            per_query = np.array([(p.sigma, p.ts, p.worker) for p in run], np.float64)
            sigma, ts, workers = np.repeat(per_query, [len(p.d2) for p in run], axis=0).T
            risk, wsum, n_eff = kernel_stats(
                np.concatenate([p.d2 for p in run]), np.concatenate([p.risk_target for p in run]), sigma
            )
            self._append([risk, wsum, n_eff, ts, workers])
            start = stop

    def _code(self, worker: str | None) -> int:
        """`worker`'s code in the names table (−1: none, or the table is full)."""
        if worker is None:
            return -1
        code = self._workers.get(worker)
        if code is None and len(self._workers) < MAX_WORKERS:
            code = self._workers[worker] = len(self._workers)
        return -1 if code is None else code

    @property
    def nbytes(self) -> int:
        """Bytes the columns hold now (at most `bound_bytes`)."""
        return sum(col.nbytes for col in self._cols.values())

    @property
    def bound_bytes(self) -> int:
        """Bytes the columns hold once full: what the memory budget counts for the log (its
        names table, at most MAX_WORKERS short names, is not counted)."""
        return self.capacity * 8 * len(self._cols)

    def extend(
        self, risk: np.ndarray, wsum: np.ndarray, n_eff: np.ndarray, ts: float, worker: str | None = None
    ) -> None:
        """Append rows (each argument [n], the same n), all stamped `ts` and `worker`; the
        oldest go first.

        Raises:
            ValueError: the lengths differ.
        """
        cols = [np.asarray(x, dtype=np.float64).ravel() for x in (risk, wsum, n_eff)]
        n = cols[0].size
        if any(c.size != n for c in cols):
            raise ValueError(f"risk, wsum and n_eff must have the same length, got {[c.size for c in cols]}")
        self.settle()  # the rows recorded before these go first
        self._append([*cols, np.full(n, float(ts)), np.full(n, float(self._code(worker)))])

    def _append(self, cols: list[np.ndarray]) -> None:
        """Append rows: risk, wsum, n_eff, ts, worker code, each float64 [n]."""
        n = cols[0].size
        if n == 0 or self.capacity == 0:
            return
        if n > self.capacity:  # only the last `capacity` rows would survive
            cols = [c[n - self.capacity :] for c in cols]
            n = self.capacity
        self._grow(self._size + n)
        slots = (self._next + np.arange(n)) % self.capacity
        for name, values in zip(self._cols, cols, strict=True):
            self._cols[name][slots] = values
        self._next = (self._next + n) % self.capacity
        self._size = min(self.capacity, self._size + n)

    def _grow(self, rows: int) -> None:
        """Room for min(rows, capacity) rows. Before the log first fills, its rows are
        slots [0, size) in order, so growing copies them and leaves `_next` as it is."""
        have = self._cols["risk"].size
        if have >= min(rows, self.capacity):
            return
        new = min(self.capacity, max(rows, 2 * have, 1024))
        for name, col in self._cols.items():
            grown = np.zeros(new, np.float64)
            grown[: self._size] = col[: self._size]
            self._cols[name] = grown

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the columns, oldest first: ``{"risk", "wsum", "n_eff", "ts"}`` float64 [len]
        and ``"worker"``, each row's worker name or None (an object array)."""
        self.settle()
        start = (self._next - self._size) % self.capacity if self.capacity else 0
        order = (start + np.arange(self._size)) % max(self.capacity, 1)
        out = {name: self._cols[name][order] for name in COLUMNS}
        names = np.array([None, *self._workers], dtype=object)  # code −1 → None
        out["worker"] = names[self._cols["worker"][order].astype(np.int64) + 1]
        return out
