"""The islands a PCA map shows: a grid-density clustering of 2-D points (numpy only).

Points are binned on a square grid over their 0.5–99.5th percentile range; a cell is
*dense* when its 3×3 neighbourhood holds at least half the mean of the occupied
neighbourhoods (and at least 3 points); an island is a set of 8-connected dense cells
holding at least 2% of the points (and at least 10). Points in no island are the sparse
exploration between them. Deterministic: no random starts, no iteration count.
"""

from __future__ import annotations

import numpy as np

GRID = 40
MIN_FRACTION = 0.02
MIN_POINTS = 10


def find_islands(xy: np.ndarray, *, grid: int = GRID, min_fraction: float = MIN_FRACTION) -> np.ndarray:
    """Island label of each point of xy [n, 2]: 0, 1, … largest island first, −1 for none.

    Fewer than MIN_POINTS points, or points without spread on both axes, give no islands
    (all −1): a line or a single spot is not a map of islands.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    labels = np.full(n, -1, np.int64)
    if n < MIN_POINTS:
        return labels
    lo, hi = np.percentile(xy, [0.5, 99.5], axis=0)
    span = hi - lo
    if not (span > 0).all():
        return labels
    lo, span = lo - 0.05 * span, span * 1.1
    cell = np.clip(((xy - lo) / span * grid).astype(np.int64), 0, grid - 1)
    counts = np.zeros((grid, grid))
    np.add.at(counts, (cell[:, 0], cell[:, 1]), 1.0)
    padded = np.pad(counts, 1)
    smooth = np.zeros_like(counts)
    for i in range(3):
        for j in range(3):
            smooth += padded[i : i + grid, j : j + grid]
    dense = smooth >= max(3.0, 0.5 * float(smooth[counts > 0].mean()))
    comp = _components(dense)
    point_comp = comp[cell[:, 0], cell[:, 1]]
    ids, sizes = np.unique(point_comp[point_comp >= 0], return_counts=True)
    keep = sizes >= max(MIN_POINTS, min_fraction * n)
    order = ids[keep][np.argsort(-sizes[keep], kind="stable")]
    for new, old in enumerate(order):
        labels[point_comp == old] = new
    return labels


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean grid: component id per cell, −1 off the mask."""
    comp = np.full(mask.shape, -1, np.int64)
    rows, cols = mask.shape
    current = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if comp[start] >= 0:
            continue
        comp[start] = current
        stack = [start]
        while stack:
            i, j = stack.pop()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < rows and 0 <= b < cols and mask[a, b] and comp[a, b] < 0:
                        comp[a, b] = current
                        stack.append((a, b))
        current += 1
    return comp
