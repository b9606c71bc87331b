"""PNG pictures of a memory: the seed's 2×2 PCA map, the arrival-order trail, the query risk.

Pure functions from numpy arrays to PNG bytes. Each call builds its own
``matplotlib.figure.Figure`` on an Agg canvas and drops it, so nothing global is kept
(pyplot is never imported: its figure registry leaks in a server). The same inputs give
byte-identical PNGs: the only varying PNG metadata (the Matplotlib version) is stripped.
"""

from __future__ import annotations

import functools
import io
import itertools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..diagnostics import trends
from ..diagnostics.projection import PROJECTIONS, pca_axes, risk_basis

MAP_FIELDS = ("soft_bind", "log_cone_vol", "lambda_bind", "risk_target")
"""Names of the map's panels, as fixed colour limits name them."""
TRAIL_FIELDS = ("density",)
"""The trail's colour scale that fixed limits may name: its background density (points/cell)."""
Limits = dict[str, tuple[float, float]]

MAP_SIZE = (12.0, 10.0)
"""Map and trail figure size in inches (the seed's), 1200×1000 px at 100 dpi."""
RISK_SIZE = (12.0, 5.0)
"""Risk-over-queries figure size in inches."""


def pca_basis(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of z [N, d] by numpy SVD of the centred data (seed §4.2): the map's axes, and the
    diagnostics' (``diagnostics.projection.pca_axes``, which says how).

    Returns (mean [d], components [2, d]) in float64; project with
    ``(z - mean) @ components.T``. Each component's largest-magnitude entry is positive.
    A component the data has no variance along (d = 1, N ≤ 2, all points equal) is zeros;
    N = 0 gives a zero mean.

    Raises:
        ValueError: z is neither [N, d] nor empty.
    """
    mean, comps, _ = pca_axes(z)
    return mean, comps


def _projection(
    z: np.ndarray,
    basis_z: np.ndarray | None,
    projection: str = "pca",
    risk_target: np.ndarray | None = None,
    basis_risk_target: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [d], axes [2, d] and the fraction of z's variance along each [2]: the PCA of z
    itself, or of `basis_z` [M, d] (another buffer's map) when given; with projection "risk",
    the risk projection (``diagnostics.projection.risk_basis``) of the same buffer instead."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    if projection == "risk":
        src, target = (z, risk_target) if basis_z is None else (basis_z, basis_risk_target)
        if target is None:
            raise ValueError("the risk projection needs the risk targets of its basis")
        mean, comps, frac = risk_basis(src, target)
        if basis_z is None:
            return mean, comps, frac
    elif basis_z is None:
        return pca_axes(z)
    else:
        mean, comps, _ = pca_axes(basis_z)
    centred = z - z.mean(axis=0, dtype=np.float64)
    total = float((centred**2).sum())
    along = ((centred @ comps.T) ** 2).sum(axis=0)
    return mean, comps, along / total if total > 0 else np.zeros(2)


def _sample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of ≤ max_points of range(n)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


_drawing = threading.local()  # .started: the current render has checked its arguments and draws


def _figure(size: tuple[float, float], dpi: int) -> Figure:
    _drawing.started = True
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _message(size: tuple[float, float], dpi: int, title: str, message: str) -> bytes:
    """A picture of the usual size that says ``message`` instead of drawing data."""
    fig = _figure(size, dpi)
    fig.suptitle(title)
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=18, color="0.4")
    return _png(fig, dpi)


Render = TypeVar("Render", bound=Callable[..., bytes])


def said_if_undrawable(size: tuple[float, float]) -> Callable[[Render], Render]:
    """A render that matplotlib can't draw (extreme colour limits, a basis that projects the
    points to huge coordinates) gives a picture saying why, not an error: the request was
    valid, the view just can't be drawn."""

    def wrap(render: Render) -> Render:
        @functools.wraps(render)
        def drawn(*args: Any, **kwargs: Any) -> bytes:
            _drawing.started = False
            try:
                return render(*args, **kwargs)
            except (ValueError, OverflowError, FloatingPointError, np.linalg.LinAlgError) as e:
                if not _drawing.started:  # the arguments were wrong: that stays an error
                    raise
                why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                message = f"this view can't be drawn ({why});\ntry other colour limits or another basis"
                return _message(size, kwargs.get("dpi", 100), kwargs.get("title", ""), message)

        return drawn  # type: ignore[return-value]

    return wrap


