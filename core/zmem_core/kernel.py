"""The seed's Gaussian-kernel risk in numpy, with the numbers that say whether it is healthy.

One definition for both sides: the service answers `POST …/risk` and records queries with
it, the client's replica computes the records it posts to `POST …/queries` with it, and
the diagnostics read the guard from here. The differentiable version is the client's
`kernel_risk` (torch, the same formula and the same GUARD).
"""

from __future__ import annotations

import numpy as np

GUARD = 1e-8
"""The seed's guard in w / (Σw + 1e-8): below it, risk ≈ 0 and carries no gradient."""


def kernel_stats(
    d2: np.ndarray, risk_target: np.ndarray, sigma: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row: (risk, Σw, n_eff), float64 [B] each.

    d2, risk_target [B, k]; sigma a number, or one per row [B].
    w_i = exp(−d2_i / 2σ²); risk = Σ w_i r_i / (Σw + 1e-8); Σw is the unnormalised weight
    sum; n_eff = 1 / Σ(w_i / Σw)² is how many neighbours carry the weight (0 when Σw is 0;
    k = 0 gives 0, 0, 0)."""
    s = np.asarray(sigma, np.float64)
    w = np.exp(-d2.astype(np.float64) / (2.0 * (s[..., None] if s.ndim else s) ** 2))
    wsum = w.sum(axis=-1)
    risk = (w * risk_target).sum(axis=-1) / (wsum + GUARD)
    # n_eff = (Σw)² / Σw², and 0 where every weight underflowed: the guard must not enter
    # it, or an underflow would read as n_eff ≈ 1e140.
    w2 = (w * w).sum(axis=-1)
    n_eff = np.divide(wsum * wsum, w2, out=np.zeros_like(wsum), where=w2 > 0)
    return risk, wsum, n_eff
