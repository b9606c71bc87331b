"""How much of the risk targets' local slope reaches the kernel's gradient, and which σ passes it.

The regularizer pushes z along ∇_z risk. Where the risk targets change across a neighbourhood
(a *local slope* g: the least-squares fit of the k neighbours' risk targets on their offsets
from the query), the kernel risk's gradient should follow it. With σ much larger than the
neighbourhood the kernel is a plain k-NN average whose gradient is a small fraction of g;
with σ too small the weights underflow and nothing passes. For a probe z with neighbours
z_i (offsets D_i = z_i − z, targets r_i) and normalised weights w_i:

    ∇ risk = Σ w_i (r_i − risk) D_i / σ²        share = ∇risk · g / ‖g‖²

Probes are stored z's (the queries come from the same policy), searched against the sample
without themselves. Pure numpy and ``faiss.knn``; every number a plain float or None.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from zmem_core.kernel import GUARD

PROBES = 256
MAX_ENTRIES = 1 << 22
RIDGE = 0.1
"""The local fit's ridge penalty, as a fraction of the neighbourhood's mean squared offset:
with k ≤ d a plain fit would pass through every neighbour's noise."""
WANTED_SHARE = 0.3
MIN_R2 = 0.1
"""A local slope exists where the fits predict left-out neighbours (median leave-one-out R²
at least this) and change the target by ≥ 5% of its range across a neighbourhood."""
SIGMA_STEPS = np.sqrt(2.0) ** np.arange(-10, 7)
"""The σ's tried for a suggestion, relative to the reach σ (factors 1/32 to 8)."""


def neighbourhoods(
    x: np.ndarray, y: np.ndarray, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(offsets [P, k, d], their targets [P, k], squared distances [P, k]) of up to PROBES
    probe rows of x [n, d] (fewer when P × k × d would pass MAX_ENTRIES) to their k nearest
    other rows; None when fewer than 3 rows."""
    n = x.shape[0]
    k = min(k, n - 1)
    if k < 2:
        return None
    rng = np.random.default_rng([seed, 5])
    # offsets take P × k × d floats: fewer probes at large d (32 MiB at most, 16 probes at least)
    count = min(PROBES, n, max(16, MAX_ENTRIES // (k * x.shape[1])))
    probes = np.sort(rng.choice(n, size=count, replace=False))
    xf = np.ascontiguousarray(x, dtype=np.float32)
    _, idx = faiss.knn(xf[probes], xf, k + 1)
    own = idx == probes[:, None]
    own[~own.any(axis=1), -1] = True  # a twin ranked first: drop the farthest instead
    own &= np.cumsum(own, axis=1) == 1
    idx = idx[~own].reshape(probes.size, k)
    offsets = x[idx] - x[probes][:, None, :]
    return offsets, y[idx], (offsets**2).sum(axis=2)


def local_slopes(offsets: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge fits of targets [P, k] on offsets [P, k, d] (both centred per probe), in the dual
    form (a k×k system per probe, whatever d) → (g [P, d], leave-one-out R² [P]: how well
    each fit predicts a neighbour it was not fitted on; ≤ 0 where the slope is noise)."""
    dc = offsets - offsets.mean(axis=1, keepdims=True)
    rc = targets - targets.mean(axis=1, keepdims=True)
    gram = dc @ dc.transpose(0, 2, 1)  # [P, k, k]
    k = gram.shape[1]
    lam = RIDGE * np.trace(gram, axis1=1, axis2=2) / k
    inv = np.linalg.inv(gram + (lam[:, None, None] + 1e-300) * np.eye(k))
    alpha = np.einsum("pij,pj->pi", inv, rc)
    loo = alpha / np.diagonal(inv, axis1=1, axis2=2)  # ridge's closed-form leave-one-out residuals
    total = (rc**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total > 0, 1 - (loo**2).sum(axis=1) / total, np.nan)
    return np.asarray(np.einsum("pkd,pk->pd", dc, alpha)), r2


def shares(
    offsets: np.ndarray, targets: np.ndarray, d2: np.ndarray, g: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """(share of g passed [P] (NaN where g = 0 or the weights underflow), underflowed [P] bool)
    for the kernel at `sigma` over each probe's neighbours."""
    w = np.exp(-d2 / (2 * sigma**2))
    wsum = w.sum(axis=1)
    dead = wsum < GUARD
    wn = w / (wsum[:, None] + GUARD)
    risk = (wn * targets).sum(axis=1)
    grad = np.einsum("pk,pkd->pd", wn * (targets - risk[:, None]), offsets) / sigma**2
    gg = (g**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where((gg > 0) & ~dead, (grad * g).sum(axis=1) / gg, np.nan)
    return share, dead


def assess(
    x: np.ndarray, y: np.ndarray, k: int, sigma: float | None, reach: float | None, scale: float, seed: int
) -> dict[str, Any]:
    """The slope share at `sigma`, whether a slope exists, and a suggested σ.

    Args:
        x: [n, d] sampled stored z's; y: [n] their risk targets; k: neighbours per probe.
        sigma: the σ in use (None: unknown); reach: the σ that keeps the nearest z's in
            reach (the RMS distance to the 10th neighbour), the centre of the σ's tried.
        scale: the risk targets' 10th–90th percentile range: a slope exists where it changes
            the target by ≥ 5% of it across a typical neighbourhood.

    Returns:
        ``{"slope_share", "slope_exists", "slope_r2", "slope_sigma", "slope_share_at_suggested"}``:
        the median share at `sigma`; whether a slope exists and the fits' median leave-one-out
        R²; the σ suggested (the largest tried whose median share is
        ≥ WANTED_SHARE with no probe underflowing, or, if none reaches it, the one passing
        the most) and its share. None where it cannot be computed.
    """
    out: dict[str, Any] = dict.fromkeys(
        ("slope_share", "slope_exists", "slope_sigma", "slope_share_at_suggested")
    )
    hood = neighbourhoods(x, y, k, seed) if reach else None
    if hood is None or not reach:
        return out
    offsets, targets, d2 = hood
    g, r2 = local_slopes(offsets, targets)
    across = np.sqrt(np.median(d2, axis=1))  # a typical neighbour's distance, per probe
    change = np.linalg.norm(g, axis=1) * across
    fitted = np.isfinite(r2)
    out["slope_r2"] = float(np.median(r2[fitted])) if fitted.any() else None
    out["slope_exists"] = bool(
        scale > 0 and fitted.any() and np.median(r2[fitted]) >= MIN_R2 and np.median(change) >= 0.05 * scale
    )

    def median_share(s: float) -> tuple[float | None, bool]:
        share, dead = shares(offsets, targets, d2, g, s)
        ok = np.isfinite(share)
        return (float(np.median(share[ok])) if ok.any() else None), bool(dead.any())

    if sigma is not None and sigma > 0:
        out["slope_share"] = median_share(sigma)[0]
    tried = [(float(reach * f), *median_share(float(reach * f))) for f in SIGMA_STEPS]
    alive = [(s, sh) for s, sh, dead in tried if not dead and sh is not None]
    if alive:
        good = [(s, sh) for s, sh in alive if sh >= WANTED_SHARE]
        s, sh = max(good) if good else max(alive, key=lambda p: p[1])
        out["slope_sigma"], out["slope_share_at_suggested"] = s, sh
    return out
