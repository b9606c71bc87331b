"""PNG pictures of a memory: the seed's 2×2 PCA map, the arrival-order trail, the query risk.

Pure functions from numpy arrays to PNG bytes. Each call builds its own
``matplotlib.figure.Figure`` on an Agg canvas and drops it, so nothing global is kept
(pyplot is never imported: its figure registry leaks in a server). The same inputs give
byte-identical PNGs: the only varying PNG metadata (the Matplotlib version) is stripped.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .diagnostics import spike_threshold

MAP_SIZE = (12.0, 10.0)
"""Map and trail figure size in inches (the seed's), 1200×1000 px at 100 dpi."""
RISK_SIZE = (12.0, 5.0)
"""Risk-over-queries figure size in inches."""


_SVD_MAX_ENTRIES = 1 << 22
"""Above this many entries in a tall z, the basis comes from the d×d scatter matrix."""
_CHUNK_ROWS = 1 << 16


def _pca(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [d], sign-fixed components [2, d] and their variance fractions [2] of z [N, d]."""
    z = np.asarray(z)
    if z.ndim != 2:
        if z.size:
            raise ValueError(f"z must be [N, d], got shape {z.shape}")
        z = z.reshape(0, 0)
    n, d = z.shape
    mean = z.mean(axis=0, dtype=np.float64) if n else np.zeros(d)
    comps = np.zeros((2, d))
    frac = np.zeros(2)
    if n == 0 or d == 0:
        return mean, comps, frac
    if n <= d or n * d <= _SVD_MAX_ENTRIES:
        _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
        var = s**2
    else:
        # A big buffer: the same right singular vectors as eigenvectors of Xcᵀ Xc, summed
        # in chunks so neither U nor a float64 copy of the buffer is ever held.
        scatter = np.zeros((d, d))
        for i in range(0, n, _CHUNK_ROWS):
            xc = z[i : i + _CHUNK_ROWS] - mean
            scatter += xc.T @ xc
        w, v = np.linalg.eigh(scatter)
        var, vt = np.maximum(w[::-1], 0.0), v[:, ::-1].T
    total = float(var.sum())
    # Directions without variance (beyond the data's rank) are arbitrary: leave them zero.
    real = np.sqrt(var[:2]) > np.sqrt(var[0]) * max(n, d) * np.finfo(np.float64).eps
    for k in np.flatnonzero(real):
        comps[k] = vt[k]
        frac[k] = var[k] / total
        # Singular vectors are defined up to sign; pin it so pictures never flip.
        if comps[k, np.argmax(np.abs(comps[k]))] < 0:
            comps[k] *= -1
    return mean, comps, frac


def pca_basis(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of z [N, d] by numpy SVD of the centred data (seed §4.2).

    Returns (mean [d], components [2, d]) in float64; project with
    ``(z - mean) @ components.T``. Each component's largest-magnitude entry is positive.
    A component the data has no variance along (d = 1, N ≤ 2, all points equal) is zeros;
    N = 0 gives a zero mean. For a big tall z (over 2²² entries) the same axes come from
    the eigenvectors of the d×d scatter matrix, accumulated in chunks to bound memory.

    Raises:
        ValueError: z is neither [N, d] nor empty.
    """
    mean, comps, _ = _pca(z)
    return mean, comps


def _sample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of ≤ max_points of range(n)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _figure(size: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _message(size: tuple[float, float], dpi: int, title: str, message: str) -> bytes:
    """A picture of the usual size that says ``message`` instead of drawing data."""
    fig = _figure(size, dpi)
    fig.suptitle(title)
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=18, color="0.4")
    return _png(fig, dpi)


def _episodes(n: int) -> str:
    return f"{n} episode{'' if n == 1 else 's'}"


def _pc_labels(ax: Axes, frac: np.ndarray) -> None:
    ax.set_xlabel(f"PC1 ({frac[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({frac[1]:.1%} of variance)")


def _robust_limits(c: np.ndarray) -> tuple[float, float, str]:
    """1st–99th percentile colour limits, so a few outliers (log(0 + eps) = −18) don't wash
    out the scale, and the colour bar's ``extend`` that marks what was clipped."""
    lo, hi = (float(v) for v in np.percentile(c, [1, 99]))
    if lo == hi:
        lo, hi = float(c.min()), float(c.max())
    if lo == hi:
        return lo - 0.5, hi + 0.5, "neither"
    low, high = bool(c.min() < lo), bool(c.max() > hi)
    return lo, hi, {(0, 0): "neither", (1, 0): "min", (0, 1): "max", (1, 1): "both"}[low, high]


def render_map(
    z: np.ndarray,
    soft_bind: np.ndarray,
    cone_vol: np.ndarray,
    lambda_bind: np.ndarray,
    risk_target: np.ndarray,
    *,
    title: str,
    max_points: int = 5000,
    seed: int = 0,
    dpi: int = 100,
    eps: float = 1e-8,
) -> bytes:
    """The seed's 2×2 PCA map of the buffer, as PNG bytes (12×10 in at ``dpi``).

    z is [N, d]; the other arrays are [N]. The PCA basis is ``pca_basis(z)`` of the whole
    buffer (the trail uses the same); at most ``max_points`` points are drawn, a seeded
    subsample (``default_rng(seed)``, without replacement, in arrival order). Panels are
    coloured by soft_bind, log(cone_vol + eps), lambda_bind and the risk target. With
    fewer than 2 episodes the picture says so.

    Raises:
        ValueError: max_points < 1.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be ≥ 1, got {max_points}")
    z = np.asarray(z)
    n = z.shape[0] if z.ndim == 2 else 0
    if n < 2:
        return _message(MAP_SIZE, dpi, title, f"no map yet ({_episodes(n)})")
    mean, comps, frac = _pca(z)
    idx = _sample(n, max_points, seed)
    xy = (z[idx] - mean) @ comps.T
    panels = [
        ("soft_bind", np.asarray(soft_bind)[idx].astype(np.float64)),
        ("log(cone_vol)", np.log(np.asarray(cone_vol)[idx].astype(np.float64) + eps)),
        ("lambda_bind", np.asarray(lambda_bind)[idx].astype(np.float64)),
        ("risk (regularizer target)", np.asarray(risk_target)[idx].astype(np.float64)),
    ]
    fig = _figure(MAP_SIZE, dpi)
    shown = f"{idx.size} of {n} shown" if idx.size < n else f"all {n} shown"
    fig.suptitle(f"{title}\n{shown}")
    for ax, (name, c) in zip(fig.subplots(2, 2).ravel(), panels, strict=True):
        lo, hi, extend = _robust_limits(c)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=c, s=10, alpha=0.5, vmin=lo, vmax=hi, lw=0)
        fig.colorbar(sc, ax=ax, label=name, extend=extend)
        ax.set_title(f"z-memory: {name}")
        _pc_labels(ax, frac)
    return _png(fig, dpi)


def render_trail(
    z: np.ndarray,
    *,
    last: int = 1000,
    title: str,
    max_points: int = 5000,
    seed: int = 0,
    dpi: int = 100,
) -> bytes:
    """The last ``last`` z's as a time-coloured path over the buffer's density, PNG bytes.

    z is [N, d], the whole buffer in arrival order. The PCA basis is ``pca_basis(z)`` of the
    whole buffer, as on the map. The grey background is a log-scaled hexbin density of the
    points the map draws (the same seeded subsample of ≤ ``max_points``); on it, the last
    ``min(last, N)`` z's as a faint line through points coloured by arrival order, start and
    end marked. Fewer than 2 episodes: the picture says so.

    Raises:
        ValueError: last < 1 or max_points < 1.
    """
    if last < 1 or max_points < 1:
        raise ValueError(f"last and max_points must be ≥ 1, got {last} and {max_points}")
    z = np.asarray(z)
    n = z.shape[0] if z.ndim == 2 else 0
    if n < 2:
        return _message(MAP_SIZE, dpi, title, f"no trail yet ({_episodes(n)})")
    mean, comps, frac = _pca(z)
    bg = (z[_sample(n, max_points, seed)] - mean) @ comps.T
    m = min(last, n)
    trail = (z[n - m :] - mean) @ comps.T
    order = np.arange(n - m, n)

    fig = _figure(MAP_SIZE, dpi)
    fig.suptitle(f"{title}\nlast {m} of {n} episodes in arrival order")
    ax = fig.subplots()
    extent = _extent(np.vstack([bg, trail]))
    hb = ax.hexbin(bg[:, 0], bg[:, 1], gridsize=60, bins="log", cmap="Greys", mincnt=1, extent=extent)
    fig.colorbar(hb, ax=ax, label=f"buffer density (points per cell, {bg.shape[0]} sampled)")
    ax.plot(trail[:, 0], trail[:, 1], color="tab:blue", lw=0.5, alpha=0.2, zorder=2)
    sc = ax.scatter(trail[:, 0], trail[:, 1], c=order, cmap="plasma", s=12, lw=0, alpha=0.85, zorder=3)
    fig.colorbar(sc, ax=ax, label="arrival order (index in buffer, oldest = 0)")
    marks: dict[str, Any] = {"s": 160, "edgecolors": "black", "linewidths": 1.2, "zorder": 4}
    ax.scatter(trail[0, 0], trail[0, 1], marker="o", c="white", label="start", **marks)
    ax.scatter(trail[-1, 0], trail[-1, 1], marker="*", c="red", label="end (newest)", **marks)
    ax.legend(loc="upper right")
    ax.set_title("z trail over the buffer's density")
    _pc_labels(ax, frac)
    return _png(fig, dpi)


def _extent(xy: np.ndarray) -> tuple[float, float, float, float]:
    """Hexbin extent covering xy [n, 2] with a margin, never degenerate."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    pad = np.maximum((hi - lo) * 0.05, 1e-6)
    return (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])


def render_risk(risk: np.ndarray, *, title: str, mad_k: float = 5.0, dpi: int = 100) -> bytes:
    """Kernel risk of the recorded queries over query index, as PNG bytes (12×5 in at dpi).

    risk is [Q] in arrival order. Spikes (risk > median + mad_k·MAD of the whole series,
    the diagnostics' definition) are red; the median and the threshold are horizontal
    lines; a vertical line splits the older and newer halves that the convergence
    criterion compares, with each half's spike rate. Empty: the picture says so.
    """
    r = np.asarray(risk, dtype=np.float64).ravel()
    q = r.size
    if q == 0:
        return _message(RISK_SIZE, dpi, title, "no recorded queries yet")
    thr = spike_threshold(r, mad_k)
    assert thr is not None
    med = float(np.median(r))
    x = np.arange(q)
    spikes = r > thr

    fig = _figure(RISK_SIZE, dpi)
    fig.suptitle(title)
    ax = fig.subplots()
    ax.plot(x, r, color="tab:blue", lw=0.7, alpha=0.8, label="risk of a recorded query")
    ax.axhline(med, color="0.3", ls="--", lw=1, label=f"median {med:.3g}")
    ax.axhline(thr, color="tab:red", ls=":", lw=1, label=f"median + {mad_k:g}·MAD = {thr:.3g}")
    ax.scatter(
        x[spikes],
        r[spikes],
        color="tab:red",
        s=18,
        zorder=3,
        label=f"spikes: {int(spikes.sum())} ({spikes.mean():.1%})",
    )
    h = q // 2
    if h:
        ax.axvline(h - 0.5, color="0.6", lw=1)
        rates = (spikes[:h].mean(), spikes[h:].mean())
        for xpos, name, rate in ((0.25, "older half", rates[0]), (0.75, "newer half", rates[1])):
            ax.text(
                xpos,
                0.97,
                f"{name}: {rate:.1%} spikes",
                transform=ax.transAxes,
                ha="center",
                va="top",
                color="0.35",
                bbox={"fc": "white", "ec": "none", "alpha": 0.8},
            )
    ax.set_xlim(-0.5, q - 0.5)
    ax.set_xlabel(f"recorded query (oldest = 0, {q} kept)")
    ax.set_ylabel("kernel risk")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _png(fig, dpi)
