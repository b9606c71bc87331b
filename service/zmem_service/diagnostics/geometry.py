"""The 2-D map the criteria are judged on, and the k-NN numbers they share.

The map is the picture's: the PCA (or risk projection) of the whole buffer, or of another
buffer's, with the same axes and signs ``map.png`` draws (``projection``), so the island
coordinates a reading quotes are the ones on the picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import _Blob, _ratio
from .projection import pca_axes, risk_basis


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
) -> _Plane:
    """The map the criteria are judged on: `projection` of z [N, d] (risk targets rt [N]), or
    of another buffer basis_z [M, d] (risk targets basis_rt [M]) named basis_name."""
    if projection == "pca" and basis_z is None:
        mean, axes, fracs = pca_axes(z)
        return _Plane(mean, axes, float(fracs.sum()) if fracs.any() else None, "PC")
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
        mean, axes, _ = pca_axes(src)
        where = f"PC{of}"
    centred = np.asarray(z, dtype=np.float64) - np.asarray(z, dtype=np.float64).mean(axis=0) if z.size else z
    total = float((centred**2).sum()) if z.size else 0.0
    frac = float(((centred @ axes.T) ** 2).sum() / total) if total > 0 else None
    return _Plane(mean, axes, frac, where)


def _geometry(x: np.ndarray, neighbors: int, seed: int, plane: _Plane) -> dict[str, Any] | None:
    """What the criteria share, for the sampled rows x [n, d] (arrival order) on the 2-D map
    `plane`; None if n < 2."""
    n, d = x.shape
    if n < 2 or d == 0:
        return None
    kk = min(neighbors, n - 1)
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
        "where": plane.where,
    }
