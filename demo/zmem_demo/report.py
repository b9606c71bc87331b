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


MIN_EFFECT = 0.05
"""The convergence verdict's stated minimum effect: a rise of 5% of the risk targets'
10th–90th percentile range is the smallest it calls the run getting worse."""
RELIABLE_SOFT_BIND, RELIABLE_MARGIN, RELIABLE_LAMBDA = 0.5, 0.1, 0.5
"""The reliability verdict's rule for a reliable island: mean soft_bind ≥ 0.5 and ≥ 0.1 above
the least reliable group (or above 0.5 when all bind well), or mean lambda_bind ≤ half the
highest group's."""
FIFTHS = 5


def _fifths(progress: np.ndarray, x: np.ndarray) -> list[float]:
    return [float(x[(progress >= f / FIFTHS) & (progress < (f + 1) / FIFTHS)].mean()) for f in range(FIFTHS)]


def _rise(progress: np.ndarray, expected: np.ndarray, scale: float) -> float:
    """How much a noise-free risk-target series [n] over progress [n] rises, in units of
    `scale`: its newest fifth above its best earlier fifth, or its least-squares line over the
    run, whichever is more (the run gets worse from MIN_EFFECT on)."""
    f = _fifths(progress, expected)
    slope = float(np.polyfit(progress, expected, 1)[0])
    return max(f[-1] - min(f[:-1]), slope) / scale


def _truth(run: dict[str, Any]) -> dict[str, bool]:
    """What each verdict should say about a toy run, in the verdict's own terms, from the toy's
    noise-free outcomes: for convergence the policy's expected risk target at each step
    (``toy.policy_soft_bind``: no outcome noise and no sampling noise of the policy's draws),
    for reliability the noise-free soft_bind at each stored episode's side coordinate."""
    from .toy import expected_soft_bind, policy_soft_bind

    e = run["episodes"]
    # the service's risk targets with the default weights (a, b, c, eps) = (1, 0.2, 0.05, 1e-8)
    actual = (1 - e["soft_bind"]) + 0.2 * np.log(e["cone_vol"] + 1e-8) + 0.05 * e["lambda_bind"]
    p10, p90 = np.percentile(actual, [10, 90])
    scale = float(p90 - p10)
    expected = 1.4 * (1 - policy_soft_bind(e["policy_side"], e["policy_std"])) - 0.2
    rises = [_rise(e["progress"], expected, scale)] + [
        _rise(e["progress"][e["worker"] == w], expected[e["worker"] == w], scale)
        for w in np.unique(e["worker"])
    ]
    run["truth_rise"] = (rises[0], max(rises[1:]))
    worse = max(rises) >= MIN_EFFECT
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
        "convergence": not worse,
        "kernel": True,  # d = 8, sigma 1, z's ~0.35 apart: the kernel is alive
    }


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
    agreeing = sum(all(r["verdicts"][v]["passed"] is r["truth"][v] for v in VERDICTS) for r in runs)
    offset = getattr(args, "seed_offset", 0)
    print(
        f"zmem demo: every verdict agrees with its truth in {agreeing} of {len(runs)} runs", file=sys.stderr
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
            agree = sum(g is t for g, t in zip(got, truth, strict=True))
            passed = sum(g is True for g in got)
            cells.append(
                f"{passed}/{len(got)} pass (truth {sum(truth)}/{len(truth)}; agrees {agree}/{len(got)})"
            )
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
        "the toy's noise-free outcomes (soft_bind = sigmoid(3s) at each episode's side coordinate s; for "
        "convergence its expectation over the policy's draws at each step): "
        "density passes (three zones make islands); reliability passes when some zone (an island of "
        f"the map) has mean soft_bind ≥ {RELIABLE_SOFT_BIND} and ≥ {RELIABLE_MARGIN} above the least "
        f"reliable zone, or mean lambda_bind ≤ {RELIABLE_LAMBDA:g}× the highest zone's; convergence "
        "passes unless the noise-free risk target gets worse by the verdict's minimum effect "
        f"({MIN_EFFECT:.0%} of the risk targets' 10th–90th percentile range) in the newest fifth of "
        "the run against its best earlier fifth, or along a straight line over the run, for all "
        "workers together or for any one (the policy's spread anneals, so every run clusters more); "
        "kernel passes (d = 8).",
        "",
        f"**Every verdict agrees with its truth in {agreeing} of {len(runs)} runs.**",
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
            said = _word(r["truth"][v])
            if v == "convergence":
                overall, worker = r["truth_rise"]
                said += (
                    f"; the policy's expected risk target rises by {overall:+.1%} of the range overall, "
                    f"{worker:+.1%} for its worst worker"
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
