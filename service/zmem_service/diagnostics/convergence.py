"""Criterion 3, *convergence*: clustering grows and the run does not get worse (``trends``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import trends
from .common import MIN_RECORDED_QUERIES, Thresholds, _float, _fmt, _knn_mean_distance, _too_little


def _convergence_criterion(
    geo: dict[str, Any] | None,
    risk: np.ndarray,
    judge: bool,
    n: int,
    need: int,
    t: Thresholds,
    risk_target: np.ndarray | None = None,
    worker: np.ndarray | None = None,
) -> dict[str, Any]:
    r_old = r_new = None
    if geo is not None and geo["xy"].shape[0] >= 4:
        xy, blob = geo["xy"], geo["blob2"]
        h = xy.shape[0] // 2
        halves = (xy[:h], xy[h : 2 * h])  # equal counts, so k-NN distances compare
        k = min(geo["k"], h - 1)
        ref = float(_knn_mean_distance(blob.sample(h), k).mean())
        if ref > 0:
            r_old, r_new = (_float(_knn_mean_distance(part, k).mean() / ref) for part in halves)
    ratio_ok = None if r_old is None or r_new is None else bool(r_new <= t.convergence_factor * r_old)

    # The scale every "gets worse" is measured in: the risk targets' 10th–90th percentile
    # range (the recorded risk's own when the risk targets are not given).
    basis = risk_target if risk_target is not None and risk_target.size >= 2 else risk
    scale = float(np.subtract(*np.percentile(basis, [90, 10]))) if basis.size >= 2 else 0.0
    scale = max(scale, 1e-12)
    effect = {"min_effect": t.min_effect, "z": t.change_z}
    tests: dict[str, trends.Change | None] = {}
    if risk_target is not None:
        tests["risk_target_trend"] = trends.trend(risk_target, scale, **effect)
        tests["risk_target_window"] = trends.window(risk_target, scale, **effect)
    q = risk.size
    judged_queries = q >= MIN_RECORDED_QUERIES
    level = None
    if judged_queries:
        tests["recorded_risk_trend"] = trends.trend(risk, scale, **effect, trim=trends.TRIM)
        found = trends.exceedances(
            risk, scale, margin=t.spike_margin, spread=t.spike_mad, min_effect=t.spike_rise, z=t.change_z
        )
        tests["spikes"], level = found if found is not None else (None, None)
    worst_worker: tuple[str, trends.Change] | None = None
    if risk_target is not None and worker is not None:
        names = np.asarray(worker).astype(str)
        for name in np.unique(names):
            mine = risk_target[names == name]
            if mine.size < t.worker_episodes:
                continue
            for test in (trends.window, trends.trend):
                c = test(mine, scale, min_effect=t.min_effect, z=t.worker_z)
                if c is not None and (worst_worker is None or _worse_first(c, worst_worker[1])):
                    worst_worker = (str(name), c)
    holder = None
    if level is not None and risk_target is not None and worker is not None:
        holder = _spike_holder(risk_target, np.asarray(worker).astype(str), level, t)
    failing = [name for name, c in tests.items() if c is not None and c.worse]
    worker_worse = worst_worker is not None and worst_worker[1].worse
    # A rise past the minimum effect that stays within its noise: this much data can't tell
    # it from noise, so a pass over it is never said as "not rising".
    unproven = [
        name
        for name, c in [*tests.items(), ("worker", worst_worker[1] if worst_worker else None)]
        if c is not None
        and not c.worse
        and c.value >= (t.spike_rise if name == "spikes" else t.min_effect * scale)
    ]
    passed: bool | None = None
    if judge and ratio_ok is not None:
        passed = ratio_ok and not failing and not worker_worse

    def said(name: str, c: trends.Change | None, what: str, share: bool = False) -> str:
        if c is None:
            return f"{what}: too short to judge"
        if share:
            return (
                f"{what} {c.before:.1%} (lowest earlier fifth) → {c.after:.1%} (newest fifth), "
                f"{_signed(c.value, '.1%')} ± {c.se:.1%} (fails from +{t.spike_rise:.0%} beyond "
                f"{t.change_z:g} SE)"
            )
        rel = c.value / scale
        z = t.worker_z if name == "worker" else t.change_z
        return (
            f"{what} {c.before:.3g} → {c.after:.3g}: {_signed(c.value, '.3g')} ± {c.se:.2g} "
            f"({_signed(rel, '.1%')} of the risk targets' range {scale:.3g}; fails from "
            f"+{t.min_effect:.0%} beyond {z:g} SE)"
        )

    parts = {
        "risk_target_window": said(
            "risk_target_window", tests.get("risk_target_window"), "risk targets, best earlier fifth → newest"
        ),
        "risk_target_trend": said(
            "risk_target_trend", tests.get("risk_target_trend"), "risk targets along the buffer (fitted line)"
        ),
        "recorded_risk_trend": said(
            "recorded_risk_trend",
            tests.get("recorded_risk_trend"),
            "recorded risk along the queries (fitted line)",
        ),
        "spikes": said(
            "spikes",
            tests.get("spikes"),
            f"recorded risk above {level:.3g} (spikes)" if level is not None else "spikes",
            share=True,
        ),
    }
    if holder is not None:
        parts["spikes"] += (
            f"; they are likely from worker {holder['worker']!r} (queries carry no worker, episodes "
            f"do): {holder['share']:.0%} ± {holder['se']:.0%} of its newest-fifth episodes sit above "
            f"that level against {holder['others']:.0%} ± {holder['others_se']:.0%} of the other "
            f"workers' (it holds {holder['held']:.0%} of those above)"
        )
    if risk_target is None:
        for key in ("risk_target_window", "risk_target_trend"):
            parts.pop(key)
    if not judged_queries:
        for key in ("recorded_risk_trend", "spikes"):
            parts.pop(key)
        parts["recorded"] = f"recorded risk not judged ({q} recorded queries, needs {MIN_RECORDED_QUERIES})"
    if worst_worker is not None:
        parts["worker"] = said("worker", worst_worker[1], f"worst worker {worst_worker[0]!r}, risk targets")
    cluster = f"projected k-NN distance {_fmt(r_old)} (older half) → {_fmt(r_new)} (newer half) of a blob's"
    if passed is None:
        reading = _too_little(n, need) if not judge else f"cannot compare the halves: {cluster}"
    elif passed:
        verdict = (
            f"converging, though not proven safe: clustering more and no rise beyond its noise, but "
            f"{len(unproven)} of the rises below reach the minimum effect within their noise (more "
            "data would tell)"
            if unproven
            else f"converging (clustering more; no rise of {t.min_effect:.0%} of the risk targets' range "
            "or more)"
        )
        reading = f"{verdict}: {cluster}; " + "; ".join(parts.values())
    else:
        problems = []
        bad = [k for k in parts if k in failing or (k == "worker" and worker_worse)]
        if bad:
            problems.append("getting worse: " + "; ".join(parts[k] for k in bad))
        if ratio_ok is False:
            problems.append(f"not clustering more: {cluster} (needs ≤ {t.convergence_factor}×)")
        rest = [parts[k] for k in parts if k not in bad]
        reading = "; ".join(problems) + ("; also " + "; ".join(rest) if rest else "")

    def plain(c: trends.Change | None) -> dict[str, Any] | None:
        if c is None:
            return None
        return {
            "change": _float(c.value),
            "se": _float(c.se),
            "before": _float(c.before),
            "after": _float(c.after),
            "worse": c.worse,
        }

    return {
        "name": "convergence",
        "passed": passed,
        "values": {
            "older_ratio": r_old,
            "newer_ratio": r_new,
            "factor": float(t.convergence_factor),
            "recorded_queries": int(q),
            "scale": _float(scale),
            "min_effect": float(t.min_effect),
            "z": float(t.change_z),
            **{name: plain(tests.get(name)) for name in TESTS},
            "spike_level": _float(level),
            "spike_worker": holder,
            "worst_worker": None if worst_worker is None else worst_worker[0],
            "worst_worker_change": None if worst_worker is None else plain(worst_worker[1]),
            "failing": failing + (["worker"] if worker_worse else []),
            "unproven": unproven,
            "required_size": int(need),
        },
        "reading": reading,
    }


TESTS = ("risk_target_trend", "risk_target_window", "recorded_risk_trend", "spikes")


def _spike_holder(
    risk_target: np.ndarray, worker: np.ndarray, level: float, t: Thresholds
) -> dict[str, Any] | None:
    """The worker that holds the spikes, read from the episodes (recorded queries carry no
    worker; a worker's queries sit where its episodes do): in the newest of ``trends.WINDOWS``
    windows of the episodes in arrival order (risk_target [n], worker [n] names), the worker
    whose share of episodes with a risk target above the spike `level` exceeds the other
    workers' pooled share by the spikes' own bar (``spike_rise`` share points and
    ``change_z`` binomial standard errors). None when no worker stands out so, or with one
    worker or fewer than ``trends.MIN_WINDOW`` episodes in the window."""
    if risk_target.size < trends.WINDOWS * trends.MIN_WINDOW:
        return None
    n = risk_target.size
    newest = slice(n - n // trends.WINDOWS, n)
    above, names = risk_target[newest] > level, worker[newest]
    found: dict[str, Any] | None = None
    for name in np.unique(names):
        mine = names == name
        m, o = int(mine.sum()), int((~mine).sum())
        if m < trends.MIN_WINDOW or o == 0:
            continue
        share, others = float(above[mine].mean()), float(above[~mine].mean())
        gap = share - others
        clear = gap >= t.spike_rise and gap >= t.change_z * float(
            np.hypot(_binomial_se(share, m), _binomial_se(others, o))
        )
        if clear and (found is None or gap > found["share"] - found["others"]):
            found = {
                "worker": str(name),
                "share": share,
                "se": _binomial_se(share, m),
                "others": others,
                "others_se": _binomial_se(others, o),
                "held": float(above[mine].sum() / max(int(above.sum()), 1)),
            }
    return found


def _binomial_se(p: float, count: int) -> float:
    """The standard error of a share p of `count` values; a share of 0 or 1 is taken as 1/count
    from its end (it still has an error)."""
    p = min(max(p, 1 / count), 1 - 1 / count) if count > 1 else 0.5
    return float(np.sqrt(p * (1 - p) / count))


def _worse_first(a: trends.Change, b: trends.Change) -> bool:
    """Whether change a is more alarming than b: a failing one first, then the larger rise in SEs."""
    if a.worse != b.worse:
        return a.worse
    return a.value / max(a.se, 1e-300) > b.value / max(b.se, 1e-300)


def _signed(x: float, spec: str) -> str:
    return ("+" if x >= 0 else "") + format(x, spec)
