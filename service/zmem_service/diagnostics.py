"""The seed's three acceptance criteria, as numbers with a verdict each (SPEC §6).

Pure functions over numpy arrays; kNN by exact ``faiss.knn`` on a seeded subsample.

1. *density*: mean k-NN distance of the buffer vs. a Gaussian sample with the same mean,
   covariance and count (ratio < 1 = clumpier than a blob), plus the fraction of variance
   in the first two principal components.
2. *reliability*: Spearman ρ of local density (1 / mean distance to the k nearest) with
   ``soft_bind`` (expect > 0) and with ``lambda_bind`` (expect < 0).
3. *convergence*: the criterion-1 ratio of the older vs. the newer half of the buffer, and
   the rate of risk spikes (risk > median + 5·MAD of the whole recorded series) in the older
   vs. the newer half of the recorded queries.

Every number in the result is a plain Python ``float``/``int``/``bool`` or ``None`` (never
NaN), so it can go straight into JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

MIN_RECORDED_QUERIES = 100
"""Below this many recorded queries the spike part of convergence is null."""

READING_1_WITHOUT_2 = "(1) without (2): memory isn't aligned with your reliability measure"
READING_2_WITHOUT_1 = "(2) without (1): z isn't being reused (KL too high, or actor too stochastic)"


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds (SPEC §6 defaults)."""

    density_ratio: float = 0.8
    reliability_rho: float = 0.2
    convergence_factor: float = 0.9
    spike_mad: float = 5.0


def spike_threshold(risk: np.ndarray, mad_k: float = 5.0) -> float | None:
    """``median + mad_k · MAD`` of ``risk`` [n] (raw MAD, unscaled); None when n = 0.

    A query is a spike when its risk is strictly greater than this. The MAD is floored
    at 1e-6 · max(1, |median|): risks are O(1) quantities, and a series of near-zero
    risks (queries far from every stored z) would otherwise have MAD ≈ 0 and call half
    its noise spikes.
    """
    r = np.asarray(risk, dtype=np.float64).ravel()
    if r.size == 0:
        return None
    med = float(np.median(r))
    mad = max(float(np.median(np.abs(r - med))), 1e-6 * max(1.0, abs(med)))
    return med + mad_k * mad


def _float(x: float | None) -> float | None:
    """A JSON-able float: numpy scalars become ``float``, NaN/inf become None."""
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


def _density(x: np.ndarray, neighbors: int, seed: int) -> dict[str, Any] | None:
    """Criterion-1 numbers for the rows of x [n, d]; None when n < 2 or d = 0."""
    n, d = x.shape
    if n < 2 or d == 0:
        return None
    k = min(neighbors, n - 1)
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    # Same mean and covariance without forming or factorising the d×d covariance twice:
    # with xc = U S Vᵀ, mean + g S Vᵀ / √(n−1) has covariance Vᵀ S² V / (n−1) = cov(x).
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    g = np.random.default_rng([seed, 1]).standard_normal((n, s.size))
    blob = mean + (g * (s / np.sqrt(n - 1))) @ vt
    m_data = _knn_mean_distance(x, k)
    m_blob = _knn_mean_distance(blob, k)
    data_mean, blob_mean = float(m_data.mean()), float(m_blob.mean())
    var = s**2
    total = float(var.sum())
    return {
        "local_mean_distance": m_data,
        "mean_knn_distance": data_mean,
        "gaussian_mean_knn_distance": blob_mean,
        "ratio": data_mean / blob_mean if blob_mean > 0 else None,
        "pc2_variance_fraction": float(var[:2].sum()) / total if total > 0 else None,
        "neighbors": k,
    }


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


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _judged(passed: bool | None, ok: str, bad: str, size: int, need: int) -> str:
    if passed is None:
        return f"too little data to judge: {size} episodes, a verdict needs {need}"
    return ok if passed else bad


def _as_matrix(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z)  # no float64 copy of a big buffer: only the subsamples are cast
    if z.ndim == 2:
        return z
    if z.size == 0:
        return z.reshape(0, 0)
    raise ValueError(f"z must be [N, d], got shape {z.shape}")


