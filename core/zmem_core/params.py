"""k and σ resolution: what a query's `k` and `sigma` mean for a memory, on the service and on
a replica alike (SPEC §1).

A query may leave `k` and `sigma` out; the memory's settings then decide. An answer holds
min(k, size) neighbours per row while the memory is active and none below `min_size`.
`sigma: "auto"` is σ with σ² = the mean squared distance from a seeded sample of at most
`AUTO_SIGMA_SAMPLE` rows to their k-th nearest neighbour, both among the rows of a window
fixed by seqs (`auto_sigma_window`), so the value depends only on the buffer's contents,
never on when it was asked; it is `INACTIVE_SIGMA` while the memory is inactive (the risk
is 0 then whatever σ is). The service computes it (it needs the index); a replica is told
it by the changes feed.

Validity of `k` and `sigma` (ranges, types) is `limits`' job; here they are already valid.
"""

from __future__ import annotations

import numpy as np

AUTO = "auto"
AUTO_SIGMA_SAMPLE = 1000
INACTIVE_SIGMA = 1.0
"""σ of "auto" while a memory is inactive, or when its window can't give one (< 2 rows,
or every sampled row has a duplicate at distance 0)."""


def asked_k(k: int | None, settings_k: int) -> int:
    """The k a query asks for: its own, else the memory's."""
    return settings_k if k is None else int(k)


def answered_k(asked: int, size: int, active: bool) -> int:
    """Neighbours per row in the answer: the asked k clipped to the memory's size; 0 while
    the memory is inactive."""
    return min(asked, size) if active else 0


def asked_sigma(sigma: float | str | None, settings_sigma: float | str) -> float | str:
    """The sigma a query asks for, a number or `AUTO`: its own, else the memory's."""
    chosen = settings_sigma if sigma is None else sigma
    return AUTO if chosen == AUTO else float(chosen)


def is_auto(sigma: float | str | None, settings_sigma: float | str) -> bool:
    """Whether the query's sigma resolves to "auto"."""
    return asked_sigma(sigma, settings_sigma) == AUTO


def auto_sigma_window(newest_seq: int, capacity: int) -> tuple[int, int]:
    """(boundary, low): "auto" is computed from the rows with low < seq ≤ boundary.

    The boundary is the newest seq rounded down to a multiple of capacity/10 (to a power of
    two while the memory is younger than that: 512, 1,024, … for the default capacity), so
    the value is recomputed once per capacity/10 writes; low = boundary − capacity +
    capacity/10. Until the next boundary, FIFO evicts only rows with seq ≤ low and adds only
    rows above the boundary, so the window's rows stay in the buffer, unchanged, and any
    moment gives the same value.
    """
    newest = max(1, newest_seq)
    step = max(1, capacity // 10)
    boundary = newest // step * step if newest >= step else 1 << (newest.bit_length() - 1)
    return boundary, boundary - capacity + step


def auto_sigma_sample(window_rows: int) -> np.ndarray:
    """Which of a window's rows (positions 0..window_rows−1, in seq order) form the sample:
    at most `AUTO_SIGMA_SAMPLE`, seeded, in seq order."""
    rng = np.random.default_rng(0)
    n = min(window_rows, AUTO_SIGMA_SAMPLE)
    return np.sort(rng.choice(window_rows, n, replace=False))


def auto_sigma_k(settings_k: int, window_rows: int) -> int:
    """Which neighbour's distance sets "auto": the memory's k-th, among the window's other rows."""
    return min(settings_k, window_rows - 1)


def sigma_from_kth(kth_d2: np.ndarray) -> float:
    """σ = √(mean squared distance to the k-th neighbour) over the sample; `INACTIVE_SIGMA`
    when that mean is 0 (every sampled row has k duplicates) or undefined (NaN: a row with
    fewer than k neighbours in the window)."""
    mean = float(np.asarray(kth_d2, np.float64).mean())
    return float(np.sqrt(mean)) if mean > 0 else INACTIVE_SIGMA
