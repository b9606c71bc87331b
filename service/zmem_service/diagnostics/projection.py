"""2-D projections of a buffer: the PCA map's, and one whose first axis predicts the risk.

The pictures and the diagnostics both take their axes from here, so a reading's coordinates
are the picture's: every axis has its sign pinned the same way (``pin_sign``).

The PCA map holds the directions z varies most in, which need not be the ones reliability
varies along (a zone's reliable and unreliable sides may lie in dimensions the map drops).
The *risk projection* puts on its first axis the ridge-regression direction that best
predicts the risk target from z, and on its second the leading principal component of what
is left orthogonal to it. Both come from the d×d scatter matrix, accumulated in chunks, so a
big buffer is never copied in float64.

    mean, axes, frac = risk_basis(z, risk_target)   # or pca_axes(z)
    xy = (z - mean) @ axes.T          # [N, 2]
"""

from __future__ import annotations

import numpy as np

PROJECTIONS = ("pca", "risk")
"""What ``?projection=`` may name: the PCA map (the default) or the risk projection."""
RIDGE = 1e-3
"""Ridge penalty as a fraction of the mean variance per dimension: keeps the fit defined
when z has fewer rows than dimensions or flat directions, and barely moves it otherwise."""
_CHUNK_ROWS = 1 << 16
_SVD_MAX_ENTRIES = 1 << 22
"""Above this many entries in a tall z, the PCA comes from the d×d scatter matrix."""


def _moments(z: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean [d], scatter Xcᵀ Xc [d, d] and Xcᵀ (y − ȳ) [d] (None without y) of z [N, d]."""
    n, d = z.shape
    mean = z.mean(axis=0, dtype=np.float64)
    scatter = np.zeros((d, d))
    cross = None if y is None else np.zeros(d)
    ym = 0.0 if y is None else float(np.mean(y))
    for i in range(0, n, _CHUNK_ROWS):
        xc = z[i : i + _CHUNK_ROWS] - mean
        scatter += xc.T @ xc
        if cross is not None and y is not None:
            cross += xc.T @ (np.asarray(y[i : i + _CHUNK_ROWS], dtype=np.float64) - ym)
    return mean, scatter, cross


def pin_sign(axis: np.ndarray) -> np.ndarray:
    """A direction [d]'s sign pinned so that its largest-magnitude entry is positive: axes
    from an SVD or an eigensolver are defined up to sign, and pictures must never flip."""
    return axis if axis[np.argmax(np.abs(axis))] >= 0 else -axis


def pca_axes(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PCA map of z [N, d]: mean [d], the two leading principal axes [2, d] (float64,
    ``pin_sign``-ed) and the fraction of z's variance along each [2].

    By numpy SVD of the centred data; for a big tall z (over 2²² entries) the same axes come
    from the eigenvectors of the d×d scatter matrix, accumulated in chunks, so neither U nor
    a float64 copy of the buffer is ever held. An axis the data has no variance along (d = 1,
    N ≤ 2, all points equal) is zeros; N = 0 gives a zero mean.

    Raises:
        ValueError: z is neither [N, d] nor empty.
    """
    z = np.asarray(z)
    if z.ndim != 2:
        if z.size:
            raise ValueError(f"z must be [N, d], got shape {z.shape}")
        z = z.reshape(0, 0)
    n, d = z.shape
    mean = z.mean(axis=0, dtype=np.float64) if n else np.zeros(d)
    axes = np.zeros((2, d))
    frac = np.zeros(2)
    if n == 0 or d == 0:
        return mean, axes, frac
    if n <= d or n * d <= _SVD_MAX_ENTRIES:
        _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
        var = s**2
    else:
        _, scatter, _ = _moments(z, None)
        w, v = np.linalg.eigh(scatter)
        var, vt = np.maximum(w[::-1], 0.0), v[:, ::-1].T
    total = float(var.sum())
    # Directions without variance (beyond the data's rank) are arbitrary: leave them zero.
    real = np.sqrt(var[:2]) > np.sqrt(var[0]) * max(n, d) * np.finfo(np.float64).eps
    for k in np.flatnonzero(real):
        axes[k] = pin_sign(vt[k])
        frac[k] = var[k] / total
    return mean, axes, frac


def risk_basis(z: np.ndarray, risk_target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The risk projection of z [N, d] with risk targets [N].

    Returns (mean [d], axes [2, d] orthonormal, fraction of z's variance along each [2]). The
    first axis points toward higher predicted risk; the second has its largest entry positive.
    Where the risk target is constant (or N < 2) the first axis is the leading principal
    component instead; an axis the data has no variance along is zeros.

    Raises:
        ValueError: z is not [N, d] or risk_target's length differs.
    """
    z = np.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"z must be [N, d], got shape {z.shape}")
    y = np.asarray(risk_target, dtype=np.float64).ravel()
    n, d = z.shape
    if y.size != n:
        raise ValueError(f"z has {n} rows but risk_target {y.size}")
    axes = np.zeros((2, d))
    frac = np.zeros(2)
    if n < 2 or d == 0:
        return (z.mean(axis=0, dtype=np.float64) if n else np.zeros(d)), axes, frac
    mean, scatter, cross = _moments(z, y)
    assert cross is not None
    total = float(np.trace(scatter))
    if total <= 0:
        return mean, axes, frac
    w = np.linalg.solve(scatter + RIDGE * total / d * np.eye(d), cross)
    norm = float(np.linalg.norm(w))
    varies = float(np.std(y)) > 1e-9 * max(1.0, float(np.abs(y).max()))  # not rounding noise
    if varies and norm > 0 and np.isfinite(norm):
        first = w / norm
    else:
        vals, vecs = np.linalg.eigh(scatter)
        first = pin_sign(vecs[:, -1])
    rest = np.eye(d) - np.outer(first, first)
    vals, vecs = np.linalg.eigh(rest @ scatter @ rest)
    second = pin_sign(vecs[:, -1]) if vals[-1] > total * 1e-12 else np.zeros(d)
    axes[0], axes[1] = first, second
    frac = np.array([float(a @ scatter @ a) / total for a in axes])
    return mean, axes, frac


def risk_fit(z: np.ndarray, risk_target: np.ndarray, axis: np.ndarray, mean: np.ndarray) -> float | None:
    """R² of the risk target [N] on z's coordinate along `axis` [d] (a straight line)."""
    y = np.asarray(risk_target, dtype=np.float64).ravel()
    if y.size < 3 or not axis.any():
        return None
    x = (np.asarray(z, dtype=np.float64) - mean) @ axis
    r = np.corrcoef(x, y)[0, 1]
    return float(r**2) if np.isfinite(r) else None
