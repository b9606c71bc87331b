"""Exact k-nearest-neighbour search over a ring's filled rows.

A backend answers `search(xb, xq, k)` with squared L2 distances and row indices,
nearest first, ties broken by the lower row index. FAISS brute force (`faiss.knn`)
finds candidates; the candidates' distances are then recomputed exactly (float64
differences) and re-sorted, because FAISS's batched path computes
‖x‖² + ‖y‖² − 2⟨x, y⟩ in float32 and can swap near-ties at the k-th place. A
margin of extra candidates makes that re-sort exact in practice (tested against
numpy brute force).

All searches run on one thread (`KnnExecutor`): FAISS GPU resources are not
thread-safe, and OpenMP's thread count is per calling thread, so that thread
sets it per query: one small query must not pay for a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")
SMALL_QUERY_ROWS = 16
"""Up to this many query rows, search single-threaded (the pool costs more than it saves)."""


class KnnBackend(Protocol):
    name: str

    def search(self, xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """xb float32 [N, d], xq float32 [B, d], 1 ≤ k ≤ N → (d2 float32 [B, k], idx int64 [B, k])."""
        ...


def refine(xb: np.ndarray, xq: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Recompute candidates' distances exactly and keep the k nearest, ties by row index."""
    diff = xb[idx].astype(np.float64) - xq[:, None, :].astype(np.float64)
    d2 = np.einsum("bkd,bkd->bk", diff, diff)
    order = np.lexsort((idx, d2), axis=-1)[:, :k]
    return (np.take_along_axis(d2, order, -1).astype(np.float32), np.take_along_axis(idx, order, -1))


def candidates(k: int, n: int) -> int:
    return min(n, k + max(16, k // 4))


class FaissCpuKnn:
    """FAISS CPU brute force with exact re-ranking."""

    name = "faiss-cpu"

    def __init__(self, threads: int = 0) -> None:
        import faiss

        self._faiss = faiss
        self._threads = threads or os.cpu_count() or 1

    def search(self, xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Never more threads than query rows: FAISS was seen to return wrong neighbours
        # on large data when it splits fewer queries over more threads.
        threads = 1 if len(xq) <= SMALL_QUERY_ROWS else min(self._threads, len(xq))
        self._faiss.omp_set_num_threads(threads)
        _, idx = self._faiss.knn(xq, xb, candidates(k, len(xb)))
        return refine(xb, xq, idx.astype(np.int64), k)


class NumpyKnn:
    """Plain numpy brute force: the reference the tests compare against."""

    name = "numpy"

    def search(self, xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d2 = ((xq[:, None, :].astype(np.float64) - xb[None].astype(np.float64)) ** 2).sum(-1)
        rows = np.broadcast_to(np.arange(len(xb)), d2.shape)
        idx = np.lexsort((rows, d2), axis=-1)[:, :k]  # a full sort: slow, but ties exact
        return np.take_along_axis(d2, idx, -1).astype(np.float32), idx.astype(np.int64)


def make_backend(device: str, threads: int = 0) -> KnnBackend:
    """The backend for `--device`: cpu → FAISS CPU; auto → GPU when present (not yet) else CPU."""
    if device == "cuda":
        raise RuntimeError(
            "--device cuda: the GPU kNN backend is not available in this version of zmem; "
            "use --device cpu (or auto, which picks the CPU)"
        )
    return FaissCpuKnn(threads)


class KnnExecutor:
    """The one thread every search runs on."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zmem-knn")

    def submit(self, fn: Callable[..., T], /, *args: Any) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
