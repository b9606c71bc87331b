"""The demo's report folder: summary.md and side-by-side pictures in one PCA basis."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

VERDICTS = ("density", "reliability", "convergence", "kernel")
LATE = 0.75  # episodes in the last quarter of training are "late"


def _stats(run: dict[str, Any]) -> dict[str, Any]:
    e = run["episodes"]
    late = e["progress"] >= LATE
    early = e["progress"] < 0.25
    quarters = [
        float(e["soft_bind"][(e["progress"] >= q / 4) & (e["progress"] < (q + 1) / 4)].mean())
        for q in range(4)
    ]
    active = e["g_risk"] > 0
    return {
        "late_reliable": float((e["side"][late] > 0).mean()),
        "late_unreliable": float((e["side"][late] <= 0).mean()),
        "early_reliable": float((e["side"][early] > 0).mean()),
        "best_zone_soft_bind": max(
            float(e["soft_bind"][e["zone"] == j].mean()) for j in np.unique(e["zone"])
        ),
        "soft_by_quarter": quarters,
        "g_task": float(np.median(e["g_task"][late])),
        "g_risk": float(np.median(e["g_risk"][late & active])) if (late & active).any() else 0.0,
        "g_risk_all": float(np.median(e["g_risk"][active])) if active.any() else 0.0,
        "g_task_all": float(np.median(e["g_task"][active])) if active.any() else 0.0,
    }


RELIABLE_SOFT_BIND, RELIABLE_MARGIN, RELIABLE_LAMBDA = 0.5, 0.1, 0.5
"""The reliability verdict's rule for a reliable island: mean soft_bind ≥ 0.5 and ≥ 0.1 above
the least reliable group (or above 0.5 when all bind well), or mean lambda_bind ≤ half the
highest group's."""
POWER = 0.8
"""The catch rate the convergence verdict states for a rise it should see (issue #21's
calibration: bad runs caught ≥ 4 in 5): a rise is one it must fail when it lies this far
past its bar, i.e. ≥ (z + z₀.₈) standard errors at the run's size."""


def _changes(progress: np.ndarray, mean: np.ndarray, var: np.ndarray) -> list[tuple[float, float]]:
    """The convergence verdict's two tests of a series, taken on the noise-free expected risk
    target `mean` [n] of each episode over `progress` [n], each with the standard error the
    verdict's estimate has at this size when episode i's risk target scatters with variance
    `var[i]` around `mean[i]` (the toy's model, not the run's draws): the newest of
    ``trends.WINDOWS`` windows against the earlier one with the lowest mean, and the rise of
    the least-squares line through ``trends.TREND_BLOCKS`` block means. Returns
    [(rise, se), (rise, se)] in the risk target's units."""
    from zmem_service.diagnostics import trends

    out = []
    for count in (trends.WINDOWS, trends.TREND_BLOCKS):
        part = np.minimum((progress * count).astype(int), count - 1)
        n = np.bincount(part, minlength=count).astype(np.float64)
        m = np.bincount(part, weights=mean, minlength=count) / np.maximum(n, 1)
        v = np.bincount(part, weights=var, minlength=count) / np.maximum(n, 1) ** 2
        if count == trends.WINDOWS:
            best = int(np.argmin(m[:-1]))
            out.append((float(m[-1] - m[best]), float(np.sqrt(v[-1] + v[best]))))
        else:
            tc = np.arange(count) - (count - 1) / 2
            slope = float((tc * (m - m.mean())).sum() / (tc**2).sum())
            se = float(np.sqrt((tc**2 * v).sum()) / (tc**2).sum())
            out.append((slope * count, se * count))
    return out