def _episodes(n: int) -> str:
    return f"{n} episode{'' if n == 1 else 's'}"


def _pc_labels(ax: Axes, frac: np.ndarray, projection: str = "pca") -> None:
    if projection == "risk":
        ax.set_xlabel(
            f"risk axis: the direction that best predicts the risk target ({frac[0]:.1%} of variance)"
        )
        ax.set_ylabel(f"PC1 orthogonal to it ({frac[1]:.1%} of variance)")
        return
    ax.set_xlabel(f"PC1 ({frac[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({frac[1]:.1%} of variance)")


def _limits(c: np.ndarray, fixed: tuple[float, float] | None) -> tuple[float, float, str]:
    """Fixed colour limits when given (with the colour bar's ``extend`` for what falls
    outside them), else ``_robust_limits``."""
    if fixed is None:
        return _robust_limits(c)
    lo, hi = fixed
    low, high = bool(c.size and c.min() < lo), bool(c.size and c.max() > hi)
    return lo, hi, {(0, 0): "neither", (1, 0): "min", (0, 1): "max", (1, 1): "both"}[low, high]


def _scale_note(lo: float, hi: float, fixed: bool) -> str:
    """What a map panel's colours span, said on the panel: each panel's scale fits its own
    data, so yellow is only the top of what is shown (soft_bind 0.36 in a run that never binds
    well), not "good"."""
    how = "fixed" if fixed else "1st–99th percentile shown"
    return f"colours: purple {lo:.3g} … yellow {hi:.3g} ({how})"


def _robust_limits(c: np.ndarray) -> tuple[float, float, str]:
    """1st–99th percentile colour limits, so a few outliers (log(0 + eps) = −18) don't wash
    out the scale, and the colour bar's ``extend`` that marks what was clipped."""
    lo, hi = (float(v) for v in np.percentile(c, [1, 99]))
    if lo == hi:
        lo, hi = float(c.min()), float(c.max())
    if lo == hi:
        return lo - 0.5, hi + 0.5, "neither"
    low, high = bool(c.min() < lo), bool(c.max() > hi)
    return lo, hi, {(0, 0): "neither", (1, 0): "min", (0, 1): "max", (1, 1): "both"}[low, high]


