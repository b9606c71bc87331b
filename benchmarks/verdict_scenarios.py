"""Synthetic training runs with known truths, for calibrating the diagnostics' verdicts.

Each scenario simulates what a memory would hold after a training run: episodes from five
workers in arrival order (z, soft_bind, cone_vol, lambda_bind, the risk target the service
computes, the worker's name) and the recorded queries the workers made on the way (the
seed's kernel risk of each episode's z over the buffer before it, its Σw and n_eff), and
states what each verdict should say about it. The truths are fixed by construction, not
by running the verdicts: a run *gets worse* when its expected risk target (the noise-free
one) rises by at least 5% of the risk targets' 10th–90th percentile range, in the newest
part of the run or along it, for all workers or for one of them.

Every scenario varies with its seed: the dimension (4 to 128), the scale of z (‖z‖ from
about 0.1 to 50), the island layout and every draw. ``run(name, seed)`` gives the arrays.

    from benchmarks.verdict_scenarios import SCENARIOS, run
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

N = 4000
"""Episodes per run."""
MIN_SIZE = 500
"""The memory's min_size: queries are recorded from here on, verdicts judge from 2×."""
WORKERS = 5
K = 64
DIMS = (4, 8, 16, 32, 64, 128)
NORMS = (0.1, 1.0, 5.0, 50.0, 0.5, 20.0, 2.0, 10.0, 0.2, 3.0)
"""Typical ‖z‖ per seed (seed % 10)."""
RISK = {"a": 1.0, "b": 0.2, "c": 0.05, "eps": 1e-8}


