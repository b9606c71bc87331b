"""The seed's acceptance criteria and a kernel check, as numbers with a verdict each (SPEC §6).

Pure functions over numpy arrays; kNN by exact ``faiss.knn`` on a seeded subsample, in the
map's own PCA-2 projection (the picture the seed's criteria talk about).

1. *density*: mean k-NN distance of the projected buffer vs. a Gaussian sample with the
   same mean, covariance and count (ratio < 1 = clumpier than a blob); the full-d ratio and
   the fraction of variance in the first two principal components as extra values.
2. *reliability*: Spearman ρ of local density (1 / mean distance to the k nearest, full d)
   with ``soft_bind`` (expect > 0) and with ``lambda_bind`` (expect < 0); and, when the map
   shows at least two islands (``islands.find_islands``), each island's size and mean
   soft_bind / lambda_bind. With islands the verdict asks whether any island is reliable
   (mean soft_bind ≥ 0.5) and names them, so a correlation carried by the sparse
   exploration between unreliable islands no longer passes.
3. *convergence*: the projected k-NN distance of the older vs. the newer half of the buffer,
   each against the same reference blob (the whole sample's Gaussian, sized like a half);
   the level (median) of the recorded query risk in the older vs. newer half of the
   queries, which must not rise; and risk spikes (outliers against a centred rolling median,
   so a level shift is not a spike), whose rate must not grow.
4. *kernel*: among the recent recorded queries, the fraction whose unnormalised weight sum
   Σw fell below the 1e-8 guard (risk ≈ 0 and no gradient), the median effective number of
   neighbours 1/Σw_norm², and the σ that would keep the nearest stored z's in reach.

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

from .islands import find_islands

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
    convergence_factor: float = 0.9
    risk_rise: float = 0.05
    """The recorded risk's median may rise by this fraction of the older half's |median|, by
    `risk_rise_spread` × the series' interquartile range, by `risk_rise_range` × the stored
    risk targets' 10th–90th percentile range, or by 3 standard errors of a half's median,
    whichever is most, before convergence fails."""
    risk_rise_spread: float = 0.25
    risk_target_rise: float = 0.02
    """The newer half of the buffer's mean risk target may exceed the older half's by this
    fraction of the risk targets' 10th–90th percentile range (or 3 standard errors)."""
    risk_rise_range: float = 0.15
    """…or by this fraction of the stored risk targets' 10th–90th percentile range (the scale
    the kernel risk lives on), when the buffer's risk targets are given."""
    spike_mad: float = 5.0
    spike_window: int = 21
    spike_rate_rise: float = 0.01
    """Spikes "increase" when the newer half's rate exceeds the older's by more than this."""
    kernel_underflow: float = 0.1
    kernel_recent: int = 1000


def rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median of x [n] over ``window`` points (fewer at the ends) → [n]."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    half = max(window, 1) // 2
    if n == 0:
        return x.copy()
    padded = np.pad(x, half, mode="constant", constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return np.asarray(np.nanmedian(windows, axis=1))


def find_spikes(risk: np.ndarray, mad_k: float = 5.0, window: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Spikes of a risk series [n]: (mask [n] bool, rolling median [n]).

    A spike sits more than ``mad_k`` MADs above the centred rolling median; the MAD is that of
    the residuals over the whole series, floored at 1e-3 · max(1, |median risk|) so that noise
    in a near-constant or underflowed (≈ 0) series is never called a spike. A level shift moves
    the rolling median with it, so it makes no spikes.
    """
    r = np.asarray(risk, dtype=np.float64).ravel()
    if r.size == 0:
        return np.zeros(0, bool), r.copy()
    base = rolling_median(r, window)
    resid = r - base
    floor = 1e-3 * max(1.0, abs(float(np.median(r))))
    mad = max(float(np.median(np.abs(resid - np.median(resid)))), floor)
    return resid > mad_k * mad, base


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
        risk_target: [N] the stored risk targets, when known: their spread sets the scale
            of what counts as the recorded risk rising.

    Returns:
        ``{"size": N, "criteria": [density, reliability, convergence, kernel]}``, each
        ``{"name", "passed": bool | None, "values": {...}, "reading": str}``. Values that
        cannot be computed (too few points, constant inputs) are None. The query-based parts
        (risk level, spikes, kernel) are None below 100 recorded queries; convergence then
        rests on its clustering part alone.

    Raises:
        ValueError: z is not [N, d], or the field or query column lengths differ.
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

    idx = _sample(n, sample, np.random.default_rng(seed))
    geo = _geometry(z[idx].astype(np.float64), neighbors, seed)
    density = _density_criterion(geo, idx.size, judge, n, need, t)
    reliability = _reliability_criterion(geo, soft[idx], lam[idx], judge, n, need, t)
    # The seed's cross-readings go on the criterion that failed.
    if density["passed"] is True and reliability["passed"] is False:
        reliability["reading"] += f"; {READING_1_WITHOUT_2}"
    if reliability["passed"] is True and density["passed"] is False:
        density["reading"] += f"; {READING_2_WITHOUT_1}"
    rt = None if risk_target is None else np.asarray(risk_target, dtype=np.float64).ravel()
    if rt is not None and rt.size != n:
        raise ValueError(f"z has {n} rows but risk_target {rt.size}")
    convergence = _convergence_criterion(geo, q["risk"], judge, n, need, t, rt)  # type: ignore[arg-type]
    kernel = _kernel_criterion(geo, q, judge, n, need, t, sigma, k)
    return {"size": int(n), "criteria": [density, reliability, convergence, kernel]}


def _geometry(x: np.ndarray, neighbors: int, seed: int) -> dict[str, Any] | None:
    """What the criteria share, for the sampled rows x [n, d] (arrival order); None if n < 2."""
    n, d = x.shape
    if n < 2 or d == 0:
        return None
    kk = min(neighbors, n - 1)
    xy, frac = _project2(x)
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
    }


def _density_criterion(
    geo: dict[str, Any] | None, sampled: int, judge: bool, n: int, need: int, t: Thresholds
) -> dict[str, Any]:
    v = geo or {}
    ratio, full, frac = (_float(v.get(key)) for key in ("ratio", "full_d_ratio", "pc2_variance_fraction"))
    passed = None if not judge or ratio is None else ratio < t.density_ratio
    said = (
        f"on the PCA map, k-NN distances are {_fmt(ratio)}× a same-covariance Gaussian's "
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


def _describe(island: dict[str, Any]) -> str:
    return (
        f"#{island['island']} at PC ({island['pc1']:.2g}, {island['pc2']:.2g}), "
        f"{island['fraction']:.0%} of the points: soft_bind {_fmt(island['soft_bind'])}, "
        f"lambda_bind {_fmt(island['lambda_bind'])}"
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
    if geo is not None:
        m = geo["local_mean_distance"]
        # Exact duplicates have infinite density; ranks only need the order.
        local_density = np.where(m > 0, 1.0 / np.where(m > 0, m, 1.0), np.inf)
        rho_soft = spearman(local_density, soft)
        rho_lam = spearman(local_density, lam)
        table = _island_table(geo["xy"], soft, lam, t)
    islands, outside = table[:-1], (table[-1] if table else None)
    rho_ok = (rho_soft is not None and rho_soft >= t.reliability_rho) or (
        rho_lam is not None and rho_lam <= -t.reliability_rho
    )
    rhos = f"ρ(density, soft_bind) = {_fmt(rho_soft)}, ρ(density, lambda_bind) = {_fmt(rho_lam)}"
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
                + "; ".join(_describe(i) for i in reliable)
                + f"{between}; {rhos}"
                + ("; every region binds alike, so the map doesn't single out reliable ones" if alike else "")
            )
        else:
            best = max(islands, key=lambda i: i["soft_bind"] or 0.0)
            reading = (
                f"none of the {len(islands)} islands is reliable (needs {rule}); "
                f"the best is {_describe(best)}{between}; {rhos}"
            )
    else:
        passed = rho_ok
        if passed:
            reading = f"dense regions carry reliability: {rhos} (no separate islands on the map)"
        else:
            reading = (
                f"density is not tied to reliability: {rhos} "
                f"(needs ≥ {t.reliability_rho} or ≤ {-t.reliability_rho})"
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
    scale = None
    outcome: dict[str, Any] = dict.fromkeys(
        ("older_risk_target", "newer_risk_target", "risk_target_tolerance")
    )
    outcome_ok = None
    if risk_target is not None and risk_target.size >= 4:
        # The episodes themselves: the newer half of the buffer must not fare worse than the older
        # (a mean risk target higher by more than 3 standard errors and a 50th of its range).
        p10, p90 = np.percentile(risk_target, [10, 90])
        scale = float(p90 - p10)
        h = risk_target.size // 2
        older, newer = risk_target[:h], risk_target[h:]
        se = float(np.sqrt(older.var() / older.size + newer.var() / newer.size))
        outcome_tol = max(3 * se, t.risk_target_rise * scale, 1e-9)
        outcome_ok = bool(newer.mean() <= older.mean() + outcome_tol)
        outcome.update(
            older_risk_target=_float(older.mean()),
            newer_risk_target=_float(newer.mean()),
            risk_target_tolerance=_float(outcome_tol),
        )

    q = risk.size
    values: dict[str, Any] = dict.fromkeys(
        (
            "older_risk_median",
            "newer_risk_median",
            "risk_rise_tolerance",
            "older_spikes",
            "newer_spikes",
            "older_spike_rate",
            "newer_spike_rate",
        )
    )
    level_ok = spikes_ok = None
    if q >= MIN_RECORDED_QUERIES:
        h = q // 2
        old, new = risk[:h], risk[h:]
        m_old, m_new = float(np.median(old)), float(np.median(new))
        mad = float(np.median(np.abs(risk - np.median(risk))))
        # 3 standard errors of a half's median (1.2533·σ/√h with σ ≈ 1.4826·MAD), a fraction
        # of the level, or a fraction of the series' spread (IQR: a level near 0 must not make
        # any wobble a rise): a steady series passes, a level that climbs does not.
        q25, q75 = np.percentile(risk, [25, 75])
        tol = max(
            t.risk_rise * abs(m_old),
            t.risk_rise_spread * float(q75 - q25),
            t.risk_rise_range * (scale or 0.0),  # a small move on the risk targets' own scale
            3 * 1.2533 * 1.4826 * mad / np.sqrt(h),
            1e-6,
        )
        level_ok = bool(m_new <= m_old + tol)
        spikes, _ = find_spikes(risk, t.spike_mad, t.spike_window)
        s_old, s_new = int(spikes[:h].sum()), int(spikes[h:].sum())
        values.update(
            older_risk_median=_float(m_old),
            newer_risk_median=_float(m_new),
            risk_rise_tolerance=_float(tol),
            older_spikes=s_old,
            newer_spikes=s_new,
            older_spike_rate=s_old / h,
            newer_spike_rate=s_new / (q - h),
        )
        spikes_ok = bool(values["newer_spike_rate"] <= values["older_spike_rate"] + t.spike_rate_rise)
    passed: bool | None = None
    if judge and ratio_ok is not None:
        passed = ratio_ok and level_ok is not False and spikes_ok is not False and outcome_ok is not False

    cluster = f"projected k-NN distance {_fmt(r_old)} (older half) → {_fmt(r_new)} (newer half) of a blob's"
    outcome_text = (
        f"mean risk target {outcome['older_risk_target']:.3g} (older half of the buffer) → "
        f"{outcome['newer_risk_target']:.3g} (newer half; may rise by {outcome['risk_target_tolerance']:.2g})"
        if outcome_ok is not None
        else ""
    )
    if level_ok is None:
        query_text = f"recorded risk not judged ({q} recorded queries, needs {MIN_RECORDED_QUERIES})"
        level_text = spike_text = query_text
    else:
        level_text = (
            f"recorded risk median {values['older_risk_median']:.3g} (older half of the queries) → "
            f"{values['newer_risk_median']:.3g} (newer half; may rise by {values['risk_rise_tolerance']:.2g})"
        )
        spike_text = (
            f"risk spikes {values['older_spike_rate']:.1%} → {values['newer_spike_rate']:.1%} "
            f"(outliers above {t.spike_mad:g} MADs over a rolling median of {t.spike_window})"
        )
    if passed is None:
        reading = _too_little(n, need) if not judge else f"cannot compare the halves: {cluster}"
    elif passed:
        judged = level_ok is not None
        faring = f"; newer episodes fare no worse: {outcome_text}" if outcome_ok is not None else ""
        reading = (
            f"converging (clustering more{', the recorded risk not rising' if judged else ''}): "
            f"{cluster}; {level_text}; {spike_text}{faring}"
        )
    else:
        problems = []
        if outcome_ok is False:
            problems.append(f"converging into risk: the newer episodes fare worse: {outcome_text}")
        if level_ok is False:
            problems.append(f"converging into risk: {level_text}")
        if ratio_ok is False:
            problems.append(f"not clustering more: {cluster} (needs ≤ {t.convergence_factor}×)")
        if spikes_ok is False:
            problems.append(f"risk spikes are not fading: {spike_text}")
        reading = "; ".join(problems)
    return {
        "name": "convergence",
        "passed": passed,
        "values": {
            "older_ratio": r_old,
            "newer_ratio": r_new,
            "factor": float(t.convergence_factor),
            "recorded_queries": int(q),
            **values,
            **outcome,
            "required_size": int(need),
        },
        "reading": reading,
    }


def _kernel_criterion(
    geo: dict[str, Any] | None,
    q: dict[str, np.ndarray | None],
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
    sigma: float | str | None,
    k: int | None,
) -> dict[str, Any]:
    wsum, n_eff = q["wsum"], q["n_eff"]
    recorded = 0 if wsum is None else int(wsum.size)
    suggested = None
    if geo is not None:
        # Queries come from the same policy as the stored z's: at σ = the RMS distance to a
        # stored z's 10th neighbour, the nearest ones weigh ≥ e^-1/2 and nothing underflows.
        kth = _kth_distance(geo["x"], geo["k"])
        suggested = _float(np.sqrt(np.mean(kth**2)))
    values: dict[str, Any] = {
        "recent_queries": None,
        "underflow_fraction": None,
        "median_n_eff": None,
        "sigma": sigma if isinstance(sigma, str) else _float(sigma),
        "k": k,
        "suggested_sigma": suggested,
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
    fix = (
        f"set sigma ≈ {suggested:.3g} (the RMS distance to a stored z's 10th neighbour)" if suggested else ""
    )
    spread = f"median n_eff {_fmt(median_n_eff, '.1f')}" + (f" of k = {k}" if k else "")
    if not judge:
        return {"name": "kernel", "passed": None, "values": values, "reading": _too_little(n, need)}
    passed = bool(frac <= t.kernel_underflow)
    if passed:
        reading = (
            f"the kernel is alive: {frac:.1%} of the last {w.size} queries underflowed "
            f"(fails above {t.kernel_underflow:.0%}); {spread}"
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
