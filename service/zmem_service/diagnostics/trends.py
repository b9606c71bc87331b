"""Does a series in arrival order get worse? The tests behind the convergence verdict.

Each test compares an estimate with its standard error and with a minimum effect stated in
the units of a scale (the risk targets' 10th–90th percentile range): a run fails only on a
change that is both real (beyond ``z`` standard errors) and large enough to matter (at least
``min_effect`` × scale). Standard errors come from consecutive blocks, so the slow drift of
a policy (neighbouring episodes alike) does not pass for independent evidence. Levels are
means of values winsorized at their 1st and 99th percentiles (a heavy tail moves no mean),
or interquartile means where a minority regime should not count (``TRIM``).

- ``trend``: the least-squares line through block means, as its rise over the series.
- ``window``: the newest window (a fifth) against the best earlier one (lowest mean): a
  collapse in the last fifth of a run shows here, where halves would dilute it.
- ``exceedances``: the share of values above a fixed level (the best earlier window's median
  plus a margin) in the newest window against the lowest such share earlier: a converged
  policy's rare visits to a worse region keep their share; a worker that diverges raises it.

Pure numpy; every function takes float64 arrays [n] and returns plain floats.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

WINDOWS = 5
"""The series is cut into this many consecutive windows (fifths)."""
TREND_BLOCKS = 10
SUB_BLOCKS = 16
"""Blocks per window for its standard error."""
MIN_WINDOW = 20
"""A window holds at least this many values (100 recorded queries make five)."""
TRIM = 0.25
"""The recorded risk's levels are interquartile means (without the lowest and highest
quarter): a query's kernel risk depends on what the buffer held around it at the time, so
the few queries that visit a worse region drift as the buffer fills there; their share
above a level (``exceedances``) is judged instead."""


@dataclass(frozen=True)
class Change:
    """A change in a series: `value` (positive = worse) ± `se`, the levels it compares and
    whether it is a rise beyond both the noise and the minimum effect (`worse`)."""

    value: float
    se: float
    before: float
    after: float
    worse: bool


def _blocks(x: np.ndarray, count: int) -> list[np.ndarray]:
    edges = np.linspace(0, x.size, count + 1).round().astype(int)
    return [x[a:b] for a, b in itertools.pairwise(edges)]


def trimmed_mean(x: np.ndarray, trim: float = TRIM) -> float:
    """Mean of x [n] without its lowest and highest ``trim`` fractions."""
    cut = int(trim * x.size)
    kept = np.sort(x)[cut : x.size - cut] if cut else x
    return float(kept.mean())


def mean_se(x: np.ndarray, trim: float = TRIM) -> tuple[float, float]:
    """Trimmed mean of x [n] and its standard error: the spread of SUB_BLOCKS consecutive
    blocks' trimmed means (consecutive values may be alike), never below the
    independent-sample error of the winsorized values."""
    m = trimmed_mean(x, trim)
    cut = int(trim * x.size)
    kept = np.sort(x)
    wins = np.clip(x, kept[cut], kept[x.size - 1 - cut]) if cut else x
    iid = float(wins.std(ddof=1) / (1 - 2 * trim) / np.sqrt(x.size)) if x.size > 1 else np.inf
    parts = [trimmed_mean(b, trim) for b in _blocks(x, SUB_BLOCKS) if b.size]
    blocked = float(np.std(parts, ddof=1) / np.sqrt(len(parts))) if len(parts) > 2 else np.inf
    return m, max(iid, blocked) if np.isfinite(blocked) else iid


def winsorize(x: np.ndarray) -> np.ndarray:
    """x [n] clipped to its 1st–99th percentiles: a heavy tail moves no mean."""
    if x.size < 2:
        return x
    lo, hi = np.percentile(x, [1, 99])
    return np.clip(x, lo, hi)


def trend(x: np.ndarray, scale: float, *, min_effect: float, z: float, trim: float = 0.0) -> Change | None:
    """The rise of x [n] over its length: the least-squares slope through TREND_BLOCKS block
    means (``trim``-trimmed; winsorized at the 1st–99th percentiles when trim is 0) × their
    span, with the slope's standard error from the residuals (None if n < 2 × TREND_BLOCKS)."""
    if x.size < 2 * TREND_BLOCKS:
        return None
    x = x if trim else winsorize(x)
    means = np.array([trimmed_mean(b, trim) for b in _blocks(x, TREND_BLOCKS)])
    t = np.arange(TREND_BLOCKS, dtype=np.float64)
    tc = t - t.mean()
    slope = float((tc * (means - means.mean())).sum() / (tc**2).sum())
    resid = means - means.mean() - slope * tc
    se_slope = float(np.sqrt((resid**2).sum() / (TREND_BLOCKS - 2) / (tc**2).sum()))
    rise, se = slope * TREND_BLOCKS, se_slope * TREND_BLOCKS
    start = float(means.mean() - slope * t.mean())
    worse = rise >= min_effect * scale and rise >= z * se
    return Change(rise, se, start, start + rise, bool(worse))


def window(x: np.ndarray, scale: float, *, min_effect: float, z: float, trim: float = 0.0) -> Change | None:
    """The newest of WINDOWS windows of x [n] against the earlier one with the lowest mean
    (``trim``-trimmed; winsorized at the 1st–99th percentiles when trim is 0; None if a window
    would hold fewer than MIN_WINDOW values)."""
    if x.size < WINDOWS * MIN_WINDOW:
        return None
    x = x if trim else winsorize(x)
    parts = [mean_se(b, trim) for b in _blocks(x, WINDOWS)]
    best = min(parts[:-1], key=lambda p: p[0])
    (new, se_new), (old, se_old) = parts[-1], best
    diff, se = new - old, float(np.hypot(se_new, se_old))
    worse = diff >= min_effect * scale and diff >= z * se
    return Change(diff, se, old, new, bool(worse))


def exceedances(
    x: np.ndarray, scale: float, *, margin: float, spread: float, min_effect: float, z: float
) -> tuple[Change, float] | None:
    """The share of x [n] above a fixed level in the newest window against the lowest share
    in an earlier one, and that level.

    The level is the median of the earlier window with the lowest median, plus
    ``margin`` × scale or ``spread`` MADs of that window, whichever is more: it sits above the
    settled regime's noise and does not move with whichever regime most values are in. The
    shares are proportions (``min_effect`` is in share points); their standard errors are the
    spread of sub-block shares, never below the binomial one. None below WINDOWS × MIN_WINDOW.
    """
    if x.size < WINDOWS * MIN_WINDOW:
        return None
    windows = _blocks(x, WINDOWS)
    medians = [float(np.median(w)) for w in windows[:-1]]
    ref = windows[int(np.argmin(medians))]
    mad = float(np.median(np.abs(ref - np.median(ref))))
    level = float(np.median(ref)) + max(margin * scale, spread * mad, 1e-12)
    shares = [mean_se((w > level).astype(np.float64), trim=0.0) for w in windows]
    best = min(shares[:-1], key=lambda p: p[0])
    (new, se_new), (old, se_old) = shares[-1], best
    # a share of 0 has no spread: floor each error with a binomial one at a share of 1/n
    floor = [
        np.sqrt(max(p, 1 / w.size) * (1 - max(p, 1 / w.size)) / w.size)
        for p, w in ((new, windows[-1]), (old, ref))
    ]
    se = float(np.hypot(max(se_new, floor[0]), max(se_old, floor[1])))
    diff = new - old
    worse = diff >= min_effect and diff >= z * se
    return Change(diff, se, old, new, bool(worse)), level
