"""Criterion 2, *reliability*: the islands the map shows carry reliability."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import Thresholds, _float, _fmt, _too_little, spearman
from .islands import find_islands
from .workers import warning, worker_islands


def _least_by_soft_bind(on: np.ndarray, others: list[np.ndarray], soft: np.ndarray, t: Thresholds) -> bool:
    """Whether the group `on` binds worse than every group in `others` (boolean masks over
    soft [n]) by at least ``lambda_least_gap`` and ``floor_z`` standard errors."""
    mine = soft[on]
    for g in others:
        theirs = soft[g]
        gap = float(theirs.mean() - mine.mean())
        se = float(np.sqrt(mine.var() / mine.size + theirs.var() / theirs.size))
        if gap < t.lambda_least_gap or gap < t.floor_z * se:
            return False
    return bool(others)


def _island_table(
    xy: np.ndarray, soft: np.ndarray, lam: np.ndarray, t: Thresholds, labels: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """One row per island of the map xy [n, 2] (``find_islands``, or `labels` [n] when
    given), then one for the points between them."""
    labels = find_islands(xy) if labels is None else labels
    table = []
    groups = [labels == i for i in range(int(labels.max()) + 1 if labels.size else 0)]
    present = [g for g in [*groups, labels < 0] if g.any()]
    floor = min(float(soft[g].mean()) for g in present) if present else 0.0
    lam_worst = max(float(lam[g].mean()) for g in present) if present else 0.0
    for i, on in enumerate(groups):
        centre = xy[on].mean(axis=0)
        # Clearly better than the least reliable points, or than a coin flip when everything
        # binds well: random soft_bind (all groups ≈ 0.5) never qualifies.
        by_soft = soft[on].mean() >= max(
            t.reliable_soft_bind, min(floor, t.reliable_soft_bind) + t.reliable_margin
        )
        low_lambda = bool(lam_worst > 0 and lam[on].mean() <= t.reliable_lambda_fraction * lam_worst)
        overruled = low_lambda and _least_by_soft_bind(on, [g for g in present if g is not on], soft, t)
        table.append(
            {
                "island": i + 1,
                "size": int(on.sum()),
                "fraction": float(on.mean()),
                "pc1": float(centre[0]),
                "pc2": float(centre[1]),
                "soft_bind": _float(soft[on].mean()),
                "lambda_bind": _float(lam[on].mean()),
                "reliable": bool(by_soft or (low_lambda and not overruled)),
                # low lambda_bind, but the lowest soft_bind of all: not counted as reliable
                "lambda_overruled": bool(overruled and not by_soft),
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
    worker: np.ndarray | None = None,
) -> dict[str, Any]:
    rho_soft = rho_lam = None
    table: list[dict[str, Any]] = []
    dense: dict[str, Any] | None = None
    workers: dict[str, Any] | None = None
    if geo is not None:
        m = geo["local_mean_distance"]
        # Exact duplicates have infinite density; ranks only need the order.
        local_density = np.where(m > 0, 1.0 / np.where(m > 0, m, 1.0), np.inf)
        rho_soft = spearman(local_density, soft)
        rho_lam = spearman(local_density, lam)
        labels = find_islands(geo["xy"])
        table = _island_table(geo["xy"], soft, lam, t, labels)
        if worker is not None:
            workers = worker_islands(geo["x"], worker, labels, geo["k"])
        dense = _densest_quarter(local_density, soft, lam, t)
    islands, outside = table[:-1], (table[-1] if table else None)
    rho_ok = (rho_soft is not None and rho_soft >= t.reliability_rho) or (
        rho_lam is not None and rho_lam <= -t.reliability_rho
    )
    rhos = f"ρ(density, soft_bind) = {_fmt(rho_soft)}, ρ(density, lambda_bind) = {_fmt(rho_lam)}"
    where = geo["where"] if geo is not None else "PC"
    reliable = [i for i in islands if i["reliable"]]
    overruled = "".join(
        f"; #{i['island']} has low lambda_bind ({_fmt(i['lambda_bind'])}) but the lowest soft_bind "
        f"({_fmt(i['soft_bind'])}), as a stuck, deterministic policy has: not counted as reliable"
        for i in islands
        if i["lambda_overruled"]
    )
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
            f"{t.reliable_lambda_fraction:g}× the highest group's without the lowest soft_bind of all"
        )
        if passed:
            alike = len(reliable) == len(islands) and (
                outside is None or not outside["size"] or outside["soft_bind"] >= t.reliable_soft_bind
            )
            reading = (
                f"{len(reliable)} of {len(islands)} islands are reliable ({rule}), holding "
                f"{share:.0%} of the points: "
                + "; ".join(_describe(i, where) for i in reliable)
                + f"{between}{overruled}; {rhos}"
                + ("; every region binds alike, so the map doesn't single out reliable ones" if alike else "")
            )
        else:
            best = max(islands, key=lambda i: i["soft_bind"] or 0.0)
            reading = (
                f"none of the {len(islands)} islands is reliable (needs {rule}); "
                f"the best is {_describe(best, where)}{between}{overruled}; {rhos}"
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
    apart = warning(workers, geo["k"] if geo is not None else 0)
    if apart:
        reading = f"{apart}; {reading}"
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
            "workers": workers,
            "sample": int(soft.size),
            "threshold": float(t.reliability_rho),
            "reliable_soft_bind": float(t.reliable_soft_bind),
            "required_size": int(need),
        },
        "reading": reading,
    }
