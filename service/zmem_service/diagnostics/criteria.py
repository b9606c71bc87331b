"""The seed's acceptance criteria and a kernel check, as numbers with a verdict each (SPEC §6).

Pure functions over numpy arrays; kNN by exact ``faiss.knn`` on a seeded subsample, on a
2-D map: the sample's own PCA-2 projection by default (the picture the seed's criteria talk
about), or the map a picture is drawn on (another buffer's basis, the risk projection of
``projection``).

1. *density*: mean k-NN distance of the projected buffer vs. a Gaussian sample with the
   same mean, covariance and count (ratio < 1 = clumpier than a blob); the full-d ratio and
   the fraction of variance in the map's two axes as extra values.
2. *reliability*: Spearman ρ of local density (1 / mean distance to the k nearest, full d)
   with ``soft_bind`` (expect > 0) and with ``lambda_bind`` (expect < 0); and, when the map
   shows at least two islands (``islands.find_islands``), each island's size and mean
   soft_bind / lambda_bind. With islands the verdict asks whether any island is reliable
   (mean soft_bind ≥ 0.5) and names them, so a correlation carried by the sparse
   exploration between unreliable islands no longer passes. Without islands the densest
   quarter must also bind well in absolute terms, beyond noise, not only correlate.
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
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from zmem_core.kernel import GUARD

from . import slope, trends
from .islands import find_islands
from .projection import PROJECTIONS, risk_basis

SERIES_SAMPLE = 50_000
"""At most this many episodes (a seeded subsample in arrival order) feed convergence's tests."""
MIN_RECORDED_QUERIES = 100
"""Below this many recorded queries the query-based parts (level, spikes, kernel) are null."""

READING_1_WITHOUT_2 = "(1) without (2): memory isn't aligned with your reliability measure"
READING_2_WITHOUT_1 = "(2) without (1): z isn't being reused (KL too high, or actor too stochastic)"


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
    highest group's (the seed's "high soft_bind and/or low lambda_bind")."""
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


def _project2(x: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The PCA-2 projection of x [n, d] → ([n, 2], fraction of variance in the 2 PCs)."""
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    xy = np.zeros((x.shape[0], 2))
    m = min(2, vt.shape[0])
    xy[:, :m] = (x - mean) @ vt[:m].T
    total = float((s**2).sum())
    return xy, (float((s[:2] ** 2).sum()) / total if total > 0 else None)


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
    thresholds: Thresholds = Thresholds(),
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
            one worker's risk targets get worse.
        projection, basis_z, basis_risk_target, basis_name: the 2-D map that density, the
            islands and convergence's clustering are judged on, as the pictures draw it: the
            PCA ("pca", the default) or the risk projection ("risk": a first axis that best
            predicts the risk target, the leading principal component orthogonal to it) of the
            buffer, or of another buffer ``basis_z`` [M, d] (with its risk targets [M] for
            "risk"), named ``basis_name`` in the readings. By default the PCA of the sample.

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
    geo = _geometry(z[idx].astype(np.float64), neighbors, seed, plane)
    density = _density_criterion(geo, idx.size, judge, n, need, t)
    reliability = _reliability_criterion(geo, soft[idx], lam[idx], judge, n, need, t)
    # The seed's cross-readings go on the criterion that failed.
    if density["passed"] is True and reliability["passed"] is False:
        reliability["reading"] += f"; {READING_1_WITHOUT_2}"
    if reliability["passed"] is True and density["passed"] is False:
        density["reading"] += f"; {READING_2_WITHOUT_1}"
    if worker is not None and np.asarray(worker).size != n:
        raise ValueError(f"z has {n} rows but worker {np.asarray(worker).size}")
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


@dataclass(frozen=True)
class _Plane:
    """A fixed 2-D map: xy = (z − mean) @ axes.T; `where` names it in readings."""

    mean: np.ndarray
    axes: np.ndarray
    frac: float | None
    where: str