@said_if_undrawable(MAP_SIZE)
def render_map(
    z: np.ndarray,
    soft_bind: np.ndarray,
    cone_vol: np.ndarray,
    lambda_bind: np.ndarray,
    risk_target: np.ndarray,
    *,
    title: str,
    max_points: int = 5000,
    seed: int = 0,
    dpi: int = 100,
    eps: float = 1e-8,
    basis_z: np.ndarray | None = None,
    clim: Limits | None = None,
    projection: str = "pca",
    basis_risk_target: np.ndarray | None = None,
) -> bytes:
    """The seed's 2×2 PCA map of the buffer, as PNG bytes (12×10 in at ``dpi``).

    z is [N, d]; the other arrays are [N]. The PCA basis is ``pca_basis(z)`` of the whole
    buffer (the trail uses the same), or that of ``basis_z`` [M, d] (another memory's
    buffer) so that two maps share axes; at most ``max_points`` points are drawn, a seeded
    subsample (``default_rng(seed)``, without replacement, in arrival order). Panels are
    coloured by soft_bind, log(cone_vol + eps), lambda_bind and the risk target, each on its
    1st–99th percentile unless ``clim`` fixes its (lo, hi) by name (``MAP_FIELDS``); each
    panel's title says the range its colours span. With
    ``projection="risk"`` the axes are the risk projection of the buffer (or of the basis,
    whose risk targets ``basis_risk_target`` [M] then come with ``basis_z``) instead of its
    PCA. With fewer than 2 episodes the picture says so.

    Raises:
        ValueError: max_points < 1, or an unknown projection.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be ≥ 1, got {max_points}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    z = np.asarray(z)
    n = z.shape[0] if z.ndim == 2 else 0
    if n < 2:
        return _message(MAP_SIZE, dpi, title, f"no map yet ({_episodes(n)})")
    mean, comps, frac = _projection(
        z, basis_z, projection, np.asarray(risk_target, dtype=np.float64), basis_risk_target
    )
    idx = _sample(n, max_points, seed)
    xy = (z[idx] - mean) @ comps.T
    panels = [
        ("soft_bind", "soft_bind", np.asarray(soft_bind)[idx].astype(np.float64)),
        ("log_cone_vol", "log(cone_vol)", np.log(np.asarray(cone_vol)[idx].astype(np.float64) + eps)),
        ("lambda_bind", "lambda_bind", np.asarray(lambda_bind)[idx].astype(np.float64)),
        ("risk_target", "risk (regularizer target)", np.asarray(risk_target)[idx].astype(np.float64)),
    ]
    clim = clim or {}
    fig = _figure(MAP_SIZE, dpi)
    shown = f"{idx.size} of {n} shown" if idx.size < n else f"all {n} shown"
    fig.suptitle(f"{title}\n{shown}")
    for ax, (field, name, c) in zip(fig.subplots(2, 2).ravel(), panels, strict=True):
        lo, hi, extend = _limits(c, clim.get(field))
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=c, s=10, alpha=0.5, vmin=lo, vmax=hi, lw=0)
        fig.colorbar(sc, ax=ax, label=name, extend=extend)
        ax.set_title(f"z-memory: {name}\n{_scale_note(lo, hi, field in clim)}", fontsize="medium")
        _pc_labels(ax, frac, projection)
    return _png(fig, dpi)


@said_if_undrawable(MAP_SIZE)
def render_trail(
    z: np.ndarray,
    *,
    worker: np.ndarray | None = None,
    only: str | None = None,
    last: int = 1000,
    title: str,
    max_points: int = 5000,
    seed: int = 0,
    dpi: int = 100,
    basis_z: np.ndarray | None = None,
    clim: Limits | None = None,
    projection: str = "pca",
    risk_target: np.ndarray | None = None,
    basis_risk_target: np.ndarray | None = None,
) -> bytes:
    """The last ``last`` z's as one time-coloured path per worker over the buffer's density.

    z is [N, d], the whole buffer in arrival order; ``worker`` [N] names each row's worker
    (None or "" for none; absent: one path). The PCA basis is ``pca_basis(z)`` of the whole
    buffer, as on the map, or that of ``basis_z`` [M, d]. The grey background is a log-scaled
    hexbin density of the points the map draws (the same seeded subsample of ≤ ``max_points``),
    its colour limits fixed by ``clim["density"]`` when given. On it, the last ``min(last, N)``
    z's (of worker ``only``, when given), each worker's in arrival order as its own faint line,
    never joined to another worker's, through points coloured by arrival order; each path's
    start and end are marked. With ``projection="risk"`` the axes are the map's risk
    projection (of z with its ``risk_target`` [N], or of ``basis_z`` with
    ``basis_risk_target``). Fewer than 2 episodes: the picture says so.

    Raises:
        ValueError: last < 1 or max_points < 1, an unknown projection, or the risk projection
            without its risk targets.
    """
    if last < 1 or max_points < 1:
        raise ValueError(f"last and max_points must be ≥ 1, got {last} and {max_points}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    if projection == "risk" and (risk_target if basis_z is None else basis_risk_target) is None:
        raise ValueError("the risk projection needs the risk targets of its basis")
    z = np.asarray(z)
    n = z.shape[0] if z.ndim == 2 else 0
    if n < 2:
        return _message(MAP_SIZE, dpi, title, f"no trail yet ({_episodes(n)})")
    names = (
        np.array(["" if w is None else str(w) for w in worker], dtype=object) if worker is not None else None
    )
    rows = np.arange(n) if only is None or names is None else np.flatnonzero(names == only)
    if rows.size == 0:
        return _message(MAP_SIZE, dpi, title, f"no episodes from worker {only!r}")
    mean, comps, frac = _projection(z, basis_z, projection, risk_target, basis_risk_target)
    bg = (z[_sample(n, max_points, seed)] - mean) @ comps.T
    order = rows[-last:]
    trail = (z[order] - mean) @ comps.T
    who = names[order] if names is not None else np.full(order.size, "", dtype=object)
    paths = sorted(set(who.tolist()), key=lambda w: int(np.flatnonzero(who == w)[0]))

    fig = _figure(MAP_SIZE, dpi)
    whose = f"worker {only!r}" if only is not None else f"{len(paths)} worker{'' if len(paths) == 1 else 's'}"
    fig.suptitle(f"{title}\nlast {order.size} of {n} episodes in arrival order, {whose}, one path each")
    ax = fig.subplots()
    extent = _extent(np.vstack([bg, trail]))
    fixed = (clim or {}).get("density")
    norm: dict[str, Any] = {"vmin": fixed[0], "vmax": fixed[1]} if fixed else {}
    hb = ax.hexbin(bg[:, 0], bg[:, 1], gridsize=60, bins="log", cmap="Greys", mincnt=1, extent=extent, **norm)
    fig.colorbar(hb, ax=ax, label=f"buffer density (points per cell, {bg.shape[0]} sampled)")
    marked = len(paths) <= 10  # beyond that, start/end marks and a legend are clutter
    marks: dict[str, Any] = {"s": 120, "edgecolors": "black", "linewidths": 1.0, "zorder": 4}
    for i, name in enumerate(paths):
        mine = trail[who == name]
        colour = f"C{i % 10}"
        label = name or "(no worker)"
        ax.plot(
            mine[:, 0],
            mine[:, 1],
            color=colour,
            lw=0.7,
            alpha=0.35,
            zorder=2,
            label=label if marked else None,
        )
        if marked:
            ax.scatter(mine[0, 0], mine[0, 1], marker="o", c="white", **marks)
            ax.scatter(mine[-1, 0], mine[-1, 1], marker="*", c=colour, **marks)
    sc = ax.scatter(trail[:, 0], trail[:, 1], c=order, cmap="plasma", s=12, lw=0, alpha=0.85, zorder=3)
    fig.colorbar(sc, ax=ax, label="arrival order (index in buffer, oldest = 0)")
    if marked:
        ax.legend(loc="upper right", title="worker (○ start, ★ end)", fontsize="small")
    ax.set_title("z trail over the buffer's density")
    _pc_labels(ax, frac, projection)
    return _png(fig, dpi)


def _extent(xy: np.ndarray) -> tuple[float, float, float, float]:
    """Hexbin extent covering xy [n, 2] with a margin, never degenerate."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    pad = np.maximum((hi - lo) * 0.05, 1e-6)
    return (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])


