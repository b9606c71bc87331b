"""The demo's toy task and the training loop each worker process runs (imports torch).

An 8-d z space holds three task zones. Each zone has a reliable side and an unreliable one
along its own axis u_j: an episode at signed side coordinate s = (z − c_j)·u_j binds with
soft_bind ≈ sigmoid(3s) (reliable for s > 0). The task itself prefers the unreliable side a
little: its loss 0.5‖z − c_j‖² + β·s is smallest at s = −β. A Gaussian policy (one mean head
per zone, its spread annealed over training) samples z = μ_j + std·ε and is trained by SGD
on the task loss plus ``w_mem · risk(z)``, the kernel risk from the zmem memory, through the real client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Z_DIM = 8
ZONES = 3
SIDE_AXES = (2, 3, 4)  # zone j's reliable side lies along +e_{SIDE_AXES[j]}
PREFERENCE = 0.15  # β: how strongly the task prefers the unreliable side
POLICY_STD = (0.6, 0.25)  # the policy's spread, annealed from the first to the second over training
LEARNING_RATE = 0.05
BATCH = 8  # episodes per training step (one query of BATCH rows)


def centres() -> np.ndarray:
    """Zone centres [3, 8]: a triangle of radius 6 in the first two coordinates."""
    c = np.zeros((ZONES, Z_DIM))
    for j in range(ZONES):
        angle = 2 * np.pi * j / ZONES
        c[j, :2] = 6 * np.cos(angle), 6 * np.sin(angle)
    return c


def side_axes() -> np.ndarray:
    u = np.zeros((ZONES, Z_DIM))
    for j, axis in enumerate(SIDE_AXES):
        u[j, axis] = 1.0
    return u


def expected_soft_bind(s: np.ndarray) -> np.ndarray:
    """The noise-free soft_bind at side coordinate s [n] (what ``outcome`` scatters around)."""
    with np.errstate(over="ignore"):
        return np.asarray(1 / (1 + np.exp(-3 * np.asarray(s, dtype=np.float64))))


def policy_soft_bind(mean_side: np.ndarray, std: np.ndarray | float) -> np.ndarray:
    """The policy's expected noise-free soft_bind E[sigmoid(3s)] over its draws s ~ N(mean_side,
    std²) (the side coordinate of z = μ + std·ε): what a step's episodes bind on average,
    without the sampling noise of any one draw (Gauss–Hermite, 32 nodes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(32)
    m = np.asarray(mean_side, dtype=np.float64)[..., None]
    sd = np.asarray(std, dtype=np.float64)[..., None]
    return np.asarray((expected_soft_bind(m + sd * nodes) * weights).sum(axis=-1) / weights.sum())


def policy_risk_moments(mean_sides: np.ndarray, std: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The mean and variance of one episode's risk target (default weights) under the policy,
    its zone drawn uniformly: ``mean_sides`` [..., ZONES] holds each zone's mean side
    coordinate, ``std`` [...] the policy's spread. The variance counts the zone draw, the
    policy's draw s ~ N(mean side, std²) and the outcome noise of ``outcome`` (its clipping
    left out, as ``expected_risk_target`` leaves it out): the risk target is
    1.4·(1 − soft_bind) − 0.2 plus 0.02·(cone noise) + 0.005·(lambda noise), and soft_bind
    is sigmoid(3s) plus 0.05·(noise). Returns two float64 arrays [...] (Gauss–Hermite, 32 nodes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(32)
    weights = weights / weights.sum()
    m = np.asarray(mean_sides, dtype=np.float64)[..., None]
    sd = np.asarray(std, dtype=np.float64)[..., None, None]
    p = expected_soft_bind(m + sd * nodes)  # [..., ZONES, nodes]
    p_mean = (p * weights).sum(axis=-1)
    p_var = np.maximum((p**2 * weights).sum(axis=-1) - p_mean**2, 0.0)
    zone_mean = 1.4 * (1 - p_mean) - 0.2
    zone_var = 1.96 * (p_var + 0.05**2) + 0.02**2 + 0.005**2
    mean = zone_mean.mean(axis=-1)
    var = zone_var.mean(axis=-1) + ((zone_mean - mean[..., None]) ** 2).mean(axis=-1)
    return mean, var


def expected_risk_target(s: np.ndarray) -> np.ndarray:
    """The noise-free risk target at side coordinate s [n], with the default weights
    (a, b, c) = (1, 0.2, 0.05): a·(1 − p) + b·(−1 + 1.5·(1 − p)) + c·2·(1 − p)."""
    return 1.4 * (1 - expected_soft_bind(s)) - 0.2


def outcome(s: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The episode's reliability metrics at side coordinate s [n]: high soft_bind, small cone
    and little lambda_bind on the reliable side (s > 0)."""
    with np.errstate(over="ignore"):  # far on the unreliable side exp overflows: soft_bind → 0
        soft = np.clip(1 / (1 + np.exp(-3 * s)) + 0.05 * rng.normal(size=s.size), 0.0, 1.0)
    cone = np.exp(-1.0 + 1.5 * (1 - soft) + 0.1 * rng.normal(size=s.size))
    lam = np.clip(2.0 * (1 - soft) + 0.1 * rng.normal(size=s.size), 0.0, None)
    return {"soft_bind": soft, "cone_vol": cone, "lambda_bind": lam}


@dataclass(frozen=True)
class Job:
    """One worker's share of one run: `steps` steps of BATCH episodes at strength `w_mem`."""

    client: Any  # a ZMemClient, pickled as its constructor arguments
    queries_url: str  # where the worker posts its queries' kernel numbers
    token: str | None
    w_mem: float
    seed: int
    worker: int
    steps: int


def train(job: Job) -> dict[str, np.ndarray]:
    """Run one worker; returns per-episode arrays (progress in [0, 1), zone, side s, the
    policy's mean side coordinate for the episode's zone and for every zone [n, ZONES] and
    its spread at that step, the recorded soft_bind, cone_vol
    and lambda_bind, the worker's index) and per-step gradient norms of the task loss and of
    the risk (before w_mem)."""
    import httpx
    import torch

    from zmem_client import kernel_risk

    torch.set_num_threads(1)
    mem = job.client
    rng = np.random.default_rng([job.seed, job.worker, 7])
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    c = torch.tensor(centres(), dtype=torch.float32)
    u = torch.tensor(side_axes(), dtype=torch.float32)
    # Every worker starts from the same undecided policy of its seed: at each zone's centre.
    start = np.random.default_rng([job.seed, 99]).normal(scale=0.2, size=(ZONES, Z_DIM))
    mu = torch.nn.Parameter(c + torch.tensor(start, dtype=torch.float32))
    opt = torch.optim.SGD([mu], lr=LEARNING_RATE)
    headers = {"authorization": f"Bearer {job.token}"} if job.token else {}
    names = ["progress", "zone", "side", "policy_side", "policy_sides", "policy_std"]
    names += ["soft_bind", "cone_vol", "lambda_bind"]
    names += ["worker", "g_task", "g_risk"]
    out: dict[str, list[Any]] = {k: [] for k in names}
    with httpx.Client(headers=headers, timeout=30) as http:
        for step in range(job.steps):
            zone = torch.randint(ZONES, (BATCH,), generator=gen)
            std = POLICY_STD[0] + (POLICY_STD[1] - POLICY_STD[0]) * step / max(job.steps - 1, 1)
            sides = ((mu - c) * u).sum(dim=1).detach().numpy()  # every zone's mean side [ZONES]
            mean_side = sides[zone.numpy()]
            z = mu[zone] + std * torch.randn(BATCH, Z_DIM, generator=gen)
            z_leaf = z.detach().requires_grad_(True)
            side = ((z_leaf - c[zone]) * u[zone]).sum(dim=1)
            task = (0.5 * ((z_leaf - c[zone]) ** 2).sum(dim=1) + PREFERENCE * side).sum()
            nb = mem.neighbors(z_leaf.detach())
            risk = kernel_risk(
                z_leaf,
                torch.from_numpy(nb["z"]).float(),
                torch.from_numpy(nb["risk_target"]).float(),
                nb["sigma"],
            )
            g_task = torch.autograd.grad(task, z_leaf, retain_graph=True)[0]
            g_risk = torch.autograd.grad(risk.sum(), z_leaf, allow_unused=True)[0]
            if g_risk is None:
                g_risk = torch.zeros_like(z_leaf)
            # The policy's gradient: through z = μ + std·ε, dz/dμ is the identity.
            opt.zero_grad()
            z.backward(g_task + job.w_mem * g_risk)
            opt.step()
            if nb["k"]:
                _post_queries(http, job.queries_url, nb, risk.detach().numpy())
            s = side.detach().numpy()
            metrics = outcome(s, rng)
            for i in range(BATCH):
                mem.record(
                    z_leaf[i].detach(),
                    soft_bind=float(metrics["soft_bind"][i]),
                    cone_vol=float(metrics["cone_vol"][i]),
                    lambda_bind=float(metrics["lambda_bind"][i]),
                    worker=f"worker-{job.worker}",
                )
            out["progress"].extend([step / job.steps] * BATCH)
            out["zone"].extend(zone.tolist())
            out["side"].extend(s.tolist())
            out["policy_side"].extend(mean_side.tolist())
            out["policy_sides"].extend([sides.tolist()] * BATCH)
            out["policy_std"].extend([std] * BATCH)
            out["soft_bind"].extend(metrics["soft_bind"].tolist())
            out["cone_vol"].extend(metrics["cone_vol"].tolist())
            out["lambda_bind"].extend(metrics["lambda_bind"].tolist())
            out["worker"].extend([job.worker] * BATCH)
            out["g_task"].extend(g_task.norm(dim=1).tolist())
            out["g_risk"].extend(g_risk.norm(dim=1).tolist())
    mem.flush()
    mem.close()
    return {k: np.asarray(v) for k, v in out.items()}


def _post_queries(http: Any, url: str, nb: dict[str, Any], risk: np.ndarray) -> None:
    """The kernel numbers of a query the worker computed itself: risk, Σw, 1/Σw_norm²."""
    w = np.exp(-nb["d2"].astype(np.float64) / (2 * float(nb["sigma"]) ** 2))
    wsum = w.sum(axis=1)
    share = w / np.where(wsum > 0, wsum, 1.0)[:, None]
    n_eff = np.where(wsum > 0, 1 / np.maximum((share**2).sum(axis=1), 1e-300), 0.0)
    body = {"risk": risk.astype(np.float64).tolist(), "wsum": wsum.tolist(), "n_eff": n_eff.tolist()}
    http.post(url, json=body).raise_for_status()


def kernel_check(
    client: Any, queries_url: str, token: str | None, d: int, n: int, seed: int, sigma: float
) -> None:
    """Fill a d-dimensional memory with unit-variance z's and query fresh ones at `sigma`,
    posting the kernel numbers (what the kernel criterion then judges)."""
    import httpx
    import torch

    rng = np.random.default_rng([seed, d])
    z = rng.normal(size=(n, d)).astype(np.float32)
    metrics = outcome(rng.normal(size=n), rng)
    for i in range(n):
        client.record(
            z[i],
            soft_bind=float(metrics["soft_bind"][i]),
            cone_vol=float(metrics["cone_vol"][i]),
            lambda_bind=float(metrics["lambda_bind"][i]),
        )
    client.flush()
    from zmem_client import kernel_risk

    queries = torch.tensor(rng.normal(size=(200, d)), dtype=torch.float32)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(headers=headers, timeout=30) as http:
        for rows in queries.split(50):
            nb = client.neighbors(rows, sigma=sigma)
            risk = kernel_risk(
                rows, torch.from_numpy(nb["z"]), torch.from_numpy(nb["risk_target"]), nb["sigma"]
            )
            _post_queries(http, queries_url, nb, risk.numpy())