def _plane(
    z: np.ndarray,
    rt: np.ndarray | None,
    projection: str,
    basis_z: np.ndarray | None,
    basis_rt: np.ndarray | None,
    basis_name: str | None,
) -> _Plane | None:
    """The map the criteria are judged on, when it is not the sample's own PCA (None)."""
    if projection == "pca" and basis_z is None:
        return None
    src, target = (z, rt) if basis_z is None else (np.asarray(basis_z), basis_rt)
    if src.ndim != 2 or (z.size and src.shape[1] != z.shape[1]):
        raise ValueError(f"basis_z must be [M, {z.shape[1] if z.ndim == 2 else 'd'}], got {src.shape}")
    of = f" of {basis_name!r}" if basis_name else (" of the basis" if basis_z is not None else "")
    if projection == "risk":
        if target is None:
            raise ValueError("the risk projection needs the risk targets of its basis")
        mean, axes, _ = risk_basis(src, target)
        where = f"risk map{of} (risk axis, PC ⊥)"
    else:
        mean, axes, _ = _pca_axes(src)
        where = f"PC{of}"
    centred = np.asarray(z, dtype=np.float64) - np.asarray(z, dtype=np.float64).mean(axis=0) if z.size else z
    total = float((centred**2).sum()) if z.size else 0.0
    frac = float(((centred @ axes.T) ** 2).sum() / total) if total > 0 else None
    return _Plane(mean, axes, frac, where)