def _convergence_truth(e: dict[str, np.ndarray], scale: float) -> tuple[bool | None, dict[str, Any]]:
    """Convergence's truth, in the verdict's own terms (``Thresholds``: a rise of at least
    ``min_effect`` of the risk targets' range and beyond ``change_z`` standard errors, or
    ``worker_z`` for one worker's episodes), on the policy's noise-free expected risk target:
    False (worse: some rise reaches the minimum effect and lies ≥ (z + z_POWER) standard
    errors of this size out, so the verdict must fail), None (some rise reaches the minimum
    effect but less far out: at this size the verdict may fail it or pass it as not proven
    safe, never as converging) or True (no rise reaches the minimum effect: it must pass).
    Also the largest rise overall and for the worst worker, each with the rise the verdict
    sees from at this size, in units of `scale`."""
    from zmem_service.diagnostics.common import Thresholds

    from .toy import policy_risk_moments

    t = Thresholds()
    power = _z_power()
    mean, var = policy_risk_moments(e["policy_sides"], e["policy_std"])
    series = [(e["progress"], mean, var, t.change_z)]
    for w in np.unique(e["worker"]):
        mine = e["worker"] == w
        if mine.sum() >= t.worker_episodes:
            series.append((e["progress"][mine], mean[mine], var[mine], t.worker_z))
    worse = unproven = False
    largest = []
    for progress, m, v, z in series:
        rises = [
            (rise / scale, max(t.min_effect, (z + power) * se / scale))
            for rise, se in _changes(progress, m, v)
        ]
        worse |= any(r >= t.min_effect and r >= sees for r, sees in rises)
        unproven |= any(r >= t.min_effect for r, _ in rises)
        largest.append(max(rises))
    detail = {"overall": largest[0], "worker": max(largest[1:], default=(float("nan"), float("nan")))}
    return (False if worse else None if unproven else True), detail


def _truth(run: dict[str, Any]) -> dict[str, bool | None]:
    """What each verdict should say about a toy run, in the verdict's own terms, from the
    toy's noise-free outcomes: for convergence ``_convergence_truth`` (None: either a fail
    or a pass that says it is not proven safe), for reliability the noise-free soft_bind at
    each stored episode's side coordinate."""
    from .toy import expected_soft_bind

    e = run["episodes"]
    # the service's risk targets with the default weights (a, b, c, eps) = (1, 0.2, 0.05, 1e-8)
    actual = (1 - e["soft_bind"]) + 0.2 * np.log(e["cone_vol"] + 1e-8) + 0.05 * e["lambda_bind"]
    p10, p90 = np.percentile(actual, [10, 90])
    convergence, run["truth_rise"] = _convergence_truth(e, float(p90 - p10))
    # the zones are the map's islands; the sides of a zone lie off the map
    p = expected_soft_bind(e["side"])
    lam = 2.0 * (1 - p)
    zone_soft = [float(p[e["zone"] == j].mean()) for j in np.unique(e["zone"])]
    zone_lam = [float(lam[e["zone"] == j].mean()) for j in np.unique(e["zone"])]
    floor = min(zone_soft)
    reliable = any(
        s >= max(RELIABLE_SOFT_BIND, min(floor, RELIABLE_SOFT_BIND) + RELIABLE_MARGIN)
        or lm <= RELIABLE_LAMBDA * max(zone_lam)
        for s, lm in zip(zone_soft, zone_lam, strict=True)
    )
    return {
        "density": True,  # three task zones: the map has islands whatever w_mem is
        "reliability": reliable,
        # the policy's spread anneals (0.6 → 0.25), so the buffer clusters more in every run:
        # convergence is the run not getting worse, overall or for any worker
        "convergence": convergence,
        "kernel": True,  # d = 8, sigma 1, z's ~0.35 apart: the kernel is alive
    }


def _agrees(verdict: dict[str, Any], truth: bool | None) -> bool:
    """Whether a verdict says what its truth says; a truth of None (a rise the verdict can't
    be sure of at this size) takes a fail or a pass that says it is not proven safe."""
    if truth is None:
        return verdict["passed"] is False or (
            verdict["passed"] is True and bool(verdict["values"].get("unproven"))
        )
    return verdict["passed"] is truth


def _agrees_strictly(verdict: dict[str, Any], truth: bool | None) -> bool:
    """The same, counting every rise of the minimum effect as one the verdict must fail."""
    return verdict["passed"] is (truth is True)


def _z_power() -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(POWER)


