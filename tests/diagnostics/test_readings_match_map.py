"""Readings quote what the pictures show: island coordinates on map.png's axes, and the σ
the kernel verdict suggests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from zmem_service.diagnostics import kernel
from zmem_service.diagnostics.criteria import evaluate
from zmem_service.diagnostics.islands import find_islands
from zmem_service.pictures import plots

D = 8
CENTRES = np.zeros((3, D))
CENTRES[0, 0], CENTRES[1, 1], CENTRES[2, :2] = 8.0, 8.0, -6.0


def buffer(n: int, sign: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    z = sign * (CENTRES[label] + 0.7 * rng.normal(size=(n, D)))
    soft = np.clip(np.where(label == 0, 0.9, 0.3) + 0.05 * rng.normal(size=n), 0, 1)
    return z.astype(np.float32), soft, (1.0 - soft) + 0.05 * (label == 2)


def by_name(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in res["criteria"]}


@pytest.mark.parametrize("projection", ["pca", "risk"])
@pytest.mark.parametrize("n", [3000, 6500])  # all points drawn; a seeded subsample of 5,000
@pytest.mark.parametrize("sign", [1.0, -1.0])  # an SVD may return either sign: the map pins it
def test_island_coordinates_in_the_readings_are_the_maps(projection: str, n: int, sign: float) -> None:
    z, soft, lam = buffer(n, sign)
    risk_target = 1.0 - soft + 0.05 * lam
    res = evaluate(z, soft, lam, np.zeros(0), min_size=500, risk_target=risk_target, projection=projection)
    rel = by_name(res)["reliability"]
    # The points map.png draws (max_points 5000, seed 0) where it draws them.
    mean, axes, _ = plots._projection(z, None, projection, risk_target)
    drawn = plots._sample(n, 5000, 0)
    xy = (z[drawn] - mean) @ axes.T
    labels = find_islands(xy)
    islands = rel["values"]["islands"]
    assert len(islands) == 3 == labels.max() + 1
    for i in islands:
        centre = xy[labels == i["island"] - 1].mean(axis=0)
        np.testing.assert_allclose([i["pc1"], i["pc2"]], centre, rtol=1e-9, atol=1e-9)
    good = [i for i in islands if i["reliable"]]
    assert good and all(f"({i['pc1']:.2g}, {i['pc2']:.2g})" in rel["reading"] for i in good)


def test_the_map_and_the_diagnostics_share_one_sign_convention() -> None:
    z, _, _ = buffer(3000, -1.0)
    _, comps = plots.pca_basis(z)
    for axis in comps:
        assert axis[np.argmax(np.abs(axis))] > 0
    np.testing.assert_allclose(plots.pca_basis(-z)[1], comps, atol=1e-9)


def kernel_of(z: np.ndarray, sigma: float, k: int = 64) -> dict[str, Any]:
    """The kernel verdict of z with 600 recorded queries (the newest z's) at `sigma`."""
    import faiss

    q = 600
    d2, _ = faiss.knn(z[-q:].astype(np.float32), z[:-q].astype(np.float32), k)
    w = np.exp(-d2.astype(np.float64) / (2 * sigma**2))
    wsum = w.sum(axis=1)
    n_eff = 1.0 / ((w / wsum[:, None]) ** 2).sum(axis=1)
    rng = np.random.default_rng(1)
    soft, lam = rng.uniform(size=len(z)), rng.uniform(size=len(z))
    records = {"risk": np.full(q, 0.5), "wsum": wsum, "n_eff": n_eff}
    res = evaluate(z, soft, lam, records, min_size=500, sigma=sigma, k=k, risk_target=1 - soft)
    return by_name(res)["kernel"]


def test_a_flat_kernel_reading_names_the_sigma_to_try() -> None:
    """σ ≫ the spacing: every neighbour weighs alike; the reading names the σ, not only the JSON."""
    z = 0.1 * np.random.default_rng(0).normal(size=(3000, 8))
    flat = kernel_of(z, sigma=1.0)
    assert flat["passed"] is True and flat["values"]["median_n_eff"] > 60
    suggested = flat["values"]["suggested_sigma"]
    assert 0 < suggested < 1.0
    assert f"a smaller sigma sharpens it, e.g. sigma ≈ {suggested:.3g}" in flat["reading"]
    assert "measure the two forces on z again" in flat["reading"]


def test_the_sigma_named_is_smaller_than_the_one_in_use() -> None:
    why = "why"
    assert "e.g. sigma ≈ 0.2 (why)" in kernel._sharper(0.2, 1.0, why)
    # a suggestion no smaller than the σ in use would not sharpen anything: half of it instead
    assert "e.g. sigma ≈ 0.5 (half the 1 in use)" in kernel._sharper(2.0, 1.0, why)
    assert "e.g. sigma ≈ 0.3 (why)" in kernel._sharper(0.3, None, why)
    assert kernel._sharper(None, None, why) == "then measure the two forces on z again"
