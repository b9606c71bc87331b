"""The 2-D map the criteria are judged on, and the k-NN numbers they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import _Blob, _project2, _ratio
from .projection import risk_basis


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
