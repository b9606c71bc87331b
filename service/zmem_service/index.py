"""Per-memory kNN indexes: the z's of one memory on its search device, addressed by ring slot.

Every memory owns one `Index`, fed by the memory on writes (`reserve` before the
commit, `write` after it) and asked `search(zq, k, size)` by the index thread.
Answers are exact, by the core's kNN (`zmem_core.knn`): candidates from a fast search
re-ranked with float64 differences, equal distances by the lower *seq* (so an answer
depends only on the buffer's contents, never on which slot holds what), and a full
float64 scan for the query rows whose certificate fails.

An `Engine` makes the indexes of a service (`--device`): FAISS CPU here, torch on
CPU or CUDA (and faiss-gpu) in `torch_index`, imported only when selected.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from zmem_core import knn


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

        May only queue the change: the index thread applies queued changes before it searches."""
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


class FaissCpuIndex:
    """Brute-force candidates, re-ranked exactly: FAISS's scan (`faiss.knn`) for a lone query, a
    numpy product with the rows kept transposed for a batch (`knn.CHUNK_COLUMNS`).

    Rows are stored minus a centre (`knn.exact_center`, chosen so the subtraction is exact)
    and queries are centred in float64, so the answers are the raw rows' answers bit for bit
    while the candidate search's error bound scales with the data's spread rather than its
    distance from the origin (data far from the origin would fail the certificate and take
    the full scan). A row that the centre doesn't subtract exactly recentres the index."""

    name = "faiss-cpu"

    def __init__(self, z_dim: int, threads: int) -> None:
        import faiss  # noqa: F401  (here, so that a service without FAISS fails at the first memory)

        self._threads = threads
        self.z_dim = z_dim
        self._z = np.zeros((0, z_dim), np.float32)  # rows minus `_center`, exactly
        self._seq = np.zeros(0, np.int64)
        # The same rows transposed, over each row's centred ‖x‖²: the small batches' product
        # reads it (`knn.CHUNK_COLUMNS`), FAISS's BLAS path its last row.
        self._zt = np.zeros((z_dim + 1, 0), np.float32)
        self._norm2 = 0.0  # the largest centred squared norm ever written: a bound for the certificate
        self._center: np.ndarray | None = None  # float32 [z_dim], fixed by the first write
        self._filled = 0  # slots [0, _filled) have been written

    def bytes_after(self, slots: int) -> int:
        return max(slots, len(self._seq)) * (8 * self.z_dim + 12)

    @property
    def nbytes(self) -> int:
        return self.bytes_after(0)

    def reserve(self, slots: int) -> None:
        if slots <= len(self._seq):
            return
        z = np.zeros((slots, self.z_dim), np.float32)
        seq = np.zeros(slots, np.int64)
        zt = np.zeros((self.z_dim + 1, slots), np.float32)
        z[: len(self._z)] = self._z
        seq[: len(self._seq)] = self._seq
        zt[:, : len(self._seq)] = self._zt
        self._z, self._seq, self._zt = z, seq, zt

    def write(self, slots: np.ndarray, z: np.ndarray, seq: np.ndarray) -> None:
        # Host memory: nothing to hand to another thread, so the change is made at once.
        if not len(z):
            return
        if self._center is None:
            self._center = knn.exact_center(z)
        elif not knn.centres_exactly(z, self._center).all():
            self._recentre(slots, z)
        centred = z - self._center
        sqnorm = np.einsum("nd,nd->n", centred, centred, dtype=np.float64)
        self._z[slots] = centred
        self._seq[slots] = seq
        self._zt[: self.z_dim, slots] = centred.T
        self._zt[self.z_dim, slots] = sqnorm
        self._filled = max(self._filled, int(slots.max()) + 1)
        self._norm2 = max(self._norm2, float(sqnorm.max()))

    def _recentre(self, slots: np.ndarray, z: np.ndarray) -> None:
        """A centre exact for the rows held and the new rows `z` (at `slots`); the held rows
        are re-stored under it (O(N·d): only when data move to where the centre no longer
        subtracts exactly)."""
        assert self._center is not None
        keep = np.ones(self._filled, bool)
        keep[slots[slots < self._filled]] = False
        held = self._z[: self._filled][keep] + self._center  # exact: the stored rows were exact
        center = knn.exact_center(np.concatenate([held, z]))
        self._z[: self._filled] += self._center
        self._z[: self._filled] -= center
        self._center = center
        sqnorm = np.einsum("nd,nd->n", self._z[: self._filled], self._z[: self._filled], dtype=np.float64)
        self._zt[: self.z_dim, : self._filled] = self._z[: self._filled].T
        self._zt[self.z_dim, : self._filled] = sqnorm
        self._norm2 = float(sqnorm[keep].max()) if keep.any() else 0.0

    def clear(self) -> None:
        self._z = np.zeros((0, self.z_dim), np.float32)
        self._seq = np.zeros(0, np.int64)
        self._zt = np.zeros((self.z_dim + 1, 0), np.float32)
        self._norm2 = 0.0
        self._center = None
        self._filled = 0

    def search(self, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        zq = zq.astype(np.float64)
        if self._center is not None:
            zq -= self._center  # float32 → float64: exact
        return knn.exact_knn(
            self._z[:size],
            self._seq[:size],
            zq,
            k,
            base_sqnorm_max=self._norm2,
            base_t=self._zt[:, :size],
            threads=self._threads,
            use_faiss=True,
        )


class CpuEngine:
    """FAISS CPU indexes. BLAS runs on one thread per call in this process (`threadpoolctl`):
    its products here are the batches' (from `knn.GEMM_QUERY_ROWS` query rows, ~1 ms for a few
    rows), where a second BLAS thread added its spinning to the CPU time and took a core from
    the event loop; large batches split over threads of their own (`knn.PARALLEL_QUERY_ROWS`),
    and FAISS sets its own OpenMP threads per search (`knn.faiss_threads`)."""

    name = "faiss-cpu"

    def __init__(self, threads: int = 0, reason: str = "--device cpu") -> None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
        self.threads = threads or os.cpu_count() or 1
        self.reason = reason

    def new_index(self, z_dim: int) -> Index:
        return FaissCpuIndex(z_dim, self.threads)

    def device_bytes(self) -> int | None:
        return None


def make_engine(device: str, threads: int = 0, *, cuda_graphs: bool = True) -> Engine:
    """The engine for `--device`: cpu → FAISS CPU; cuda[:N] → the GPU (or a clear error);
    auto → the GPU when one is usable, else the CPU (`reason` says which and why).
    `cuda_graphs` (`--cuda-graphs`): a GPU engine replays its searches from CUDA graphs."""
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
        engine: Engine = cuda_engine(device, cuda_graphs=cuda_graphs)
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
    engine = cuda_engine(chosen, cuda_graphs=cuda_graphs)
    engine.reason = f"--device auto: {why}"
    return engine
