"""The seed's acceptance criteria and a kernel check, as numbers with a verdict each (SPEC §6).

Pure functions over numpy arrays; kNN by exact ``faiss.knn`` on a seeded subsample, on a
2-D map, the one ``map.png`` draws with the same parameters: the buffer's PCA by default
(the picture the seed's criteria talk about), or another buffer's basis, or the risk
projection of ``projection``; island coordinates in the readings are the map's.

1. *density*: mean k-NN distance of the projected buffer vs. a Gaussian sample with the
   same mean, covariance and count (ratio < 1 = clumpier than a blob); the full-d ratio and
   the fraction of variance in the map's two axes as extra values.
2. *reliability*: Spearman ρ of local density (1 / mean distance to the k nearest, full d)
   with ``soft_bind`` (expect > 0) and with ``lambda_bind`` (expect < 0); and, when the map
   shows at least two islands (``islands.find_islands``), each island's size and mean
   soft_bind / lambda_bind. With islands the verdict asks whether any island is reliable
   (mean soft_bind ≥ 0.5, or low lambda_bind unless it binds worst of all) and names them,
   so a correlation carried by the sparse exploration between unreliable islands no longer
   passes. Without islands the densest quarter must also bind well in absolute terms, beyond
   noise, not only correlate. With workers named, whether their z's share one space
   (``workers``): when each z's neighbours are its own worker's, the readings say so first.
3. *convergence*: the projected k-NN distance of the older vs. the newer half of the buffer,
   each against the same reference blob (the whole sample's Gaussian, sized like a half);
   and the run not getting worse (``trends``): the risk targets' newest fifth against their
   best earlier fifth and their fitted line, the recorded risk's fitted line, the share of
   recorded risks above a fixed spike level, and each worker's risk targets, each against a
   minimum effect of 5% of the risk targets' range and 3 standard errors.
4. *kernel*: among the recent recorded queries, the fraction whose unnormalised weight sum
   Σw fell below the 1e-8 guard (risk ≈ 0 and no gradient), the median effective number of
   neighbours 1/Σw_norm², the σ that would keep the nearest stored z's in reach, and how much
   of the risk targets' local slope reaches the kernel's gradient (``slope``), with a σ that
   passes it.

Every number in the result is a plain Python ``float``/``int``/``bool`` or ``None`` (never
NaN), so it can go straight into JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import MIN_RECORDED_QUERIES, Thresholds, _sample, spearman
from .convergence import _convergence_criterion
from .density import _density_criterion
from .geometry import _geometry, _plane
from .kernel import _kernel_criterion
from .projection import PROJECTIONS
from .reliability import _reliability_criterion

__all__ = [
    "MIN_RECORDED_QUERIES",
    "READING_1_WITHOUT_2",
    "READING_2_WITHOUT_1",
    "SERIES_SAMPLE",
    "Thresholds",
    "evaluate",
    "spearman",
]

DEFAULTS = Thresholds()
SERIES_SAMPLE = 50_000
"""At most this many episodes (a seeded subsample in arrival order) feed convergence's tests."""

READING_1_WITHOUT_2 = "(1) without (2): memory isn't aligned with your reliability measure"
READING_2_WITHOUT_1 = "(2) without (1): z isn't being reused (KL too high, or actor too stochastic)"


def _as_matrix(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z)  # no float64 copy of a big buffer: only the subsamples are cast
    if z.ndim == 2:
        return z
    if z.size == 0:
        return z.reshape(0, 0)
    raise ValueError(f"z must be [N, d], got shape {z.shape}")


