"""Per-memory kNN indexes: the z's of one memory on its search device, addressed by ring slot.

Every memory owns one `Index`, fed by the memory on writes (`reserve` before the
commit, `write` after it) and asked `search(zq, k, size)` by the searcher thread.
Answers are exact: candidates from a fast search are re-ranked with float64
differences, and equal distances break by the lower *seq*, so an answer depends
only on the buffer's contents, never on which slot holds what.

A candidate search can miss a true neighbour only if its float32 distances are
off by more than the gap between the k-th neighbour and the last candidate. Each
query row carries a certificate: the k-th exact distance must lie below the last
candidate's approximate distance minus a bound on float32 error; a row that fails
it (huge tie groups, data far from the origin) is answered by a full float64 scan.

An `Engine` makes the indexes of a service (`--device`): FAISS CPU here, torch on
CPU or CUDA (and faiss-gpu) in `torch_index`, imported only when selected.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

SMALL_QUERY_ROWS = 16
"""Up to this many query rows, FAISS runs single-threaded (a pool costs more than it saves)."""
F32_EPS = 2.0**-23  # twice float32's unit roundoff: a safety factor of two in every bound


class Index(Protocol):
    """One memory's z's on its search device. Not thread-safe: the memory's lock serialises calls."""

    name: str

    def bytes_after(self, slots: int) -> int:
        """Bytes this index holds once it has room for `slots` rows."""
        ...

    def reserve(self, slots: int) -> None:
        """Make room for `slots` rows; may raise MemoryError (then nothing changed)."""
        ...

    def write(self, slots: np.ndarray, z: np.ndarray, seq: np.ndarray) -> None:
        """Set rows `slots` (int64 [n], below the reserved room) to z float32 [n, d], seq int64 [n].

        May only queue the change: the searcher applies queued changes before it searches."""
        ...

    def search(self, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of slots [0, size) to each row of zq float32 [B, d], 1 ≤ k ≤ size.

        → (d2 float32 [B, k], slots int64 [B, k]), nearest first, ties by the lower seq."""
        ...

    def clear(self) -> None:
        """Forget every row and release the memory it holds."""
        ...

    @property
    def nbytes(self) -> int: ...


class Engine(Protocol):
    """Makes the indexes of one service; chosen by `--device`."""

    name: str
    reason: str

    def new_index(self, z_dim: int) -> Index: ...

    def device_bytes(self) -> int | None:
        """Total memory of the search device (None: host memory)."""
        ...


def exact_rerank(
    xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, cand: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 distances of candidate rows `cand` [B, c] → the k nearest, ties by seq."""
    diff = xb[cand].astype(np.float64) - xq[:, None, :].astype(np.float64)
    d2 = np.einsum("bkd,bkd->bk", diff, diff)
    order = np.lexsort((seq[cand], d2), axis=-1)[:, :k]
    rows = np.arange(len(cand))[:, None]
    return d2[rows, order], cand[rows, order]


def brute_force(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 scan of every row → (d2 float64 [B, k], rows int64 [B, k]), ties by seq.

    The reference answer, and the fallback for rows whose certificate fails."""
    rows = max(1, 2**22 // max(1, xb.size))  # keep each [rows, N] block small
    ds, ids = [], []
    xb64 = xb.astype(np.float64)
    for start in range(0, len(xq), rows):
        q = xq[start : start + rows].astype(np.float64)
        d2 = ((q[:, None, :] - xb64[None]) ** 2).sum(-1)
        keys = np.broadcast_to(seq, d2.shape)
        order = np.lexsort((keys, d2), axis=-1)[:, :k]
        ds.append(np.take_along_axis(d2, order, -1))
        ids.append(order.astype(np.int64))
    return np.concatenate(ds), np.concatenate(ids)


def candidates(k: int, n: int) -> int:
    return min(n, k + max(16, k // 4))


class FaissCpuIndex:
    """FAISS CPU brute force (`faiss.knn`) for candidates, re-ranked exactly."""

    name = "faiss-cpu"

    def __init__(self, z_dim: int, threads: int) -> None:
        import faiss

        self._faiss = faiss
        self._threads = threads
        self.z_dim = z_dim
        self._z = np.zeros((0, z_dim), np.float32)
        self._seq = np.zeros(0, np.int64)
        self._norm2 = 0.0  # the largest squared norm written: bounds FAISS's GEMM error

    def bytes_after(self, slots: int) -> int:
        return max(slots, len(self._seq)) * (4 * self.z_dim + 8)

    @property
    def nbytes(self) -> int:
        return self.bytes_after(0)

    def reserve(self, slots: int) -> None:
        if slots <= len(self._seq):
            return
        z = np.zeros((slots, self.z_dim), np.float32)
        seq = np.zeros(slots, np.int64)
        z[: len(self._z)] = self._z
        seq[: len(self._seq)] = self._seq
        self._z, self._seq = z, seq

    def write(self, slots: np.ndarray, z: np.ndarray, seq: np.ndarray) -> None:
        # Host memory: nothing to hand to another thread, so the change is made at once.
        self._z[slots] = z
        self._seq[slots] = seq
        if len(z):
            self._norm2 = max(self._norm2, float(np.einsum("nd,nd->n", z, z, dtype=np.float64).max()))

    def clear(self) -> None:
        self._z = np.zeros((0, self.z_dim), np.float32)
        self._seq = np.zeros(0, np.int64)
        self._norm2 = 0.0

    def search(self, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        xb, seq = self._z[:size], self._seq[:size]
        c = candidates(k, size)
        # Never more threads than query rows: FAISS was seen to return wrong neighbours
        # on large data when it splits fewer queries over more threads.
        threads = 1 if len(zq) <= SMALL_QUERY_ROWS else min(self._threads, len(zq))
        self._faiss.omp_set_num_threads(threads)
        approx, cand = self._faiss.knn(zq, xb, c)
        cand = cand.astype(np.int64)
        bad = (cand < 0).any(axis=1)  # FAISS's "no result" (-1) never becomes a slot
        cand[cand < 0] = 0
        d2, rows = exact_rerank(xb, seq, zq, cand, k)
        if c < size:
            bad |= ~(d2[:, -1] < approx[:, -1].astype(np.float64) - self._error(zq, approx[:, -1]))
        for i in np.flatnonzero(bad):
            d2[i], rows[i] = (a[0] for a in brute_force(xb, seq, zq[i : i + 1], k))
        return d2.astype(np.float32), rows

    def _error(self, zq: np.ndarray, last: np.ndarray) -> np.ndarray:
        """An upper bound on |FAISS distance − exact distance| for each query row."""
        d = self.z_dim
        if len(zq) < self._faiss.cvar.distance_compute_blas_threshold:
            # Direct Σ(x−q)² in float32: a relative error.
            return (d + 4) * F32_EPS * np.abs(last.astype(np.float64))
        # BLAS: ‖x‖² + ‖q‖² − 2⟨x, q⟩ cancels; the error scales with the norms.
        q2 = np.einsum("bd,bd->b", zq, zq, dtype=np.float64)
        return (d + 4) * F32_EPS * 4 * (self._norm2 + q2)


class CpuEngine:
    name = "faiss-cpu"

    def __init__(self, threads: int = 0, reason: str = "--device cpu") -> None:
        self.threads = threads or os.cpu_count() or 1
        self.reason = reason

    def new_index(self, z_dim: int) -> Index:
        return FaissCpuIndex(z_dim, self.threads)

    def device_bytes(self) -> int | None:
        return None


def make_engine(device: str, threads: int = 0) -> Engine:
    """The engine for `--device`: cpu → FAISS CPU; cuda[:N] → the GPU (or a clear error);
    auto → the GPU when one is usable, else the CPU (`reason` says which and why)."""
    if device == "cpu":
        return CpuEngine(threads)
    if device.startswith("cuda"):
        try:
            from .torch_index import cuda_engine
        except ImportError as e:
            raise RuntimeError(
                f"--device {device}: the GPU index needs torch with CUDA: install torch for your "
                f"CUDA version first (see pytorch.org), then pip install 'zmem[service-gpu]' ({e})"
            ) from None
        engine: Engine = cuda_engine(device)
        return engine
    import glob
    import importlib.util

    # Look before importing torch: a CPU host never loads it.
    if not glob.glob("/dev/nvidia[0-9]*"):
        return CpuEngine(threads, "--device auto: no NVIDIA device (/dev/nvidia*) is visible; FAISS CPU")
    if importlib.util.find_spec("torch") is None:
        return CpuEngine(threads, "--device auto: torch is not installed, so no GPU index; FAISS CPU")
    try:
        from .torch_index import auto_engine_reason, cuda_engine
    except ImportError as e:
        return CpuEngine(threads, f"--device auto: the GPU index is unavailable ({e}); FAISS CPU")
    chosen, why = auto_engine_reason()
    if chosen is None:
        return CpuEngine(threads, f"--device auto: {why}; FAISS CPU")
    engine = cuda_engine(chosen)
    engine.reason = f"--device auto: {why}"
    return engine
