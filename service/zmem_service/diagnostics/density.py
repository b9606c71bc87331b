"""Criterion 1, *density*: islands, not a blob, on the map."""

from __future__ import annotations

from typing import Any

from .common import Thresholds, _float, _fmt, _too_little


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