def _queries(queries: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """Recorded queries as float64 columns: a bare array is the risk alone."""
    if isinstance(queries, Mapping):
        cols = {c: queries.get(c) for c in ("risk", "wsum", "n_eff")}
    else:
        cols = {"risk": queries, "wsum": None, "n_eff": None}
    out = {c: None if v is None else np.asarray(v, dtype=np.float64).ravel() for c, v in cols.items()}
    risk = out["risk"] if out["risk"] is not None else np.zeros(0)
    out["risk"] = risk
    for c in ("wsum", "n_eff"):
        v = out[c]
        if v is not None and v.size != risk.size:
            raise ValueError(f"queries: {c} has {v.size} rows but risk {risk.size}")
    return out


def evaluate(
    z: np.ndarray,
    soft_bind: np.ndarray,
    lambda_bind: np.ndarray,
    queries: np.ndarray | Mapping[str, np.ndarray],
    *,
    min_size: int,
    sigma: float | str | None = None,
    k: int | None = None,
    thresholds: Thresholds = DEFAULTS,
    sample: int = 5000,
    neighbors: int = 10,
    seed: int = 0,
    risk_target: np.ndarray | None = None,
    worker: np.ndarray | None = None,
    projection: str = "pca",
    basis_z: np.ndarray | None = None,
    basis_risk_target: np.ndarray | None = None,
    basis_name: str | None = None,
) -> dict[str, Any]:
    """Judge a buffer against the seed's acceptance criteria and the kernel's health.

    Args:
        z: [N, d] stored z's in arrival order (oldest first).
        soft_bind, lambda_bind: [N] the matching episode fields.
        queries: the recorded queries in arrival order: ``{"risk", "wsum", "n_eff"}`` [Q]
            each (``QueryLog.snapshot()``), or a bare risk array [Q] (then the kernel
            criterion has nothing to judge).
        min_size: the memory's min_size; every verdict is None below ``2 * min_size`` episodes.
        sigma, k: the memory's kernel settings, quoted in the kernel reading.
        thresholds: verdict thresholds.
        sample: each kNN computation uses a seeded subsample of at most this many z's.
        neighbors: k for the k-NN distances (fewer when the sample is smaller).
        seed: seeds the subsamples and the Gaussian references; same inputs, same result.
        risk_target: [N] the stored risk targets, when known: convergence asks whether they
            get worse, and their spread sets the scale of every "worse".
        worker: [N] each episode's worker name, when known: convergence also asks whether any
            one worker's risk targets get worse, and reliability whether the workers' z's
            share one space (``workers``: if each z's neighbours are its own worker's, the
            readings say that the workers' z spaces don't line up).
        projection, basis_z, basis_risk_target, basis_name: the 2-D map that density, the
            islands and convergence's clustering are judged on, as the pictures draw it: the
            PCA ("pca", the default) or the risk projection ("risk": a first axis that best
            predicts the risk target, the leading principal component orthogonal to it) of the
            buffer, or of another buffer ``basis_z`` [M, d] (with its risk targets [M] for
            "risk"), named ``basis_name`` in the readings. By default the PCA of the whole buffer,
            with the map's axes and signs (``projection.pca_axes``).

    Returns:
        ``{"size": N, "criteria": [density, reliability, convergence, kernel]}``, each
        ``{"name", "passed": bool | None, "values": {...}, "reading": str}``. Values that
        cannot be computed (too few points, constant inputs) are None. The query-based parts
        (risk level, spikes, kernel) are None below 100 recorded queries; convergence then
        rests on its clustering part alone.

    Raises:
        ValueError: z is not [N, d], the field or query column lengths differ, an unknown
            projection, or the risk projection without risk targets.
    """
    z = _as_matrix(z)
    soft = np.asarray(soft_bind, dtype=np.float64).ravel()
    lam = np.asarray(lambda_bind, dtype=np.float64).ravel()
    n = z.shape[0]
    if soft.size != n or lam.size != n:
        raise ValueError(f"z has {n} rows but soft_bind {soft.size}, lambda_bind {lam.size}")
    q = _queries(queries)
    need = 2 * min_size
    judge = n > 0 and n >= need
    t = thresholds

    rt = None if risk_target is None else np.asarray(risk_target, dtype=np.float64).ravel()
    if rt is not None and rt.size != n:
        raise ValueError(f"z has {n} rows but risk_target {rt.size}")
    idx = _sample(n, sample, np.random.default_rng(seed))
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    plane = _plane(z, rt, projection, basis_z, basis_risk_target, basis_name)
    if worker is not None and np.asarray(worker).size != n:
        raise ValueError(f"z has {n} rows but worker {np.asarray(worker).size}")
    geo = _geometry(z[idx].astype(np.float64), neighbors, seed, plane)
    density = _density_criterion(geo, idx.size, judge, n, need, t)
    reliability = _reliability_criterion(
        geo, soft[idx], lam[idx], judge, n, need, t, None if worker is None else np.asarray(worker)[idx]
    )
    # The seed's cross-readings go on the criterion that failed.
    if density["passed"] is True and reliability["passed"] is False:
        reliability["reading"] += f"; {READING_1_WITHOUT_2}"
    if reliability["passed"] is True and density["passed"] is False:
        density["reading"] += f"; {READING_2_WITHOUT_1}"
    if (reliability["values"]["workers"] or {}).get("separated"):
        density["reading"] += (
            "; the workers' z spaces don't line up (see reliability): the islands may be the "
            "workers, not what they do"
        )
    # The "gets worse" tests read the episodes in arrival order: a seeded subsample of at most
    # SERIES_SAMPLE keeps their order and bounds the work on a big buffer.
    series = _sample(n, SERIES_SAMPLE, np.random.default_rng([seed, 3]))
    risk = q["risk"]
    assert risk is not None  # _queries always fills it
    convergence = _convergence_criterion(
        geo,
        risk,
        judge,
        n,
        need,
        t,
        None if rt is None else rt[series],
        None if worker is None else np.asarray(worker)[series],
    )
    kernel = _kernel_criterion(geo, q, judge, n, need, t, sigma, k, None if rt is None else rt[idx], seed)
    return {"size": int(n), "criteria": [density, reliability, convergence, kernel]}
