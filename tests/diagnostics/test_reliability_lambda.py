"""Reliability by low lambda_bind alone: not for the island that binds worst of all."""

from __future__ import annotations

from typing import Any

import numpy as np

from zmem_service.diagnostics.criteria import Thresholds, evaluate

D, N = 8, 3000
CENTRES = np.zeros((3, D))
CENTRES[0, 0], CENTRES[1, 1], CENTRES[2, :2] = 8.0, 8.0, -6.0


def reliability(soft_means: tuple[float, float, float], seed: int = 0, **t: Any) -> dict[str, Any]:
    """Three islands with mean soft_bind `soft_means`; island 1 (the second) has low
    lambda_bind (a deterministic policy's entropy), the others high."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, N)
    z = CENTRES[label] + 0.7 * rng.normal(size=(N, D))
    soft = np.clip(np.asarray(soft_means)[label] + 0.03 * rng.normal(size=N), 0, 1)
    lam = np.where(label == 1, 0.1, 3.0) + 0.05 * rng.random(N)
    res = evaluate(z, soft, lam, np.zeros(0), min_size=500, thresholds=Thresholds(**t))
    (rel,) = [c for c in res["criteria"] if c["name"] == "reliability"]
    return rel


def island(rel: dict[str, Any], lam_below: float = 0.5) -> dict[str, Any]:
    (low,) = [i for i in rel["values"]["islands"] if i["lambda_bind"] < lam_below]
    return low


def test_a_low_soft_bind_island_is_not_reliable_by_lambda_alone() -> None:
    """The stuck run of issue 23: its one low-entropy island bound with soft_bind 0.02."""
    rel = reliability((0.3, 0.02, 0.35))
    stuck = island(rel)
    assert stuck["soft_bind"] < 0.05
    assert stuck["reliable"] is False and stuck["lambda_overruled"] is True
    assert rel["passed"] is False
    assert rel["reading"].startswith("none of the 3 islands is reliable")
    assert f"#{stuck['island']} has low lambda_bind" in rel["reading"]
    assert "stuck, deterministic policy" in rel["reading"]


def test_low_lambda_still_counts_when_the_island_does_not_bind_worst() -> None:
    # soft_bind alike everywhere: the low-lambda island is reliable, whatever the noise says
    alike = reliability((0.4, 0.4, 0.4))
    assert island(alike)["reliable"] is True and alike["passed"] is True
    # bound worse than one island but better than another: not the least reliable
    middle = reliability((0.3, 0.2, 0.1))
    assert island(middle)["reliable"] is True and island(middle)["lambda_overruled"] is False
    # a gap smaller than the configured one is not "binding worst of all"
    small = reliability((0.3, 0.26, 0.3))
    assert island(small)["reliable"] is True
    assert island(reliability((0.3, 0.26, 0.3), lambda_least_gap=0.02))["reliable"] is False


def test_an_island_reliable_by_soft_bind_is_never_overruled() -> None:
    rel = reliability((0.2, 0.9, 0.3))
    good = island(rel)
    assert good["reliable"] is True and good["lambda_overruled"] is False