def _pca_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [d], the two leading principal axes [2, d] (sign-pinned, zeros past the rank) and
    their variance fractions [2] of x [M, d], through the d×d scatter matrix."""
    mean = x.mean(axis=0, dtype=np.float64)
    xc = x - mean
    vals, vecs = np.linalg.eigh(xc.T @ xc)
    vals, vecs = np.maximum(vals[::-1], 0.0), vecs[:, ::-1]
    axes = np.zeros((2, x.shape[1]))
    total = float(vals.sum())
    for k in range(min(2, vecs.shape[1])):
        if vals[k] > total * 1e-12:
            a = vecs[:, k]
            axes[k] = a if a[np.argmax(np.abs(a))] >= 0 else -a
    return mean, axes, (vals[:2] / total if total > 0 else np.zeros(2))


def _geometry(x: np.ndarray, neighbors: int, seed: int, plane: _Plane | None = None) -> dict[str, Any] | None:
    """What the criteria share, for the sampled rows x [n, d] (arrival order) on the 2-D map
    `plane` (None: the sample's own PCA); None if n < 2."""
    n, d = x.shape
    if n < 2 or d == 0:
        return None
    kk = min(neighbors, n - 1)
    if plane is None:
        xy, frac = _project2(x)
    else:
        xy, frac = (x - plane.mean) @ plane.axes.T, plane.frac
    full_local, full_mean, full_ref, full_ratio = _ratio(x, _Blob(x, seed), kk)
    blob2 = _Blob(xy, seed)
    _, mean2, ref2, ratio2 = _ratio(xy, blob2, kk)
    return {
        "x": x,
        "xy": xy,
        "k": kk,
        "blob2": blob2,
        "local_mean_distance": full_local,
        "ratio": ratio2,
        "mean_knn_distance": mean2,
        "gaussian_mean_knn_distance": ref2,
        "full_d_ratio": full_ratio,
        "full_d_mean_knn_distance": full_mean,
        "full_d_gaussian_mean_knn_distance": full_ref,
        "pc2_variance_fraction": frac,
        "where": "PC" if plane is None else plane.where,
    }


def _density_criterion(
    geo: dict[str, Any] | None, sampled: int, judge: bool, n: int, need: int, t: Thresholds
) -> dict[str, Any]:
    v = geo or {}
    ratio, full, frac = (_float(v.get(key)) for key in ("ratio", "full_d_ratio", "pc2_variance_fraction"))
    passed = None if not judge or ratio is None else ratio < t.density_ratio
    said = (
        f"on the {'PCA map' if v.get('where', 'PC') == 'PC' else v['where']}, k-NN distances are "
        f"{_fmt(ratio)}× a same-covariance Gaussian's "
        f"(full d: {_fmt(full)}×; the map holds {_fmt(frac, '.0%')} of the variance)"
    )
    if passed is None:
        reading = _too_little(n, need)
    elif passed:
        reading = f"islands, not a blob: {said} (passes below {t.density_ratio})"
    else:
        reading = f"a blob, no islands: {said} (needs < {t.density_ratio})"
    return {
        "name": "density",
        "passed": passed,
        "values": {
            "ratio": ratio,
            "mean_knn_distance": _float(v.get("mean_knn_distance")),
            "gaussian_mean_knn_distance": _float(v.get("gaussian_mean_knn_distance")),
            "full_d_ratio": full,
            "full_d_mean_knn_distance": _float(v.get("full_d_mean_knn_distance")),
            "full_d_gaussian_mean_knn_distance": _float(v.get("full_d_gaussian_mean_knn_distance")),
            "pc2_variance_fraction": frac,
            "sample": int(sampled),
            "neighbors": v.get("k"),
            "threshold": float(t.density_ratio),
            "required_size": int(need),
        },
        "reading": reading,
    }


def _island_table(xy: np.ndarray, soft: np.ndarray, lam: np.ndarray, t: Thresholds) -> list[dict[str, Any]]:
    labels = find_islands(xy)
    table = []
    groups = [labels == i for i in range(int(labels.max()) + 1 if labels.size else 0)]
    means = [float(soft[g].mean()) for g in [*groups, labels < 0] if g.any()]
    floor = min(means) if means else 0.0
    lam_means = [float(lam[g].mean()) for g in [*groups, labels < 0] if g.any()]
    lam_worst = max(lam_means) if lam_means else 0.0
    for i, on in enumerate(groups):
        centre = xy[on].mean(axis=0)
        table.append(
            {
                "island": i + 1,
                "size": int(on.sum()),
                "fraction": float(on.mean()),
                "pc1": float(centre[0]),
                "pc2": float(centre[1]),
                "soft_bind": _float(soft[on].mean()),
                "lambda_bind": _float(lam[on].mean()),
                # Clearly better than the least reliable points, or than a coin flip when
                # everything binds well: random soft_bind (all groups ≈ 0.5) never qualifies.
                "reliable": bool(
                    soft[on].mean()
                    >= max(t.reliable_soft_bind, min(floor, t.reliable_soft_bind) + t.reliable_margin)
                    or (lam_worst > 0 and lam[on].mean() <= t.reliable_lambda_fraction * lam_worst)
                ),
            }
        )
    outside = labels < 0
    table.append(
        {
            "island": None,  # the sparse points between the islands
            "size": int(outside.sum()),
            "fraction": float(outside.mean()) if labels.size else 0.0,
            "soft_bind": _float(soft[outside].mean()) if outside.any() else None,
            "lambda_bind": _float(lam[outside].mean()) if outside.any() else None,
        }
    )
    return table


def _describe(island: dict[str, Any], where: str = "PC") -> str:
    return (
        f"#{island['island']} at {where} ({island['pc1']:.2g}, {island['pc2']:.2g}), "
        f"{island['fraction']:.0%} of the points: soft_bind {_fmt(island['soft_bind'])}, "
        f"lambda_bind {_fmt(island['lambda_bind'])}"
    )


def _densest_quarter(
    density: np.ndarray, soft: np.ndarray, lam: np.ndarray, t: Thresholds
) -> dict[str, Any] | None:
    """The densest quarter of the points against the rest: mean soft_bind and lambda_bind of
    each, and whether the quarter binds well (mean soft_bind ≥ reliable_soft_bind and above the
    rest's by ≥ reliable_margin and floor_z standard errors, or mean lambda_bind below the
    rest's by ≥ dense_lambda_drop of it and floor_z standard errors). None below 8 points."""
    n = density.size
    if n < 8:
        return None
    order = np.argsort(-density, kind="stable")
    top, rest = order[: n // 4], order[n // 4 :]

    def gap(x: np.ndarray) -> tuple[float, float, float]:
        a, b = x[top], x[rest]
        se = float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
        return float(a.mean()), float(b.mean()), se

    s_top, s_rest, s_se = gap(soft)
    l_top, l_rest, l_se = gap(lam)
    by_soft = (
        s_top >= t.reliable_soft_bind
        and s_top - s_rest >= t.reliable_margin
        and s_top - s_rest >= t.floor_z * s_se
    )
    by_lambda = (
        l_rest > 0 and l_rest - l_top >= t.dense_lambda_drop * l_rest and l_rest - l_top >= t.floor_z * l_se
    )
    return {
        "soft_bind": _float(s_top),
        "rest_soft_bind": _float(s_rest),
        "soft_bind_se": _float(s_se),
        "lambda_bind": _float(l_top),
        "rest_lambda_bind": _float(l_rest),
        "lambda_bind_se": _float(l_se),
        "passed": bool(by_soft or by_lambda),
    }


def _dense_text(dense: dict[str, Any] | None, t: Thresholds) -> str:
    if dense is None:
        return "too few points to compare the densest quarter"
    return (
        f"the densest quarter binds with soft_bind {_fmt(dense['soft_bind'])} vs "
        f"{_fmt(dense['rest_soft_bind'])} elsewhere (± {_fmt(dense['soft_bind_se'], '.2g')}; needs ≥ "
        f"{t.reliable_soft_bind} and ≥ {t.reliable_margin} more) and lambda_bind "
        f"{_fmt(dense['lambda_bind'])} vs {_fmt(dense['rest_lambda_bind'])} (± "
        f"{_fmt(dense['lambda_bind_se'], '.2g')}; or ≥ {t.dense_lambda_drop:.0%} less)"
    )


def _reliability_criterion(
    geo: dict[str, Any] | None,
    soft: np.ndarray,
    lam: np.ndarray,
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
) -> dict[str, Any]:
    rho_soft = rho_lam = None
    table: list[dict[str, Any]] = []
    dense: dict[str, Any] | None = None
    if geo is not None:
        m = geo["local_mean_distance"]
        # Exact duplicates have infinite density; ranks only need the order.
        local_density = np.where(m > 0, 1.0 / np.where(m > 0, m, 1.0), np.inf)
        rho_soft = spearman(local_density, soft)
        rho_lam = spearman(local_density, lam)
        table = _island_table(geo["xy"], soft, lam, t)
        dense = _densest_quarter(local_density, soft, lam, t)
    islands, outside = table[:-1], (table[-1] if table else None)
    rho_ok = (rho_soft is not None and rho_soft >= t.reliability_rho) or (
        rho_lam is not None and rho_lam <= -t.reliability_rho
    )
    rhos = f"ρ(density, soft_bind) = {_fmt(rho_soft)}, ρ(density, lambda_bind) = {_fmt(rho_lam)}"
    where = geo["where"] if geo is not None else "PC"
    reliable = [i for i in islands if i["reliable"]]
    passed: bool | None = None
    if not judge or (rho_soft is None and rho_lam is None and len(islands) < 2):
        reading = _too_little(n, need) if not judge else f"nothing to correlate: {rhos}"
    elif len(islands) >= 2:
        # The map shows islands: they, not the sparse points between them, must carry reliability.
        passed = bool(reliable)
        between = (
            f"; between them ({outside['fraction']:.0%} of the points) soft_bind {_fmt(outside['soft_bind'])}"
            if outside and outside["size"]
            else ""
        )
        share = sum(i["fraction"] for i in reliable)
        rule = (
            f"mean soft_bind ≥ {t.reliable_soft_bind} and ≥ {t.reliable_margin} above "
            f"the least reliable points or above {t.reliable_soft_bind}, or mean lambda_bind ≤ "
            f"{t.reliable_lambda_fraction:g}× the highest group's"
        )
        if passed:
            alike = len(reliable) == len(islands) and (
                outside is None or not outside["size"] or outside["soft_bind"] >= t.reliable_soft_bind
            )
            reading = (
                f"{len(reliable)} of {len(islands)} islands are reliable ({rule}), holding "
                f"{share:.0%} of the points: "
                + "; ".join(_describe(i, where) for i in reliable)
                + f"{between}; {rhos}"
                + ("; every region binds alike, so the map doesn't single out reliable ones" if alike else "")
            )
        else:
            best = max(islands, key=lambda i: i["soft_bind"] or 0.0)
            reading = (
                f"none of the {len(islands)} islands is reliable (needs {rule}); "
                f"the best is {_describe(best, where)}{between}; {rhos}"
            )
    else:
        # No islands: the rank correlation must hold, and the densest quarter must bind well in
        # absolute terms (a correlation alone passes a buffer where nothing binds well).
        floor_ok = bool(dense is not None and dense["passed"])
        passed = rho_ok and floor_ok
        floor_text = _dense_text(dense, t)
        if passed:
            reading = (
                f"dense regions carry reliability: {rhos}; {floor_text} (no separate islands on the map)"
            )
        elif rho_ok:
            reading = (
                f"dense regions are not reliable: {floor_text}, though {rhos} "
                "(no separate islands on the map)"
            )
        else:
            reading = (
                f"density is not tied to reliability: {rhos} "
                f"(needs ≥ {t.reliability_rho} or ≤ {-t.reliability_rho}); {floor_text}"
            )
    return {
        "name": "reliability",
        "passed": passed,
        "values": {
            "rho_soft_bind": rho_soft,
            "rho_lambda_bind": rho_lam,
            "islands": islands,
            "outside_islands": outside,
            "reliable_islands": [i["island"] for i in reliable],
            "densest_quarter": dense,
            "sample": int(soft.size),
            "threshold": float(t.reliability_rho),
            "reliable_soft_bind": float(t.reliable_soft_bind),
            "required_size": int(need),
        },
        "reading": reading,
    }


def _convergence_criterion(
    geo: dict[str, Any] | None,
    risk: np.ndarray,
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
    risk_target: np.ndarray | None = None,
    worker: np.ndarray | None = None,
) -> dict[str, Any]:
    r_old = r_new = None
    if geo is not None and geo["xy"].shape[0] >= 4:
        xy, blob = geo["xy"], geo["blob2"]
        h = xy.shape[0] // 2
        halves = (xy[:h], xy[h : 2 * h])  # equal counts, so k-NN distances compare
        k = min(geo["k"], h - 1)
        ref = float(_knn_mean_distance(blob.sample(h), k).mean())
        if ref > 0:
            r_old, r_new = (_float(_knn_mean_distance(part, k).mean() / ref) for part in halves)
    ratio_ok = None if r_old is None or r_new is None else bool(r_new <= t.convergence_factor * r_old)

    # The scale every "gets worse" is measured in: the risk targets' 10th–90th percentile
    # range (the recorded risk's own when the risk targets are not given).
    basis = risk_target if risk_target is not None and risk_target.size >= 2 else risk
    scale = float(np.subtract(*np.percentile(basis, [90, 10]))) if basis.size >= 2 else 0.0
    scale = max(scale, 1e-12)
    effect = {"min_effect": t.min_effect, "z": t.change_z}
    tests: dict[str, trends.Change | None] = {}
    if risk_target is not None:
        tests["risk_target_trend"] = trends.trend(risk_target, scale, **effect)
        tests["risk_target_window"] = trends.window(risk_target, scale, **effect)
    q = risk.size
    judged_queries = q >= MIN_RECORDED_QUERIES
    level = None
    if judged_queries:
        tests["recorded_risk_trend"] = trends.trend(risk, scale, **effect, trim=trends.TRIM)
        found = trends.exceedances(
            risk, scale, margin=t.spike_margin, spread=t.spike_mad, min_effect=t.spike_rise, z=t.change_z
        )
        tests["spikes"], level = found if found is not None else (None, None)
    worst_worker: tuple[str, trends.Change] | None = None
    if risk_target is not None and worker is not None:
        names = np.asarray(worker).astype(str)
        for name in np.unique(names):
            mine = risk_target[names == name]
            if mine.size < t.worker_episodes:
                continue
            for test in (trends.window, trends.trend):
                c = test(mine, scale, min_effect=t.min_effect, z=t.worker_z)
                if c is not None and (worst_worker is None or _worse_first(c, worst_worker[1])):
                    worst_worker = (str(name), c)
    failing = [name for name, c in tests.items() if c is not None and c.worse]
    worker_worse = worst_worker is not None and worst_worker[1].worse
    passed: bool | None = None
    if judge and ratio_ok is not None:
        passed = ratio_ok and not failing and not worker_worse

    def said(name: str, c: trends.Change | None, what: str, share: bool = False) -> str:
        if c is None:
            return f"{what}: too short to judge"
        if share:
            return (
                f"{what} {c.before:.1%} (lowest earlier fifth) → {c.after:.1%} (newest fifth), "
                f"{_signed(c.value, '.1%')} ± {c.se:.1%} (fails from +{t.spike_rise:.0%} beyond "
                f"{t.change_z:g} SE)"
            )
        rel = c.value / scale
        z = t.worker_z if name == "worker" else t.change_z
        return (
            f"{what} {c.before:.3g} → {c.after:.3g}: {_signed(c.value, '.3g')} ± {c.se:.2g} "
            f"({_signed(rel, '.1%')} of the risk targets' range {scale:.3g}; fails from "
            f"+{t.min_effect:.0%} beyond {z:g} SE)"
        )

    parts = {
        "risk_target_window": said(
            "risk_target_window", tests.get("risk_target_window"), "risk targets, best earlier fifth → newest"
        ),
        "risk_target_trend": said(
            "risk_target_trend", tests.get("risk_target_trend"), "risk targets along the buffer (fitted line)"
        ),
        "recorded_risk_trend": said(
            "recorded_risk_trend",
            tests.get("recorded_risk_trend"),
            "recorded risk along the queries (fitted line)",
        ),
        "spikes": said(
            "spikes",
            tests.get("spikes"),
            f"recorded risk above {level:.3g} (spikes)" if level is not None else "spikes",
            share=True,
        ),
    }
    if risk_target is None:
        for key in ("risk_target_window", "risk_target_trend"):
            parts.pop(key)
    if not judged_queries:
        for key in ("recorded_risk_trend", "spikes"):
            parts.pop(key)
        parts["recorded"] = f"recorded risk not judged ({q} recorded queries, needs {MIN_RECORDED_QUERIES})"
    if worst_worker is not None:
        parts["worker"] = said("worker", worst_worker[1], f"worst worker {worst_worker[0]!r}, risk targets")
    cluster = f"projected k-NN distance {_fmt(r_old)} (older half) → {_fmt(r_new)} (newer half) of a blob's"
    if passed is None:
        reading = _too_little(n, need) if not judge else f"cannot compare the halves: {cluster}"
    elif passed:
        # A rise past the minimum effect that stays within its noise is said as such, never
        # as "not rising": this much data can't tell it from noise.
        unclear = [
            name
            for name, c in [*tests.items(), ("worker", worst_worker[1] if worst_worker else None)]
            if c is not None
            and not c.worse
            and c.value >= (t.spike_rise if name == "spikes" else t.min_effect * scale)
        ]
        verdict = (
            f"converging, though not proven safe: clustering more and no rise beyond its noise, but "
            f"{len(unclear)} of the rises below reach the minimum effect within their noise (more "
            "data would tell)"
            if unclear
            else f"converging (clustering more; no rise of {t.min_effect:.0%} of the risk targets' range "
            "or more)"
        )
        reading = f"{verdict}: {cluster}; " + "; ".join(parts.values())
    else:
        problems = []
        bad = [k for k in parts if k in failing or (k == "worker" and worker_worse)]
        if bad:
            problems.append("getting worse: " + "; ".join(parts[k] for k in bad))
        if ratio_ok is False:
            problems.append(f"not clustering more: {cluster} (needs ≤ {t.convergence_factor}×)")
        rest = [parts[k] for k in parts if k not in bad]
        reading = "; ".join(problems) + ("; also " + "; ".join(rest) if rest else "")

    def plain(c: trends.Change | None) -> dict[str, Any] | None:
        if c is None:
            return None
        return {
            "change": _float(c.value),
            "se": _float(c.se),
            "before": _float(c.before),
            "after": _float(c.after),
            "worse": c.worse,
        }

    return {
        "name": "convergence",
        "passed": passed,
        "values": {
            "older_ratio": r_old,
            "newer_ratio": r_new,
            "factor": float(t.convergence_factor),
            "recorded_queries": int(q),
            "scale": _float(scale),
            "min_effect": float(t.min_effect),
            "z": float(t.change_z),
            **{name: plain(tests.get(name)) for name in TESTS},
            "spike_level": _float(level),
            "worst_worker": None if worst_worker is None else worst_worker[0],
            "worst_worker_change": None if worst_worker is None else plain(worst_worker[1]),
            "failing": failing + (["worker"] if worker_worse else []),
            "required_size": int(need),
        },
        "reading": reading,
    }


TESTS = ("risk_target_trend", "risk_target_window", "recorded_risk_trend", "spikes")


def _worse_first(a: trends.Change, b: trends.Change) -> bool:
    """Whether change a is more alarming than b: a failing one first, then the larger rise in SEs."""
    if a.worse != b.worse:
        return a.worse
    return a.value / max(a.se, 1e-300) > b.value / max(b.se, 1e-300)


def _signed(x: float, spec: str) -> str:
    return ("+" if x >= 0 else "") + format(x, spec)


def _kernel_criterion(
    geo: dict[str, Any] | None,
    q: dict[str, np.ndarray | None],
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
    sigma: float | str | None,
    k: int | None,
    rt: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    wsum, n_eff = q["wsum"], q["n_eff"]
    recorded = 0 if wsum is None else int(wsum.size)
    reach = None
    slope_values: dict[str, Any] = dict.fromkeys(
        ("slope_share", "slope_exists", "slope_r2", "slope_sigma", "slope_share_at_suggested")
    )
    if geo is not None:
        # Queries come from the same policy as the stored z's: at σ = the RMS distance to a
        # stored z's 10th neighbour, the nearest ones weigh ≥ e^-1/2 and nothing underflows.
        kth = _kth_distance(geo["x"], geo["k"])
        reach = _float(np.sqrt(np.mean(kth**2)))
        if rt is not None and rt.size == geo["x"].shape[0] and rt.size >= 2:
            kk = int(k) if k else 64
            in_use = float(sigma) if isinstance(sigma, (int, float)) else None
            if sigma == "auto":  # the service's rule: the RMS distance to the k-th neighbour
                far = _kth_distance(geo["x"], min(kk, geo["x"].shape[0] - 1))
                in_use = float(np.sqrt(np.mean(far**2)))
            scale = float(np.subtract(*np.percentile(rt, [90, 10])))
            slope_values = slope.assess(geo["x"], rt, kk, in_use, reach, scale, seed)
            slope_values = {key: _float(v) if isinstance(v, float) else v for key, v in slope_values.items()}
    # Where the risk targets have a local slope, suggest the σ that passes it; else the reach.
    suggested = (
        slope_values["slope_sigma"] if slope_values["slope_exists"] and slope_values["slope_sigma"] else reach
    )
    values: dict[str, Any] = {
        "recent_queries": None,
        "underflow_fraction": None,
        "median_n_eff": None,
        "sigma": sigma if isinstance(sigma, str) else _float(sigma),
        "k": k,
        "suggested_sigma": suggested,
        "reach_sigma": reach,
        **slope_values,
        "wanted_slope_share": slope.WANTED_SHARE,
        "threshold": float(t.kernel_underflow),
        "guard": GUARD,
        "recorded_queries": recorded,
        "required_size": int(need),
    }
    if wsum is None or n_eff is None or recorded < MIN_RECORDED_QUERIES:
        what = (
            "no Σw recorded" if wsum is None else f"{recorded} recorded queries, needs {MIN_RECORDED_QUERIES}"
        )
        reading = _too_little(n, need) if not judge else f"too few recorded queries to judge ({what})"
        return {"name": "kernel", "passed": None, "values": values, "reading": reading}
    recent = slice(max(0, recorded - t.kernel_recent), recorded)
    w, ne = wsum[recent], n_eff[recent]
    dead = w < GUARD
    frac = float(dead.mean())
    median_n_eff = _float(np.median(ne[~dead])) if (~dead).any() else None
    values.update(recent_queries=int(w.size), underflow_fraction=frac, median_n_eff=median_n_eff)
    sig = f"sigma {sigma}" if sigma is not None else "this sigma"
    by_slope = bool(slope_values["slope_exists"] and slope_values["slope_sigma"])
    passes = slope_values["slope_share_at_suggested"] or 0.0
    why = (
        f"no stored z's kernel weights underflow and it passes {passes:.0%} of the risk targets' local slope"
        if by_slope
        else "the RMS distance to a stored z's 10th neighbour"
    )
    fix = f"set sigma ≈ {suggested:.3g} ({why})" if suggested else ""
    spread = f"median n_eff {_fmt(median_n_eff, '.1f')}" + (f" of k = {k}" if k else "")
    slope_text = ""
    if slope_values["slope_share"] is not None:
        slope_text = (
            f"; {slope_values['slope_share']:.0%} of the risk targets' local slope (a least-squares fit "
            f"over each probed z's {k or 64} neighbours) reaches the kernel's gradient at this sigma"
        )
        if not slope_values["slope_exists"]:
            slope_text += " (the risk targets barely change across a neighbourhood: no slope to pass)"
        elif slope_values["slope_share"] < slope.WANTED_SHARE and fix:
            slope_text += f"; to pass ≥ {slope.WANTED_SHARE:.0%} of it, {fix}"
    if not judge:
        return {"name": "kernel", "passed": None, "values": values, "reading": _too_little(n, need)}
    passed = bool(frac <= t.kernel_underflow)
    if passed:
        reading = (
            f"the kernel is alive: {frac:.1%} of the last {w.size} queries underflowed "
            f"(fails above {t.kernel_underflow:.0%}); {spread}{slope_text}"
        )
        if median_n_eff is not None and k and median_n_eff >= 0.9 * k:
            reading += (
                "; the weight spreads evenly over nearly all neighbours, so the risk is a plain "
                "k-NN average with a weak gradient: a smaller sigma sharpens it"
            )
    else:
        reading = (
            f"the kernel has switched off: {frac:.1%} of the last {w.size} queries had Σw < {GUARD:g} "
            f"(risk ≈ 0, no gradient; fails above {t.kernel_underflow:.0%}) with {sig}; {spread}; "
            f"{fix or 'raise sigma'}, or rescale z"
        )
    return {"name": "kernel", "passed": passed, "values": values, "reading": reading}