def _dose_response(by_w: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    """The smallest w_mem whose late reliable share differs from w_mem = 0 beyond the seeds'
    noise (2 standard errors of the difference, from the seed-to-seed spread), and the
    strength below it: the interval where the regularizer starts to steer."""
    ws = sorted(by_w)
    shares = {w: np.array([r["stats"]["late_reliable"] for r in by_w[w]]) for w in ws}
    base = shares[ws[0]]

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")

    rows = []
    first = None
    for w in ws[1:]:
        diff = float(shares[w].mean() - base.mean())
        noise = float(np.hypot(se(shares[w]), se(base)))
        beyond = bool(np.isfinite(noise) and abs(diff) > 2 * noise)
        rows.append({"w": w, "diff": diff, "se": noise, "beyond": beyond})
        if beyond and first is None:
            first = w
    below = None if first is None else max([w for w in ws if w < first])
    return {"rows": rows, "first": first, "below": below}


def _dose_text(moves: dict[str, Any], by_w: dict[float, list[dict[str, Any]]]) -> str:
    cells = "; ".join(
        f"w_mem {r['w']:g}: {r['diff']:+.0%} ± {r['se']:.0%}" + (" (beyond noise)" if r["beyond"] else "")
        for r in moves["rows"]
    )
    seeds = len(by_w[min(by_w)])
    if moves["first"] is None:
        where = (
            "no strength here moved the late reliable share beyond its seed-to-seed noise "
            "(2 standard errors; with one seed per strength there is no noise estimate)"
        )
    else:
        where = (
            f"the late reliable share first moves beyond its seed-to-seed noise between w_mem = "
            f"{moves['below']:g} and {moves['first']:g} (2 standard errors of the difference from "
            f"w_mem = 0, {seeds} seeds each)"
        )
    return f"Late reliable share against w_mem = 0: {cells}. So {where}."


def _spread(values: list[float], fmt: str = ".0%") -> str:
    mean = float(np.mean(values))
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def _word(passed: bool | None) -> str:
    return {True: "pass", False: "fail", None: "n/a"}[passed]


def write(
    out: Path,
    url: str,
    token: str | None,
    runs: list[dict[str, Any]],
    kernel: list[dict[str, Any]],
    size: dict[str, int],
    args: argparse.Namespace,
) -> None:
    from zmem_client import ZMemClient
    from zmem_service.diagnostics.common import Thresholds

    t = Thresholds()
    for run in runs:
        run["stats"] = _stats(run)
        client = ZMemClient(url, memory=run["name"], token=token, timeout=300)
        run["verdicts"] = {c["name"]: c for c in client.diagnostics()["criteria"]}
        client.close()
        run["truth"] = _truth(run)

    ws = sorted({r["w"] for r in runs})
    by_w = {w: [r for r in runs if r["w"] == w] for w in ws}
    best = max(ws, key=lambda w: (np.mean([r["stats"]["late_reliable"] for r in by_w[w]]), -w))
    base = [r["stats"] for r in by_w[0.0]]
    moves = _dose_response(by_w)
    forces = [float(np.median([s[f"g_{k}_all"] for s in base])) for k in ("task", "risk")]
    ratio = forces[0] / max(forces[1], 1e-12)
    agreeing = sum(all(_agrees(r["verdicts"][v], r["truth"][v]) for v in VERDICTS) for r in runs)
    strictly = sum(all(_agrees_strictly(r["verdicts"][v], r["truth"][v]) for v in VERDICTS) for r in runs)
    unsure = sum(r["truth"]["convergence"] is None for r in runs)
    offset = getattr(args, "seed_offset", 0)
    print(
        f"zmem demo: every verdict agrees with its truth in {agreeing} of {len(runs)} runs "
        f"({strictly} if every rise of the minimum effect must fail; {unsure} runs rise within "
        "what the convergence verdict can see at this size)",
        file=sys.stderr,
    )

    lines = [
        "# zmem demo: does the memory regularizer steer z away from unreliable regions?",
        "",
        f"Toy: 8-d z, three task zones, each with a reliable side (soft_bind ≈ 0.9) and an unreliable one "
        f"(≈ 0.1); the task prefers the unreliable side a little. {args.workers} worker processes per run "
        f"record into one memory through `ZMemClient` (pickled into each); {size['episodes']} episodes "
        "per run, "
        f"min_size {size['min_size']}, k 64, sigma 1.0; seeds {offset}..{offset + size['seeds'] - 1} "
        "for every w_mem. "
        "Numbers are the mean over seeds with [min–max]; the arrival order across workers varies, "
        "so runs with the same seed are not bit-identical.",
        "",
        "| w_mem | late on reliable side | late on unreliable side | soft_bind by quarter (Q1 → Q4) "
        "| ‖∇task‖ (late) | w·‖∇risk‖ (late) | density | reliability | convergence | kernel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in ws:
        st = [r["stats"] for r in by_w[w]]
        quarters = " → ".join(f"{np.mean([s['soft_by_quarter'][q] for s in st]):.2f}" for q in range(4))
        cells = []
        for v in VERDICTS:
            got = [r["verdicts"][v]["passed"] for r in by_w[w]]
            truth = [r["truth"][v] for r in by_w[w]]
            agree = sum(_agrees(r["verdicts"][v], r["truth"][v]) for r in by_w[w])
            passed = sum(g is True for g in got)
            said = f"{sum(x is True for x in truth)}/{len(truth)}"
            if any(x is None for x in truth):
                said += f", {sum(x is None for x in truth)} unsure"
            cells.append(f"{passed}/{len(got)} pass (truth {said}; agrees {agree}/{len(got)})")
        lines.append(
            f"| {w:g} | {_spread([s['late_reliable'] for s in st])} "
            f"| {_spread([s['late_unreliable'] for s in st])} | {quarters} "
            f"| {np.mean([s['g_task'] for s in st]):.3f} | {np.mean([w * s['g_risk'] for s in st]):.4f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Late = the last quarter of each run's episodes. Truths, in each verdict's own terms and from "
        "the toy's noise-free outcomes (soft_bind = sigmoid(3s) at each episode's side coordinate s): "
        "density passes (three zones make islands); reliability passes when some zone (an island of "
        f"the map) has mean soft_bind ≥ {RELIABLE_SOFT_BIND} and ≥ {RELIABLE_MARGIN} above the least "
        f"reliable zone, or mean lambda_bind ≤ {RELIABLE_LAMBDA:g}× the highest zone's; kernel passes "
        "(d = 8). Convergence is judged as the verdict judges it, on the policy's expected risk "
        "target at each step (over its zones, its draws and the outcome noise: no noise of the run's "
        "own samples), for all workers together and for each one: the newest fifth against the best "
        "earlier fifth, and a line fitted through ten blocks. Each rise is read against the standard "
        "error the verdict's estimate has at this size (from the toy's model of each episode's "
        f"scatter): it must **fail** when a rise reaches the minimum effect ({t.min_effect:.0%} of "
        f"the risk targets' 10th–90th percentile range) and lies ≥ z + {_z_power():.2f} standard "
        f"errors out (z = {t.change_z:g}, {t.worker_z:g} for one worker: where the verdict states a "
        f"catch rate of {POWER:.0%}); it must **pass** when no rise reaches the minimum effect; "
        "between the two (**unsure**: a rise of the minimum effect closer to its noise than that) "
        "a fail agrees and so does a pass that says it is not proven safe, but not a plain "
        '"converging".',
        "",
        f"**Every verdict agrees with its truth in {agreeing} of {len(runs)} runs** ({strictly} if "
        f"every rise of the minimum effect must fail; {unsure} runs are unsure).",
        "",
        "## Where w_mem starts to matter (dose-response)",
        "",
        _dose_text(moves, by_w),
        f"The best w_mem here was {best:g} (late reliable share "
        f"{np.mean([r['stats']['late_reliable'] for r in by_w[best]]):.0%}). For scale, in the w_mem = 0 "
        f"runs the median per-sample ‖∇task‖ is {np.median([s['g_task_all'] for s in base]):.3f} and "
        f"‖∇risk‖ {np.median([s['g_risk_all'] for s in base]):.4f}; their ratio "
        f"({ratio:.2g})"
        " overestimates where the memory starts to steer: per-sample risk gradients are mostly "
        "noise that averages out over a run.",
        "",
        "## Kernel check (larger d)",
        "",
        "| d | sigma | verdict | queries with Σw < 1e-8 | median n_eff | suggested sigma | reading |",
        "|---|---|---|---|---|---|---|",
    ]
    for check in kernel:
        v = check["kernel"]["values"]
        uf = v["underflow_fraction"]
        ne = v["median_n_eff"]
        lines.append(
            f"| {check['d']} | {check['sigma']:.3g} | {_word(check['kernel']['passed'])} | "
            f"{'n/a' if uf is None else f'{uf:.0%}'} | {'n/a' if ne is None else f'{ne:.1f}'} | "
            f"{v['suggested_sigma']:.3g} | {check['kernel']['reading']} |"
        )
    lines += [
        "",
        "Truth: unit-variance z at d = 64 with sigma 1 underflows (fail); at the suggested sigma it passes.",
        "",
    ]

    base_name, best_name = by_w[0.0][0]["name"], by_w[best][0]["name"]
    pictures = _pictures(out, url, token, base_name, best_name, best)
    apart = _separation(url, token, base_name, best_name)
    print(
        f"zmem demo: late centroids of w_mem = 0 and {best:g} lie {apart['risk']:.2f} pooled SDs apart "
        f"along the risk axis ({apart['pca']:.2f} along PC1 of the PCA map)",
        file=sys.stderr,
    )
    lines += [
        f"## Pictures (first seed; both on the risk projection of the best run `{best_name}`, "
        "on shared colour scales)",
        "",
        "The x axis is the direction of z that best predicts the risk target (a ridge fit over the best "
        "run's buffer), the y axis the leading principal component orthogonal to it: each zone's reliable "
        "and unreliable sides, which lie off the PCA map, sit apart along x. The late episodes (the last "
        f"quarter of each buffer) of w_mem = 0 and w_mem = {best:g} have centroids "
        f"**{apart['risk']:.2f} pooled standard deviations apart along the risk axis** "
        f"({apart['risk_0']:+.2f} vs {apart['risk_best']:+.2f}), against {apart['pca']:.2f} along PC1 of "
        "the PCA map.",
        "",
    ]
    lines += [f"![{title}]({file})" for file, title in pictures]
    lines += ["", "Readings on the same map (`?basis=" + best_name + "&projection=risk`):", ""]
    for name, w in ((base_name, 0.0), (best_name, best)):
        on_map = _diagnostics_on(url, token, name, best_name)
        if on_map is not None:
            lines.append(f"- w_mem = {w:g}, **reliability**: {on_map['reliability']['reading']}")
    lines += ["", "## Each run's verdict readings", ""]
    for r in runs:
        lines.append(f"### w_mem = {r['w']:g}, seed {r['seed']} (memory `{r['name']}`)")
        for v in VERDICTS:
            c = r["verdicts"][v]
            said = "unsure" if r["truth"][v] is None else _word(r["truth"][v])
            if v == "convergence":
                (overall, o_sees), (worker, w_sees) = r["truth_rise"]["overall"], r["truth_rise"]["worker"]
                said += (
                    f"; the policy's expected risk target rises by {overall:+.1%} of the range overall "
                    f"(must fail from {o_sees:+.1%} at this size), {worker:+.1%} for its worst worker "
                    f"(from {w_sees:+.1%})"
                )
            lines.append(f"- **{v}**: {_word(c['passed'])} (truth: {said}) — {c['reading']}")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def _pictures(
    out: Path, url: str, token: str | None, base: str, best: str, w_best: float
) -> list[tuple[str, str]]:
    """map, risk and trail pictures of the w_mem = 0 run and the best run, side by side."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        fields = [http.get(f"/memories/{name}/stats").json()["fields"] for name in (base, best)]

        def span(field: str, log: bool = False) -> str:
            lo = min(f[field]["min"] for f in fields)
            hi = max(f[field]["max"] for f in fields)
            if log:
                lo, hi = np.log(lo + 1e-8), np.log(hi + 1e-8)
            return f"{lo:.4g}:{max(hi, lo + 1e-6):.4g}"

        clim = [
            "soft_bind:0:1",
            f"lambda_bind:{span('lambda_bind')}",
            f"risk_target:{span('risk_target')}",
            f"log_cone_vol:{span('cone_vol', log=True)}",
        ]
        made = []
        views: tuple[tuple[str, dict[str, Any]], ...] = (
            ("map", {"basis": best, "projection": "risk", "clim": clim, "dpi": 60}),
            ("trail", {"basis": best, "projection": "risk", "last": 600, "dpi": 60}),
            ("risk", {"dpi": 60}),
        )
        for kind, params in views:
            pngs = []
            for name in (base, best):
                r = http.get(f"/memories/{name}/{kind}.png", params=params)
                r.raise_for_status()
                pngs.append(r.content)
            file = f"{kind}_w0_vs_w{w_best:g}.png"
            _side_by_side(pngs, (f"w_mem = 0 ({base})", f"w_mem = {w_best:g} ({best})"), out / file)
            made.append((file, f"{kind}: w_mem = 0 (left) vs w_mem = {w_best:g} (right)"))
    return made


def _separation(url: str, token: str | None, base: str, best: str) -> dict[str, float]:
    """How far apart the late episodes (last quarter of each buffer) of two runs lie along the
    risk axis of the best run's buffer and along its PCA map's first axis, in pooled standard
    deviations of the late coordinates."""
    from zmem_client import ZMemClient
    from zmem_service.diagnostics.projection import risk_basis

    data = {}
    for name in (base, best):
        with ZMemClient(url, memory=name, token=token, timeout=300) as client:
            data[name] = client.export()
    z_best, rt_best = data[best]["z"].astype(np.float64), data[best]["risk_target"].astype(np.float64)
    mean, axes, _ = risk_basis(z_best, rt_best)
    centred = z_best - z_best.mean(axis=0)
    pc1 = np.linalg.svd(centred, full_matrices=False)[2][0]
    out: dict[str, float] = {}
    for key, origin, axis in (("risk", mean, axes[0]), ("pca", z_best.mean(axis=0), pc1)):
        late = [data[n]["z"][-len(data[n]["z"]) // 4 :].astype(np.float64) for n in (base, best)]
        coord = [(x - origin) @ axis for x in late]
        pooled = float(np.sqrt((coord[0].var(ddof=1) + coord[1].var(ddof=1)) / 2))
        out[key] = float(abs(coord[0].mean() - coord[1].mean()) / pooled) if pooled > 0 else float("nan")
        if key == "risk":
            out["risk_0"], out["risk_best"] = float(coord[0].mean()), float(coord[1].mean())
    return out


def _diagnostics_on(url: str, token: str | None, name: str, basis: str) -> dict[str, Any] | None:
    """Memory `name`'s verdicts on the risk projection of `basis` (None if the service can't)."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(
        f"{url}/memories/{name}/diagnostics",
        params={"basis": basis, "projection": "risk"},
        headers=headers,
        timeout=300,
    )
    if r.status_code != 200:
        return None
    return {c["name"]: c for c in r.json()["criteria"]}


def _side_by_side(pngs: list[bytes], titles: tuple[str, str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    images = [imread(io.BytesIO(p), format="png") for p in pngs]
    h = max(i.shape[0] for i in images)
    w = sum(i.shape[1] for i in images)
    fig = Figure(figsize=(w / 100, h / 100 + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for k, (img, title) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_axes((k / 2, 0, 0.5, h / (h + 40)))
        ax.imshow(img)
        ax.set_axis_off()
        fig.text(k / 2 + 0.25, 1 - 20 / (h + 40), title, ha="center", va="center", fontsize=12, weight="bold")
    fig.savefig(path, format="png", metadata={"Software": None})
