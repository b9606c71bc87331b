"""The demo's report folder: summary.md and side-by-side pictures in one PCA basis."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np

VERDICTS = ("density", "reliability", "convergence", "kernel")
LATE = 0.75  # episodes in the last quarter of training are "late"
RELIABLE_ZONE = 0.6  # the truth of reliability: some zone binds clearly better than a coin flip


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


def _truth(s: dict[str, Any]) -> dict[str, bool]:
    """What each verdict should say about a toy run, from the toy's ground truth."""
    return {
        "density": True,  # three task zones: the map has islands whatever w_mem is
        # the zones are the map's islands: one must bind well on average
        "reliability": s["best_zone_soft_bind"] >= RELIABLE_ZONE,
        "convergence": s["late_reliable"] >= 0.5 and s["late_reliable"] >= s["early_reliable"],
        "kernel": True,  # d = 8, sigma 1, z's ~0.35 apart: the kernel is alive
    }


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
        run["truth"] = _truth(run["stats"])

    ws = sorted({r["w"] for r in runs})
    by_w = {w: [r for r in runs if r["w"] == w] for w in ws}
    best = max(ws, key=lambda w: (np.mean([r["stats"]["late_reliable"] for r in by_w[w]]), -w))
    base = [r["stats"] for r in by_w[0.0]]
    suggested = float(
        np.median([s["g_task_all"] / s["g_risk_all"] for s in base if s["g_risk_all"] > 0] or [np.nan])
    )

    lines = [
        "# zmem demo: does the memory regularizer steer z away from unreliable regions?",
        "",
        f"Toy: 8-d z, three task zones, each with a reliable side (soft_bind ≈ 0.9) and an unreliable one "
        f"(≈ 0.1); the task prefers the unreliable side a little. {args.workers} worker processes per run "
        f"record into one memory through `ZMemClient` (pickled into each); {size['episodes']} episodes "
        "per run, "
        f"min_size {size['min_size']}, k 64, sigma 1.0; seeds 0..{size['seeds'] - 1} for every w_mem. "
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
        "Late = the last quarter of each run's episodes. Truths: density passes (three zones make islands); "
        f"reliability passes when some zone (an island of the map) has mean soft_bind ≥ {RELIABLE_ZONE}; "
        "convergence passes when the late episodes are mostly on reliable sides and no fewer than early on; "
        "kernel passes (d = 8).",
        "",
        "## Force balance",
        "",
        f"In the w_mem = 0 runs, once the memory is active, the median ‖∇task‖ is "
        f"{np.median([s['g_task_all'] for s in base]):.3f} and the median ‖∇risk‖ "
        f"{np.median([s['g_risk_all'] for s in base]):.4f}: the two forces are equal at "
        f"w_mem ≈ {suggested:.2g}. "
        f"The best w_mem here was {best:g} (late reliable share "
        f"{np.mean([r['stats']['late_reliable'] for r in by_w[best]]):.0%}).",
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

    pictures = _pictures(out, url, token, by_w[0.0][0]["name"], by_w[best][0]["name"], best)
    lines += ["## Pictures (seed 0; both in the PCA basis of the best run, on shared colour scales)", ""]
    lines += [f"![{title}]({file})" for file, title in pictures]
    lines += ["", "## Each run's verdict readings", ""]
    for r in runs:
        lines.append(f"### w_mem = {r['w']:g}, seed {r['seed']} (memory `{r['name']}`)")
        for v in VERDICTS:
            c = r["verdicts"][v]
            lines.append(f"- **{v}**: {_word(c['passed'])} (truth: {_word(r['truth'][v])}) — {c['reading']}")
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
            ("map", {"basis": best, "clim": clim, "dpi": 60}),
            ("trail", {"basis": best, "last": 600, "dpi": 60}),
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
