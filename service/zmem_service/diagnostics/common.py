"""What the criteria share: thresholds, plain-JSON numbers, subsamples, k-NN distances,
Gaussian reference blobs and rank correlation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

MIN_RECORDED_QUERIES = 100
"""Below this many recorded queries the query-based parts (level, spikes, kernel) are null."""


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds (SPEC §6 defaults)."""

    density_ratio: float = 0.8
    reliability_rho: float = 0.2
    reliable_soft_bind: float = 0.5
    reliable_margin: float = 0.1
    """A reliable island's mean soft_bind is ≥ reliable_soft_bind and ≥ reliable_margin above
    the least reliable group of points (another island, or the points between islands) or,
    when every group binds well, above reliable_soft_bind."""
    reliable_lambda_fraction: float = 0.5
    """An island is also reliable when its mean lambda_bind is at most this fraction of the
    highest group's (the seed's "high soft_bind and/or low lambda_bind"), unless it is the
    least reliable group by soft_bind (``lambda_least_gap``)."""
    lambda_least_gap: float = 0.05
    """An island whose mean soft_bind is below every other group's by at least this and by
    ``floor_z`` standard errors is the least reliable by soft_bind, and low lambda_bind
    doesn't make it reliable: a stuck, deterministic policy has low entropy too."""
    dense_lambda_drop: float = 0.25
    """Without islands, the densest quarter also passes when its mean lambda_bind is at least
    this fraction below the other points' (beyond noise)."""
    floor_z: float = 3.0
    """Without islands, the densest quarter's advantage must exceed this many standard errors."""
    convergence_factor: float = 0.9
    min_effect: float = 0.05
    """The smallest rise called "getting worse", as a fraction of the risk targets' 10th–90th
    percentile range: of the risk targets or the recorded risk, newest fifth against the best
    earlier one or along a fitted line."""
    change_z: float = 3.0
    """…and the rise must also exceed this many of its standard errors."""
    worker_z: float = 3.5
    """The same for one worker's risk targets: each worker is a test of its own, so the bar is
    higher (3.5 SE: a one-sided 3-SE bar shared among five workers)."""
    worker_episodes: int = 200
    """A worker is judged on its own from this many episodes in the buffer."""
    spike_margin: float = 0.25
    spike_mad: float = 5.0
    """A spike is a recorded risk above the best earlier fifth's median by ``spike_margin`` ×
    the risk targets' range or ``spike_mad`` of that fifth's MADs, whichever is more."""
    spike_rise: float = 0.05
    """Spikes grow when the newest fifth's share exceeds the lowest earlier share by this
    many share points and by ``change_z`` standard errors."""
    kernel_underflow: float = 0.1
    kernel_recent: int = 1000


def _float(x: Any) -> float | None:
    """A JSON-able float: numpy scalars become ``float``, NaN/inf/None become None."""
    if x is None or not np.isfinite(x):
        return None
    return float(x)


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a subsample of ≤ size of range(n), without replacement."""
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def _knn_mean_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Mean Euclidean distance of each row of x [n, d] to its k nearest other rows → [n]."""
    n = x.shape[0]
    xf = np.ascontiguousarray(x, dtype=np.float32)
    d2, idx = faiss.knn(xf, xf, k + 1)
    # Drop each row itself; with exact duplicates faiss may rank a twin first, so fall back
    # to dropping the farthest column (the twin is at distance 0 either way).
    own = idx == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    own &= np.cumsum(own, axis=1) == 1
    d2 = d2[~own].reshape(n, k).astype(np.float64)
    return np.sqrt(np.maximum(d2, 0.0)).mean(axis=1)


def _kth_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each row of x [n, d] to its k-th nearest other row → [n]."""
    xf = np.ascontiguousarray(x, dtype=np.float32)
    d2, _ = faiss.knn(xf, xf, k + 1)
    return np.sqrt(np.maximum(d2[:, k].astype(np.float64), 0.0))


class _Blob:
    """A Gaussian with the mean and covariance of x [n, d]; ``sample(m)`` draws m rows."""

    def __init__(self, x: np.ndarray, seed: int) -> None:
        self.mean = x.mean(axis=0)
        # With xc = U S Vᵀ, mean + g S Vᵀ / √(n−1) has covariance Vᵀ S² V / (n−1) = cov(x),
        # without forming or factorising the d×d covariance.
        _, s, self.vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.scale = s / np.sqrt(max(x.shape[0] - 1, 1))
        self.var = s**2
        self.seed = seed

    def sample(self, m: int) -> np.ndarray:
        g = np.random.default_rng([self.seed, 1, m]).standard_normal((m, self.scale.size))
        return np.asarray(self.mean + (g * self.scale) @ self.vt)


def _ratio(x: np.ndarray, blob: _Blob, k: int) -> tuple[np.ndarray, float, float, float | None]:
    """(local mean distances [n], their mean, the blob's (same count), ratio) for x [n, d]."""
    mine = _knn_mean_distance(x, k)
    ref = float(_knn_mean_distance(blob.sample(x.shape[0]), k).mean())
    m = float(mine.mean())
    return mine, m, ref, (m / ref if ref > 0 else None)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [n], ties getting their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman ρ of x [n] and y [n]; None when n < 2 or either input is constant."""
    if x.size < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    if denom == 0:
        return None
    return _float(float((rx * ry).sum()) / denom)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _too_little(size: int, need: int) -> str:
    return f"too little data to judge: {size} episodes, a verdict needs {need}"
