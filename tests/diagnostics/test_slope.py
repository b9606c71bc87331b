"""How much of the risk targets' local slope reaches the kernel's gradient, and the σ suggested."""

from __future__ import annotations

import numpy as np
import pytest

from zmem_service.diagnostics import slope
from zmem_service.diagnostics.criteria import evaluate


def sloped(n: int = 3000, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The demo's shape: z's 0.35 apart per coordinate, the risk target a sigmoid along one axis."""
    rng = np.random.default_rng(seed)
    z = 0.35 * rng.normal(size=(n, d))
    rt = 1.4 * (1 - 1 / (1 + np.exp(-3 * z[:, 2]))) - 0.2 + 0.05 * rng.normal(size=n)
    return z, rt


def test_local_slopes_recover_a_linear_target_and_know_noise_from_a_slope() -> None:
    rng = np.random.default_rng(1)
    offsets = rng.normal(size=(20, 64, 8))
    g_true = np.zeros(8)
    g_true[3] = 2.0
    g, r2 = slope.local_slopes(offsets, offsets @ g_true)
    assert np.allclose(g[:, 3], 2.0, rtol=0.1) and np.abs(g[:, [0, 1, 2, 4]]).max() < 0.2
    assert (r2 > 0.9).all()
    _, r2_noise = slope.local_slopes(offsets, rng.normal(size=(20, 64)))
    assert np.median(r2_noise) < 0.05


def test_the_kernel_passes_more_of_the_slope_as_sigma_shrinks_to_the_neighbourhood() -> None:
    z, rt = sloped()
    hood = slope.neighbourhoods(z, rt, 64, seed=0)
    assert hood is not None
    offsets, targets, d2 = hood
    g, _ = slope.local_slopes(offsets, targets)
    wide = np.nanmedian(slope.shares(offsets, targets, d2, g, 1.0)[0])
    narrow = np.nanmedian(slope.shares(offsets, targets, d2, g, 0.3)[0])
    assert wide < 0.1 < 0.3 < narrow  # σ = 1 is a plain k-NN average: little of the slope passes
    _, dead = slope.shares(offsets, targets, d2, g, 1e-3)
    assert dead.all()


def test_the_kernel_verdict_suggests_a_sigma_that_passes_the_slope_without_underflow() -> None:
    z, rt = sloped()
    soft = 1 - (rt + 0.2) / 1.4
    queries = {"risk": np.zeros(200), "wsum": np.ones(200), "n_eff": np.full(200, 60.0)}
    res = evaluate(z, soft, np.zeros(3000), queries, min_size=500, sigma=1.0, k=64, risk_target=rt)
    kernel = {c["name"]: c for c in res["criteria"]}["kernel"]
    v = kernel["values"]
    assert v["slope_exists"] is True and v["slope_r2"] > 0.5
    assert v["slope_share"] < 0.1
    assert v["suggested_sigma"] == v["slope_sigma"] < v["reach_sigma"]
    assert v["slope_share_at_suggested"] >= slope.WANTED_SHARE
    hood = slope.neighbourhoods(z, rt, 64, seed=0)
    assert hood is not None
    offsets, targets, d2 = hood
    g, _ = slope.local_slopes(offsets, targets)
    assert not slope.shares(offsets, targets, d2, g, v["suggested_sigma"])[1].any()
    assert f"{v['slope_share']:.0%} of the risk targets' local slope" in kernel["reading"]
    assert f"set sigma ≈ {v['suggested_sigma']:.3g}" in kernel["reading"]
    # sigma "auto" is judged at the service's own rule's value
    auto = evaluate(z, soft, np.zeros(3000), queries, min_size=500, sigma="auto", k=64, risk_target=rt)
    assert {c["name"]: c for c in auto["criteria"]}["kernel"]["values"]["slope_share"] is not None


def test_without_a_slope_the_suggestion_is_the_reach() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2000, 8))
    rt = rng.uniform(size=2000)  # no structure: the fits predict nothing
    queries = {"risk": np.zeros(200), "wsum": np.ones(200), "n_eff": np.full(200, 60.0)}
    res = evaluate(z, 1 - rt, np.zeros(2000), queries, min_size=500, sigma=1.0, k=64, risk_target=rt)
    v = {c["name"]: c for c in res["criteria"]}["kernel"]["values"]
    assert v["slope_exists"] is False and v["suggested_sigma"] == v["reach_sigma"]
    no_targets = evaluate(z, 1 - rt, np.zeros(2000), queries, min_size=500, sigma=1.0, k=64)
    v = {c["name"]: c for c in no_targets["criteria"]}["kernel"]["values"]
    assert v["slope_share"] is None and v["suggested_sigma"] == pytest.approx(v["reach_sigma"])
    assert slope.neighbourhoods(z[:2], rt[:2], 64, seed=0) is None
