"""Do the workers share one z space? *Worker islands*: z's neighbours, and the map's islands,
explained by the worker that wrote them.

With separate encoders (each worker's policy its own latent space, no shared encoder and no
parameter averaging) every worker's z's live in a region or rotation of their own: a z's
nearest stored neighbours were written by its own worker, and each island on the map is one
worker. A neighbour from another worker then means nothing to the kernel, and "reliable
islands" are only the workers that learned.

Measured on the diagnostics' sample, in full d: the share of each z's k nearest neighbours
written by its own worker, against the share expected if the workers' z's were mixed
(Σ p_w², p_w each worker's share of the sample). ``separation`` = (observed − expected) /
(1 − expected) is 0 for mixed workers and 1 when no neighbour crosses between workers; at
``SEPARATED`` or above the readings warn. Workers in one shared space that each keep to their
own part of it also score high: the warning says what it measured.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from .common import _float

SEPARATED = 0.8
"""The separation at which the workers' z spaces are taken not to line up."""
MIN_SHARE = 0.05
"""Workers with less of the sample than this don't count toward the two it takes."""
ISLAND_SHARE = 0.8
"""The readings call an island one worker's when that worker wrote at least this share of it."""


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """Indices [n, k] of each row of x [n, d]'s k nearest other rows."""
    n = x.shape[0]
    xf = np.ascontiguousarray(x, dtype=np.float32)
    _, idx = faiss.knn(xf, xf, k + 1)
    own = idx == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True  # a twin ranked first: drop the farthest instead
    own &= np.cumsum(own, axis=1) == 1
    return idx[~own].reshape(n, k)


def worker_islands(x: np.ndarray, worker: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any] | None:
    """How far the workers' z's keep apart, for the sampled rows x [n, d] with their workers
    [n] (None or "" for none) and island labels on the map [n] (−1 between islands).

    Returns None with fewer than two workers holding ≥ MIN_SHARE of the sample each (or
    k < 1); else ``{"workers", "own_neighbours", "expected_own_neighbours", "separation",
    "separated", "islands": [{"island", "worker", "share"}, …]}``: the share of the k nearest
    neighbours written by a z's own worker (mean over z's), that share for mixed workers, the
    separation, whether it reaches SEPARATED, and each island's most frequent worker and
    its share of the island.
    """
    names = np.array(["" if w is None else str(w) for w in np.asarray(worker, dtype=object)], dtype=object)
    n = names.size
    k = min(k, n - 1)
    if k < 1:
        return None
    kinds, who, counts = np.unique(names, return_inverse=True, return_counts=True)
    p = counts / n
    if int((p >= MIN_SHARE).sum()) < 2:
        return None
    own = float((who[_neighbours(x, k)] == who[:, None]).mean())
    # Drawing a neighbour at random among the other n − 1 rows.
    expected = float((p * (counts - 1) / (n - 1)).sum())
    separation = (own - expected) / (1.0 - expected) if expected < 1 else None
    table = []
    for i in range(int(labels.max()) + 1 if labels.size else 0):
        on = who[labels == i]
        if on.size:
            top = np.bincount(on, minlength=kinds.size)
            table.append(
                {"island": i + 1, "worker": str(kinds[top.argmax()]), "share": float(top.max() / on.size)}
            )
    return {
        "workers": int(kinds.size),
        "own_neighbours": own,
        "expected_own_neighbours": expected,
        "separation": _float(separation),
        "separated": bool(separation is not None and separation >= SEPARATED),
        "islands": table,
    }


def warning(found: dict[str, Any] | None, k: int) -> str:
    """The readings' plain statement that the workers' z spaces don't line up ("" when they
    do, or when there is nothing to compare)."""
    if found is None or not found["separated"]:
        return ""
    islands = found["islands"]
    whose = ""
    # On the 2-D map, separate spaces can overlap: name islands only when each is one worker's.
    if len({i["worker"] for i in islands}) >= 2 and all(i["share"] >= ISLAND_SHARE for i in islands):
        whose = (
            "; each island on the map is one worker's ("
            + ", ".join(f"#{i['island']}: {i['share']:.0%} {i['worker'] or '(no worker)'!r}" for i in islands)
            + ")"
        )
    return (
        f"the workers' z spaces don't line up: {found['own_neighbours']:.0%} of each z's {k} nearest "
        f"neighbours were written by its own worker ({found['expected_own_neighbours']:.0%} if the "
        f"{found['workers']} workers shared one z space){whose}. Neighbours from another worker "
        "mean nothing to the kernel, and reliable islands are only the workers that learned: give "
        "the workers one shared encoder (or average their parameters) so that their z's mean the same"
    )