def evaluate(
    z: np.ndarray,
    soft_bind: np.ndarray,
    lambda_bind: np.ndarray,
    query_risk: np.ndarray,
    *,
    min_size: int,
    thresholds: Thresholds = Thresholds(),
    sample: int = 5000,
    neighbors: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Judge a buffer against the seed's acceptance criteria.

    Args:
        z: [N, d] stored z's in arrival order (oldest first).
        soft_bind, lambda_bind: [N] the matching episode fields.
        query_risk: [Q] kernel risk of the recorded queries in arrival order.
        min_size: the memory's min_size; every verdict is None below ``2 * min_size`` episodes.
        thresholds: verdict thresholds.
        sample: each kNN computation uses a seeded subsample of at most this many z's.
        neighbors: k for the k-NN distances (fewer when the sample is smaller).
        seed: seeds the subsamples and the Gaussian reference; same inputs, same result.

    Returns:
        ``{"size": N, "criteria": [density, reliability, convergence]}``, each criterion
        ``{"name", "passed": bool | None, "values": {...}, "reading": str}``. Values that
        cannot be computed (too few points, constant inputs) are None.

    Raises:
        ValueError: z is not [N, d], or the field lengths differ from N.

    Convergence passes when the newer half's density ratio ≤ ``convergence_factor`` × the
    older half's and, given ≥ 100 recorded queries, the newer half of ``query_risk`` has
    no higher spike *rate* than the older (rates, so an odd Q compares fairly). With fewer
    than 100 recorded queries the spike values are None and the verdict rests on the ratio
    part alone, so a trainer that never records its queries can still be judged.
    """
    z = _as_matrix(z)
    soft = np.asarray(soft_bind, dtype=np.float64).ravel()
    lam = np.asarray(lambda_bind, dtype=np.float64).ravel()
    n = z.shape[0]
    if soft.size != n or lam.size != n:
        raise ValueError(f"z has {n} rows but soft_bind {soft.size}, lambda_bind {lam.size}")
    need = 2 * min_size
    judge = n > 0 and n >= need

    idx = _sample(n, sample, np.random.default_rng(seed))
    full = _density(z[idx], neighbors, seed)
    density = _density_criterion(full, idx.size, judge, n, need, thresholds)
    reliability = _reliability_criterion(full, soft[idx], lam[idx], idx.size, judge, n, need, thresholds)
    # The seed's cross-readings go on the criterion that failed.
    if density["passed"] is True and reliability["passed"] is False:
        reliability["reading"] += f"; {READING_1_WITHOUT_2}"
    if reliability["passed"] is True and density["passed"] is False:
        density["reading"] += f"; {READING_2_WITHOUT_1}"
    convergence = _convergence_criterion(
        z,
        np.asarray(query_risk, dtype=np.float64).ravel(),
        judge,
        n,
        need,
        thresholds,
        sample=sample,
        neighbors=neighbors,
        seed=seed,
    )
    return {"size": int(n), "criteria": [density, reliability, convergence]}


def _density_criterion(
    full: dict[str, Any] | None, sampled: int, judge: bool, n: int, need: int, t: Thresholds
) -> dict[str, Any]:
    v = full or {}
    ratio = _float(v.get("ratio"))
    passed = None if not judge or ratio is None else ratio < t.density_ratio
    same = f"k-NN distances are {_fmt(ratio)}× a same-covariance Gaussian's"
    return {
        "name": "density",
        "passed": passed,
        "values": {
            "ratio": ratio,
            "mean_knn_distance": _float(v.get("mean_knn_distance")),
            "gaussian_mean_knn_distance": _float(v.get("gaussian_mean_knn_distance")),
            "pc2_variance_fraction": _float(v.get("pc2_variance_fraction")),
            "sample": int(sampled),
            "neighbors": v.get("neighbors"),
            "threshold": float(t.density_ratio),
            "required_size": int(need),
        },
        "reading": _judged(
            passed,
            f"islands, not a blob: {same} (passes below {t.density_ratio})",
            f"a blob, no islands: {same} (needs < {t.density_ratio})",
            n,
            need,
        ),
    }


def _reliability_criterion(
    full: dict[str, Any] | None,
    soft: np.ndarray,
    lam: np.ndarray,
    sampled: int,
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
) -> dict[str, Any]:
    rho_soft = rho_lam = None
    if full is not None:
        m = full["local_mean_distance"]
        # Exact duplicates have infinite density; ranks only need the order.
        local_density = np.where(m > 0, 1.0 / np.where(m > 0, m, 1.0), np.inf)
        rho_soft = spearman(local_density, soft)
        rho_lam = spearman(local_density, lam)
    passed: bool | None = None
    if judge and (rho_soft is not None or rho_lam is not None):
        passed = (rho_soft is not None and rho_soft >= t.reliability_rho) or (
            rho_lam is not None and rho_lam <= -t.reliability_rho
        )
    rhos = f"ρ(density, soft_bind) = {_fmt(rho_soft)}, ρ(density, lambda_bind) = {_fmt(rho_lam)}"
    return {
        "name": "reliability",
        "passed": passed,
        "values": {
            "rho_soft_bind": rho_soft,
            "rho_lambda_bind": rho_lam,
            "sample": int(sampled),
            "threshold": float(t.reliability_rho),
            "required_size": int(need),
        },
        "reading": _judged(
            passed,
            f"dense regions carry reliability: {rhos}",
            f"density is not tied to reliability: {rhos} "
            f"(needs ≥ {t.reliability_rho} or ≤ {-t.reliability_rho})",
            n,
            need,
        ),
    }


def _convergence_criterion(
    z: np.ndarray,
    risk: np.ndarray,
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
    *,
    sample: int,
    neighbors: int,
    seed: int,
) -> dict[str, Any]:
    ratios = []
    for part in (z[: n // 2], z[n // 2 :]):
        idx = _sample(part.shape[0], sample, np.random.default_rng(seed))
        res = _density(part[idx], neighbors, seed)
        ratios.append(_float(res["ratio"]) if res else None)
    r_old, r_new = ratios
    ratio_ok = None if r_old is None or r_new is None else r_new <= t.convergence_factor * r_old

    q = risk.size
    spikes: dict[str, Any] = dict.fromkeys(
        ("spike_threshold", "older_spikes", "newer_spikes", "older_spike_rate", "newer_spike_rate")
    )
    spikes_ok = None
    if q >= MIN_RECORDED_QUERIES:
        thr = spike_threshold(risk, t.spike_mad)
        is_spike = risk > thr
        qh = q // 2
        older, newer = int(is_spike[:qh].sum()), int(is_spike[qh:].sum())
        spikes = {
            "spike_threshold": _float(thr),
            "older_spikes": older,
            "newer_spikes": newer,
            "older_spike_rate": older / qh,
            "newer_spike_rate": newer / (q - qh),
        }
        spikes_ok = spikes["newer_spike_rate"] <= spikes["older_spike_rate"]
    passed: bool | None = None
    if judge and ratio_ok is not None:
        passed = ratio_ok and spikes_ok is not False

    cluster = f"density ratio {_fmt(r_old)} (older half) → {_fmt(r_new)} (newer half)"
    if spikes_ok is None:
        spike_text = f"spikes not judged ({q} recorded queries, needs {MIN_RECORDED_QUERIES})"
    else:
        spike_text = (
            f"risk spikes {spikes['older_spike_rate']:.1%} (older half of the queries) → "
            f"{spikes['newer_spike_rate']:.1%} (newer half)"
        )
    problems = []
    if ratio_ok is False:
        problems.append(f"not clustering more: {cluster} (needs ≤ {t.convergence_factor}×)")
    if spikes_ok is False:
        problems.append(f"risk spikes are not fading: {spike_text}")
    return {
        "name": "convergence",
        "passed": passed,
        "values": {
            "older_ratio": r_old,
            "newer_ratio": r_new,
            "factor": float(t.convergence_factor),
            "recorded_queries": int(q),
            **spikes,
            "required_size": int(need),
        },
        "reading": _judged(passed, f"converging: {cluster}; {spike_text}", "; ".join(problems), n, need),
    }
