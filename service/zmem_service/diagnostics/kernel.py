"""Criterion 4, *kernel*: is the kernel alive, and how much of the local slope does it pass."""

from __future__ import annotations

from typing import Any

import numpy as np

from zmem_core.kernel import GUARD

from . import slope
from .common import MIN_RECORDED_QUERIES, Thresholds, _float, _fmt, _kth_distance, _too_little


def _kernel_criterion(
    geo: dict[str, Any] | None,
    q: dict[str, np.ndarray | None],
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
    sigma: float | str | None,
    k: int | None,
    rt: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    wsum, n_eff = q["wsum"], q["n_eff"]
    recorded = 0 if wsum is None else int(wsum.size)
    reach = None
    in_use = float(sigma) if isinstance(sigma, (int, float)) else None
    slope_values: dict[str, Any] = dict.fromkeys(
        ("slope_share", "slope_exists", "slope_r2", "slope_sigma", "slope_share_at_suggested")
    )
    if geo is not None:
        # Queries come from the same policy as the stored z's: at σ = the RMS distance to a
        # stored z's 10th neighbour, the nearest ones weigh ≥ e^-1/2 and nothing underflows.
        kth = _kth_distance(geo["x"], geo["k"])
        reach = _float(np.sqrt(np.mean(kth**2)))
        kk = int(k) if k else 64
        if sigma == "auto":  # the service's rule: the RMS distance to the k-th neighbour
            far = _kth_distance(geo["x"], min(kk, geo["x"].shape[0] - 1))
            in_use = _float(np.sqrt(np.mean(far**2)))
        if rt is not None and rt.size == geo["x"].shape[0] and rt.size >= 2:
            scale = float(np.subtract(*np.percentile(rt, [90, 10])))
            slope_values = slope.assess(geo["x"], rt, kk, in_use, reach, scale, seed)
            slope_values = {key: _float(v) if isinstance(v, float) else v for key, v in slope_values.items()}
    # Where the risk targets have a local slope, suggest the σ that passes it; else the reach.
    suggested = (
        slope_values["slope_sigma"] if slope_values["slope_exists"] and slope_values["slope_sigma"] else reach
    )
    values: dict[str, Any] = {
        "recent_queries": None,
        "underflow_fraction": None,
        "median_n_eff": None,
        "sigma": sigma if isinstance(sigma, str) else _float(sigma),
        "sigma_in_use": in_use,
        "k": k,
        "suggested_sigma": suggested,
        "reach_sigma": reach,
        **slope_values,
        "wanted_slope_share": slope.WANTED_SHARE,
        "threshold": float(t.kernel_underflow),
        "guard": GUARD,
        "recorded_queries": recorded,
        "required_size": int(need),
    }
    if wsum is None or n_eff is None or recorded < MIN_RECORDED_QUERIES:
        what = (
            "no Σw recorded" if wsum is None else f"{recorded} recorded queries, needs {MIN_RECORDED_QUERIES}"
        )
        reading = _too_little(n, need) if not judge else f"too few recorded queries to judge ({what})"
        return {"name": "kernel", "passed": None, "values": values, "reading": reading}
    recent = slice(max(0, recorded - t.kernel_recent), recorded)
    w, ne = wsum[recent], n_eff[recent]
    dead = w < GUARD
    frac = float(dead.mean())
    median_n_eff = _float(np.median(ne[~dead])) if (~dead).any() else None
    values.update(recent_queries=int(w.size), underflow_fraction=frac, median_n_eff=median_n_eff)
    sig = f"sigma {sigma}" if sigma is not None else "this sigma"
    by_slope = bool(slope_values["slope_exists"] and slope_values["slope_sigma"])
    passes = slope_values["slope_share_at_suggested"] or 0.0
    why = (
        f"no stored z's kernel weights underflow and it passes {passes:.0%} of the risk targets' local slope"
        if by_slope
        else "the RMS distance to a stored z's 10th neighbour"
    )
    fix = f"set sigma ≈ {suggested:.3g} ({why})" if suggested else ""
    spread = f"median n_eff {_fmt(median_n_eff, '.1f')}" + (f" of k = {k}" if k else "")
    slope_text = ""
    if slope_values["slope_share"] is not None:
        slope_text = (
            f"; {slope_values['slope_share']:.0%} of the risk targets' local slope (a least-squares fit "
            f"over each probed z's {k or 64} neighbours) reaches the kernel's gradient at this sigma"
        )
        if not slope_values["slope_exists"]:
            slope_text += " (the risk targets barely change across a neighbourhood: no slope to pass)"
        elif slope_values["slope_share"] < slope.WANTED_SHARE and fix:
            slope_text += f"; to pass ≥ {slope.WANTED_SHARE:.0%} of it, {fix}"
    if not judge:
        return {"name": "kernel", "passed": None, "values": values, "reading": _too_little(n, need)}
    passed = bool(frac <= t.kernel_underflow)
    if passed:
        reading = (
            f"the kernel is alive: {frac:.1%} of the last {w.size} queries underflowed "
            f"(fails above {t.kernel_underflow:.0%}); {spread}{slope_text}"
        )
        if median_n_eff is not None and k and median_n_eff >= 0.9 * k:
            reading += (
                "; the weight spreads evenly over nearly all neighbours, so the risk is a plain "
                "k-NN average with a weak gradient: a smaller sigma sharpens it, "
                + _sharper(suggested, in_use, why)
            )
    else:
        reading = (
            f"the kernel has switched off: {frac:.1%} of the last {w.size} queries had Σw < {GUARD:g} "
            f"(risk ≈ 0, no gradient; fails above {t.kernel_underflow:.0%}) with {sig}; {spread}; "
            f"{fix or 'raise sigma'}, or rescale z"
        )
    return {"name": "kernel", "passed": passed, "values": values, "reading": reading}


def _sharper(suggested: float | None, in_use: float | None, why: str) -> str:
    """Advice naming the σ to try when the weight spreads over every neighbour: the suggested
    σ when it is smaller than the one in use (or that is unknown), else half the one in use."""
    if suggested and (in_use is None or suggested < in_use):
        advice = f"e.g. sigma ≈ {suggested:.3g} ({why})"
    elif in_use:
        advice = f"e.g. sigma ≈ {in_use / 2:.3g} (half the {in_use:.3g} in use)"
    else:
        return "then measure the two forces on z again"
    return f"{advice}; then measure the two forces on z again (sigma changes the memory's force)"