@dataclass(frozen=True)
class Plan:
    """How a run unfolds over progress t ∈ [0, 1).

    Islands sit around the origin; island j's episodes bind with mean soft_bind
    ``reliability[j]``. Each worker picks island j with probability ``mix(t, worker)[j]``
    (rows sum to 1; what is left to 1 goes to sparse exploration between the islands) and
    draws z around its centre with spread ``spread(t)`` (relative to the islands' base
    spread). ``noise(t)`` is the soft_bind noise's standard deviation.
    """

    reliability: tuple[float, ...]
    mix: Callable[[float, int], np.ndarray]
    spread: Callable[[float], float] = lambda t: 1.6 - 1.1 * min(1.0, t / 0.6)
    rise: float = 0.0
    """The islands' reliability drifts so that the expected risk target rises linearly by this
    fraction of the risk targets' 10th–90th percentile range over the run."""
    noise: Callable[[float], float] = lambda t: 0.05
    heavy_tails: bool = False
    """lambda_bind with a Pareto(1.5) factor: heavy-tailed risk targets."""
    weights: tuple[float, ...] | None = None
    """Islands' relative sizes at the start (equal when None)."""
    wander: int | None = None
    """A worker whose z drifts away from every island from t = 0.5 on, binding badly."""
    shape: str = "islands"
    """"islands", or a single shape without islands: "blob", "student_t", "cube"."""
    core_soft: tuple[float, float] | None = None
    """For shapes: soft_bind at the densest core and at the rim (linear in the radius rank)."""
    sigma_scale: float | None = None
    """The memory's sigma in units of ‖z‖'s scale; None: like sigma "auto" (the RMS
    distance to a stored z's 64th neighbour)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    family: str
    plan: Plan
    truth: dict[str, bool] = field(default_factory=dict)
    """What each verdict should say; a verdict not named here is not judged on this scenario."""
    note: str = ""


def _toward(start: np.ndarray, end: np.ndarray, t: float, by: float = 0.6) -> np.ndarray:
    m = min(1.0, t / by)
    return (1 - m) * start + m * end


def _converge(
    good: int, k: int, rare: float = 0.03, explore: float = 0.12
) -> Callable[[float, int], np.ndarray]:
    """From uniform over k islands (plus exploration) toward island `good`, leaving `rare`
    on the others; the policy settles by 60% of the run."""
    start = np.full(k, (1 - explore) / k)
    end = np.full(k, rare / max(k - 1, 1))
    end[good] = 1 - rare - 0.01
    return lambda t, w: _toward(start, end, t)


def _then(
    base: Callable[[float, int], np.ndarray],
    at: float,
    bad: int,
    k: int,
    workers: tuple[int, ...] | None = None,
) -> Callable[[float, int], np.ndarray]:
    """`base`, then from progress `at` on all on island `bad` (only `workers`, when given)."""
    collapsed = np.zeros(k)
    collapsed[bad] = 0.99

    def mix(t: float, w: int) -> np.ndarray:
        if t >= at and (workers is None or w in workers):
            return collapsed
        return base(t, w)

    return mix


def _steady(good: int, k: int, rare: float = 0.05) -> Callable[[float, int], np.ndarray]:
    end = np.full(k, rare / max(k - 1, 1))
    end[good] = 1 - rare - 0.01
    return lambda t, w: end


RELIABLE3 = (0.85, 0.3, 0.35)
RELIABLE5 = (0.3, 0.85, 0.4, 0.25, 0.35)
GOOD = {"convergence": True}
BAD = {"convergence": False}


def _tighten(t: float) -> float:
    return 1.6 - 1.1 * t


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        # -- good runs: converging onto a reliable island, in several guises -----------------
        Scenario(
            "converge",
            "good",
            Plan(RELIABLE3, _converge(0, 3)),
            {**GOOD, "density": True, "reliability": True},
        ),
        Scenario(
            "converge_unequal",
            "good",
            Plan(RELIABLE5, _converge(1, 5), weights=(0.4, 0.08, 0.25, 0.17, 0.1)),
            {**GOOD, "density": True, "reliability": True},
            "five islands of unequal size, the reliable one small at first",
        ),
        Scenario(
            "converge_heavy_tails",
            "good",
            Plan(RELIABLE3, _converge(0, 3), heavy_tails=True),
            {**GOOD, "density": True, "reliability": True},
            "lambda_bind with a Pareto(1.5) tail",
        ),
        Scenario(
            "converge_growing_noise",
            "good",
            Plan(RELIABLE3, _converge(0, 3), noise=lambda t: 0.05 + 0.25 * t),
            {**GOOD, "density": True, "reliability": True},
            "soft_bind noise from 0.05 to 0.30",
        ),
        Scenario(
            "converge_rare_visits",
            "good",
            Plan(RELIABLE3, _converge(0, 3, rare=0.12)),
            {**GOOD, "density": True, "reliability": True},
            "the settled policy still visits the unreliable islands 12% of the time",
        ),
        Scenario(
            "steady_tightening",
            "good",
            Plan(RELIABLE3, _steady(0, 3), spread=_tighten),
            {**GOOD, "density": True, "reliability": True},
            "settled from the start; only the spread shrinks",
        ),
        Scenario(
            "small_drift",
            "good",
            Plan(RELIABLE3, _steady(0, 3), spread=_tighten, rise=0.02),
            {**GOOD, "density": True, "reliability": True},
            "a rise of 2% of the range: below the stated minimum effect (5%)",
        ),
        # -- bad runs --------------------------------------------------------------------------
        Scenario("converge_onto_bad", "bad", Plan(RELIABLE3, _converge(1, 3)), {**BAD, "density": True}),
        Scenario(
            "collapse_at_60",
            "bad",
            Plan(RELIABLE3, _then(_converge(0, 3), 0.6, 1, 3)),
            {**BAD, "density": True, "reliability": True},
        ),
        Scenario(
            "collapse_at_80",
            "bad",
            Plan(RELIABLE3, _then(_converge(0, 3), 0.8, 1, 3)),
            {**BAD, "density": True, "reliability": True},
        ),
        Scenario(
            "collapse_at_90",
            "bad",
            Plan(RELIABLE3, _then(_converge(0, 3), 0.9, 1, 3)),
            {**BAD, "density": True, "reliability": True},
        ),
        Scenario(
            "rise_10pct",
            "bad",
            Plan(RELIABLE3, _steady(0, 3), spread=_tighten, rise=0.10),
            {**BAD, "density": True, "reliability": True},
            "the islands' reliability drifts: the risk target rises by 10% of its range",
        ),
        Scenario(
            "rise_25pct",
            "bad",
            Plan(RELIABLE3, _steady(0, 3), spread=_tighten, rise=0.25),
            {**BAD, "density": True, "reliability": True},
        ),
        Scenario(
            "worker_collapses",
            "bad",
            Plan(RELIABLE3, _then(_converge(0, 3), 0.5, 1, 3, workers=(3,))),
            {**BAD, "density": True, "reliability": True},
            "one worker of five moves onto an unreliable island at half time",
        ),
        Scenario(
            "worker_wanders",
            "bad",
            Plan(RELIABLE3, _converge(0, 3), wander=2),
            {**BAD, "density": True, "reliability": True},
            "one worker of five drifts away from every island from half time, binding badly",
        ),
        # -- shapes without islands, and reliability without them ------------------------------
        Scenario(
            "blob_reliable_core",
            "shapes",
            Plan((0.5,), lambda t, w: np.ones(1), shape="blob", core_soft=(0.9, 0.3)),
            {"density": False, "reliability": True},
        ),
        Scenario(
            "blob_unreliable_core",
            "shapes",
            Plan((0.5,), lambda t, w: np.ones(1), shape="blob", core_soft=(0.3, 0.2)),
            {"density": False, "reliability": False},
            "denser binds a little better, but nowhere binds well",
        ),
        Scenario(
            "student_t_random",
            "shapes",
            Plan((0.5,), lambda t, w: np.ones(1), shape="student_t"),
            {"density": False, "reliability": False},
        ),
        Scenario(
            "cube_random",
            "shapes",
            Plan((0.5,), lambda t, w: np.ones(1), shape="cube"),
            {"density": False, "reliability": False},
        ),
        Scenario(
            "islands_none_reliable",
            "shapes",
            Plan((0.35, 0.3, 0.4), _converge(0, 3)),
            {"density": True, "reliability": False},
        ),
        # -- the kernel -------------------------------------------------------------------------
        Scenario(
            "kernel_sigma_far_too_small",
            "kernel",
            Plan(RELIABLE3, _converge(0, 3), sigma_scale=0.002),
            {"kernel": False},
            "sigma a 500th of ‖z‖'s scale: every kernel weight underflows (nearest stored z's sit "
            "≥ 0.02 of it apart even at d = 4)",
        ),
        Scenario("kernel_auto", "kernel", Plan(RELIABLE3, _converge(0, 3)), {"kernel": True}),
    ]
}


def risk_target(soft: np.ndarray, cone: np.ndarray, lam: np.ndarray) -> np.ndarray:
    return RISK["a"] * (1 - soft) + RISK["b"] * np.log(cone + RISK["eps"]) + RISK["c"] * lam


def _outcome(
    soft_mean: np.ndarray, noise: np.ndarray, heavy: bool, draws: np.ndarray
) -> dict[str, np.ndarray]:
    """Episode fields at mean soft_bind [n] with the given noise sd [n]; draws [4, n] are the
    standard normal (3) and Pareto (1) draws, so that a drift changes nothing else."""
    soft = np.clip(soft_mean + noise * draws[0], 0.0, 1.0)
    cone = np.exp(-1.0 + 1.5 * (1 - soft) + 0.1 * draws[1])
    lam = np.clip(2.0 * (1 - soft) + 0.1 * draws[2], 0.0, None)
    if heavy:
        lam = lam * (1 + draws[3])
    return {"soft_bind": soft, "cone_vol": cone, "lambda_bind": lam}


def run(name: str, seed: int) -> dict[str, Any]:
    """One run of scenario `name`: arrays for ``diagnostics.evaluate`` and what was meant.

    Returns ``{"z" [N, d] float32, "soft_bind", "cone_vol", "lambda_bind", "risk_target",
    "expected_risk_target" [N] float64, "worker" [N] str, "queries": {"risk", "wsum",
    "n_eff"} [Q], "sigma", "k", "min_size", "d", "norm"}``.
    """
    sc = SCENARIOS[name]
    plan = sc.plan
    rng = np.random.default_rng([seed, sorted(SCENARIOS).index(name), 2026])
    d = DIMS[seed % len(DIMS)]
    norm = NORMS[seed % len(NORMS)]
    t = np.arange(N) / N
    who = np.arange(N) % WORKERS
    base = 0.8 * np.sqrt(8 / d)  # per-coordinate spread: an island's radius ≈ 2.3 in any d
    k_isl = len(plan.reliability)
    if plan.shape == "islands":
        directions = rng.normal(size=(k_isl, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        centres = 7.0 * directions
        weights = np.asarray(plan.weights or np.ones(k_isl), dtype=np.float64)
        z = np.zeros((N, d))
        soft_mean = np.zeros(N)
        for i in range(N):
            p = np.clip(plan.mix(float(t[i]), int(who[i])), 0.0, None)
            total = min(float(p.sum()), 1.0)
            p = p * weights  # unequal islands: their shares scale, exploration keeps its own
            p = p / p.sum() * total
            explore = 1.0 - total
            j = rng.choice(k_isl + 1, p=np.r_[p, explore])
            if j < k_isl:
                z[i] = centres[j] + plan.spread(float(t[i])) * base * rng.normal(size=d)
                soft_mean[i] = plan.reliability[j]
            else:
                z[i] = rng.uniform(-8, 8, size=d) * np.sqrt(3 / d) * 1.5
                soft_mean[i] = 0.2
        if plan.wander is not None:
            mine = (who == plan.wander) & (t >= 0.5)
            away = rng.normal(size=d)
            away /= np.linalg.norm(away)
            steps = (t[mine] - 0.5) / 0.5
            z[mine] = (
                centres[0]
                + (2.0 + 12.0 * steps)[:, None] * away
                + base * rng.normal(size=(int(mine.sum()), d))
            )
            soft_mean[mine] = 0.85 - 0.55 * np.minimum(1.0, 2 * steps)
    else:
        if plan.shape == "blob":
            z = rng.normal(size=(N, d)) * np.linspace(2.0, 0.5, d)
        elif plan.shape == "student_t":
            z = rng.standard_t(3, size=(N, d))
        else:
            z = rng.uniform(-1, 1, size=(N, d))
        radius = np.linalg.norm(z / z.std(axis=0), axis=1)
        rank = np.argsort(np.argsort(radius)) / (N - 1)
        lo_hi = plan.core_soft
        soft_mean = rng.uniform(0, 1, size=N) if lo_hi is None else lo_hi[0] + (lo_hi[1] - lo_hi[0]) * rank
    noise = np.array([plan.noise(float(x)) for x in t])
    draws = np.vstack([rng.normal(size=(3, N)), rng.pareto(1.5, size=(1, N))])
    undrifted = soft_mean
    drift = np.zeros(N)
    for _ in range(4):  # the range moves with the drift: a few fixed-point steps
        soft_mean = np.clip(undrifted - drift, 0.0, 1.0)
        out = _outcome(soft_mean, noise, plan.heavy_tails, draws)
        rt = risk_target(out["soft_bind"], out["cone_vol"], out["lambda_bind"])
        p10, p90 = np.percentile(rt, [10, 90])
        # the risk target moves 1.4× as far as soft_bind (a + 1.5 b + 2 c), the other way
        drift = plan.rise * float(p90 - p10) / 1.4 * t
    # The noise-free target (at the mean soft_bind, cone and lambda noise averaged out).
    expected = 1.4 * (1 - soft_mean) - 0.2
    scale = norm / float(np.median(np.linalg.norm(z, axis=1)))
    z = (z * scale).astype(np.float32)
    if plan.sigma_scale is None:
        sample = z[rng.choice(N, size=min(N, 1000), replace=False)]
        d2, _ = faiss.knn(sample, z, K + 1)
        sigma = float(np.sqrt(np.mean(d2[:, K])))
    else:
        sigma = plan.sigma_scale * norm
    queries = _queries(z, rt, sigma)
    return {
        "z": z,
        **out,
        "risk_target": rt,
        "expected_risk_target": expected,
        "worker": np.array([f"worker-{w}" for w in who]),
        "queries": queries,
        "sigma": sigma,
        "k": K,
        "min_size": MIN_SIZE,
        "d": d,
        "norm": norm,
    }


def _queries(z: np.ndarray, rt: np.ndarray, sigma: float, chunk: int = 250) -> dict[str, np.ndarray]:
    """Each episode's z from MIN_SIZE on, queried against the buffer as it was (up to the
    start of its chunk of `chunk` episodes): the seed's kernel risk, Σw and n_eff."""
    risk, wsum, n_eff = [], [], []
    for start in range(MIN_SIZE, z.shape[0], chunk):
        q = z[start : start + chunk]
        d2, idx = faiss.knn(q, z[:start], K)
        w = np.exp(-d2.astype(np.float64) / (2 * sigma**2))
        s = w.sum(axis=1)
        wn = w / (s[:, None] + 1e-8)
        risk.append((wn * rt[idx]).sum(axis=1))
        wsum.append(s)
        share = w / np.where(s > 0, s, 1.0)[:, None]
        n_eff.append(np.where(s > 0, 1 / np.maximum((share**2).sum(axis=1), 1e-300), 0.0))
    return {"risk": np.concatenate(risk), "wsum": np.concatenate(wsum), "n_eff": np.concatenate(n_eff)}
