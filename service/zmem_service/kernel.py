"""The seed's Gaussian-kernel risk in numpy, with the numbers that say whether it is healthy.

The differentiable version lives in the client (`zmem_client.kernel_risk`); this one
serves `POST …/risk` and the recorded queries behind the diagnostics.
"""

from __future__ import annotations

import numpy as np

GUARD = 1e-8
"""The seed's guard in w / (Σw + 1e-8): below it, risk ≈ 0 and carries no gradient."""


def kernel_stats(
    d2: np.ndarray, risk_target: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row: (risk, Σw, n_eff), float64 [B] each.

    d2, risk_target [B, k]. w_i = exp(−d2_i / 2σ²); risk = Σ w_i r_i / (Σw + 1e-8);
    Σw is the unnormalised weight sum; n_eff = 1 / Σ(w_i / Σw)² is how many neighbours
    carry the weight (0 when Σw is 0; k = 0 gives 0, 0, 0)."""
    w = np.exp(-d2.astype(np.float64) / (2.0 * float(sigma) ** 2))
    wsum = w.sum(axis=-1)
    risk = (w * risk_target).sum(axis=-1) / (wsum + GUARD)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = w / wsum[:, None]
        n_eff = np.where(wsum > 0, 1.0 / (p * p).sum(axis=-1), 0.0)
    return risk, wsum, np.nan_to_num(n_eff)
