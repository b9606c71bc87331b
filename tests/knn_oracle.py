"""float64 numpy brute force with ties by the lower seq, and a tie-aware comparison.

numpy only (no FAISS), so that the GPU check can run the torch kNN tests anywhere.
"""

from __future__ import annotations

import numpy as np

RTOL = 1e-5


def brute_force(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 squared distances to every row; the k nearest rows, equal distances by the lower seq."""
    xb64 = xb.astype(np.float64)
    rows = max(1, 2**22 // max(1, xb.size))  # keep the [rows, N, d] block at ~32 MiB
    ds, ids = [], []
    for start in range(0, len(xq), rows):
        q = xq[start : start + rows].astype(np.float64)
        d2 = ((q[:, None, :] - xb64[None]) ** 2).sum(-1)
        order = np.lexsort((np.broadcast_to(seq, d2.shape), d2), axis=-1)[:, :k]
        ds.append(np.take_along_axis(d2, order, -1))
        ids.append(order)
    return np.concatenate(ds), np.concatenate(ids)


def pair_d2(xb: np.ndarray, xq: np.ndarray, idx: np.ndarray) -> np.ndarray:
    diff = xb[idx].astype(np.float64) - xq[:, None, :].astype(np.float64)
    return (diff**2).sum(-1)


def ring_seqs(n: int, wrap: int, first: int = 1000) -> np.ndarray:
    """Seqs of a ring of n slots after it wrapped: slot `wrap` holds the oldest row."""
    return first + (np.arange(n) - wrap) % n


def check_same_knn(
    ref_d2: np.ndarray, ref_idx: np.ndarray, d2: np.ndarray, idx: np.ndarray, *, exact: bool
) -> None:
    """Distances equal to RTOL; indices equal, or (exact=False) equal as sets within groups of
    reference distances equal to RTOL, the last, truncated group excepted."""
    assert d2.shape == idx.shape == ref_idx.shape
    np.testing.assert_allclose(d2, ref_d2, rtol=RTOL, atol=1e-12)
    if exact:
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))
        return
    for row in range(len(ref_idx)):
        if (idx[row] == ref_idx[row]).all():
            continue
        tol = RTOL * ref_d2[row].max()
        group = np.concatenate([[0], np.cumsum(np.diff(ref_d2[row]) > tol)])
        for g in np.unique(group)[:-1]:
            mask = group == g
            assert set(idx[row, mask]) == set(ref_idx[row, mask]), f"row {row}: group {g} differs"


# (N, d, k, B) for both kNN test files: every N in {1, 7, 1000, 20000}, d in {1, 3, 32, 128},
# k in {1, 10, 64, 1024} and B in {1, 5, 40, 256}; k is clipped to N.
GRID = [
    (1, 1, 1, 1),
    (1, 128, 1024, 5),
    (1, 3, 10, 256),
    (7, 3, 10, 1),
    (7, 32, 1024, 40),
    (7, 1, 64, 256),
    (7, 128, 1, 5),
    (1000, 1, 10, 40),
    (1000, 3, 1024, 256),
    (1000, 32, 64, 1),
    (1000, 128, 1, 5),
    (1000, 128, 1024, 40),
    (20000, 3, 64, 256),
    (20000, 32, 1024, 40),
    (20000, 128, 10, 256),
    (20000, 1, 1, 5),
    (20000, 128, 64, 1),
    (20000, 1, 1024, 40),
    (20000, 32, 10, 5),
]