WORKER_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")
"""One colour per worker on the risk picture (in order of first query; repeating past nine):
matplotlib's cycle without its red, which marks the spikes."""


@said_if_undrawable(RISK_SIZE)
def render_risk(
    risk: np.ndarray,
    *,
    title: str,
    worker: np.ndarray | None = None,
    only: str | None = None,
    scale: float | None = None,
    margin: float = 0.25,
    mad_k: float = 5.0,
    dpi: int = 100,
) -> bytes:
    """Kernel risk of the recorded queries over query index, as PNG bytes (12×5 in at dpi).

    risk is [Q] in arrival order, cut into the fifths the convergence verdict compares. Its
    spikes are the verdict's: values above a fixed level, the median of the earlier fifth with
    the lowest median plus ``margin`` × ``scale`` (the risk targets' 10th–90th percentile
    range; the series' own when None) or ``mad_k`` of that fifth's MADs, whichever is more
    (``diagnostics.trends.exceedances``). They are red, the level is a dashed line, and each
    fifth shows its share of spikes; the series' median is a grey line. ``worker`` [Q] names
    each query's worker (None or "" for none): each worker's queries get a colour of their
    own, and with ``only`` just that worker's are drawn, at their place in the whole series,
    against the whole series' spike level, with that worker's share of spikes per fifth. Too
    short a series for fifths has no spike level. Empty, or no query of worker ``only``
    (or no worker names at all): the picture says so.
    """
    r = np.asarray(risk, dtype=np.float64).ravel()
    q = r.size
    names = None if worker is None else np.array(["" if w is None else str(w) for w in worker], dtype=object)
    if names is not None and names.size != q:
        raise ValueError(f"risk has {q} rows but worker {names.size}")
    if names is not None and not any(names):
        names = None  # a worker column that names nobody
    if q == 0:
        return _message(RISK_SIZE, dpi, title, "no recorded queries yet")
    if only is not None and names is None:
        return _message(RISK_SIZE, dpi, title, "the recorded queries carry no worker names")
    mine = np.ones(q, bool) if only is None or names is None else names == only
    if not mine.any():
        return _message(RISK_SIZE, dpi, title, f"no recorded queries from worker {only!r}")
    s = float(np.subtract(*np.percentile(r, [90, 10]))) if scale is None else float(scale)
    found = trends.exceedances(r, max(s, 1e-12), margin=margin, spread=mad_k, min_effect=0.0, z=0.0)
    level = None if found is None else found[1]
    spikes = (r > level if level is not None else np.zeros(q, bool)) & mine
    med = float(np.median(r[mine]))
    x = np.arange(q)

    fig = _figure(RISK_SIZE, dpi)
    fig.suptitle(title if only is None else f"{title}\nworker {only!r}: {int(mine.sum())} of {q} queries")
    ax = fig.subplots()
    if names is None:
        ax.plot(x, r, color="tab:blue", lw=0.7, alpha=0.8, label="risk of a recorded query")
    else:
        # colours by first query among all workers, so a worker keeps its colour under ?worker=
        who = sorted(set(names.tolist()), key=lambda w: int(np.flatnonzero(names == w)[0]))
        labelled = len(who) <= 10 or only is not None  # beyond that a legend is clutter
        for i, name in enumerate(who):
            if only is not None and name != only:
                continue
            rows = np.flatnonzero(names == name)
            label = f"{name or '(no worker)'}: {rows.size} queries" if labelled else None
            colour = WORKER_COLOURS[i % len(WORKER_COLOURS)]
            # one faint line per worker, never joined to another's, through its queries' dots
            ax.plot(x[rows], r[rows], color=colour, lw=0.5, alpha=0.45)
            ax.scatter(x[rows], r[rows], color=colour, s=5, lw=0, alpha=0.8, label=label)
    whose = "" if only is None else f" of worker {only!r}"
    ax.axhline(med, color="0.3", ls="-", lw=1, alpha=0.6, label=f"median{whose} {med:.3g}")
    if level is not None:
        ax.axhline(level, color="tab:red", ls="--", lw=1, label=f"spike level {level:.3g}")
    ax.scatter(
        x[spikes],
        r[spikes],
        color="tab:red",
        marker="x" if names is not None else "o",
        s=18,
        zorder=3,
        label=f"spikes{whose}: {int(spikes.sum())} ({spikes.sum() / mine.sum():.1%})",
    )
    if level is not None:
        edges = np.linspace(0, q, trends.WINDOWS + 1).round().astype(int)
        for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
            if i:
                ax.axvline(lo - 0.5, color="0.6", lw=1)
            count = int(mine[lo:hi].sum())
            ax.text(
                (i + 0.5) / trends.WINDOWS,
                0.97,
                f"{spikes[lo:hi].sum() / count:.1%} spikes" if count else "no queries",
                transform=ax.transAxes,
                ha="center",
                va="top",
                color="0.35",
                bbox={"fc": "white", "ec": "none", "alpha": 0.8},
            )
    ax.set_xlim(-0.5, q - 0.5)
    ax.set_xlabel(f"recorded query (oldest = 0, {q} kept)")
    ax.set_ylabel("kernel risk")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", markerscale=2)
    return _png(fig, dpi)
