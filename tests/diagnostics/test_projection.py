"""The risk projection: a first axis that best predicts the risk target, the leading principal
component orthogonal to it; the diagnostics judged and quoted on it."""

from __future__ import annotations

import numpy as np
import pytest

from zmem_service.diagnostics.criteria import evaluate
from zmem_service.diagnostics.projection import risk_basis, risk_fit


def sides_off_the_map(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The demo's shape: a wide spread in dims 0–1 (what PCA sees), and two tight sides along
    dim 5 that decide reliability (what PCA drops) → (z [n, 8], soft_bind, risk target)."""
    z = rng.normal(size=(n, 8)) * np.r_[5.0, 4.0, [0.1] * 6]
    side = rng.integers(0, 2, n)
    z[:, 5] = np.where(side == 1, 1.0, -1.0) + 0.1 * rng.normal(size=n)
    soft = np.clip(np.where(side == 1, 0.9, 0.1) + 0.05 * rng.normal(size=n), 0, 1)
    return z, soft, 1.0 - soft


def test_the_first_axis_predicts_the_risk_and_the_second_is_the_leading_pc_orthogonal_to_it() -> None:
    rng = np.random.default_rng(0)
    z, _, rt = sides_off_the_map(3000, rng)
    mean, axes, frac = risk_basis(z, rt)
    assert mean == pytest.approx(z.mean(axis=0))
    assert axes @ axes.T == pytest.approx(np.eye(2), abs=1e-9)
    assert abs(axes[0, 5]) > 0.99  # the risk lives along dim 5
    assert ((z - mean) @ axes[0] @ (rt - rt.mean())) > 0  # pointing toward higher risk
    assert abs(axes[1, 0]) > 0.99  # then the widest direction left: dim 0
    assert frac[1] > frac[0] > 0
    assert risk_fit(z, rt, axes[0], mean) > 0.9
    # PCA would put dims 0 and 1 on the map and leave the sides out
    _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
    assert abs(vt[0, 5]) < 0.05 and abs(vt[1, 5]) < 0.05


def test_degenerate_inputs() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 4)) * np.r_[3.0, 1.0, 1.0, 1.0]
    _, axes, _ = risk_basis(z, np.full(50, 0.3))  # constant risk: the leading PC first
    assert abs(axes[0, 0]) > 0.9
    _, axes, frac = risk_basis(np.ones((5, 3)), np.arange(5.0))
    assert not axes.any() and not frac.any()
    _, axes, _ = risk_basis(z[:1], np.ones(1))
    assert not axes.any()
    _, axes, _ = risk_basis(rng.normal(size=(3, 20)), np.arange(3.0))  # fewer rows than dims
    assert np.isfinite(axes).all() and np.linalg.norm(axes[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="risk_target"):
        risk_basis(z, np.ones(3))
    with pytest.raises(ValueError, match="z must be"):
        risk_basis(np.ones(4), np.ones(4))


def test_the_diagnostics_on_the_risk_map_see_the_sides_the_pca_map_merges() -> None:
    rng = np.random.default_rng(2)
    z, soft, rt = sides_off_the_map(3000, rng)
    lam = 2 * (1 - soft)

    def reliability(**kw: object) -> dict[str, object]:
        res = evaluate(z, soft, lam, np.zeros(0), min_size=500, risk_target=rt, **kw)  # type: ignore[arg-type]
        return {c["name"]: c for c in res["criteria"]}["reliability"]

    pca = reliability()
    assert len(pca["values"]["islands"]) < 2  # one wide blob on the PCA map
    risk = reliability(projection="risk")
    table = risk["values"]["islands"]
    assert len(table) == 2
    (good,) = [i for i in table if i["reliable"]]
    assert good["soft_bind"] > 0.8 and good["pc1"] < 0  # the reliable side: lower predicted risk
    assert "at risk map (risk axis, PC ⊥) (" in risk["reading"]


def test_readings_quote_coordinates_in_the_basis_they_are_given() -> None:
    rng = np.random.default_rng(3)
    z, soft, rt = sides_off_the_map(3000, rng)
    other = -z  # the same cloud, every axis flipped: its PCA signs are pinned the same way
    res = evaluate(
        z,
        soft,
        2 * (1 - soft),
        np.zeros(0),
        min_size=500,
        risk_target=rt,
        projection="risk",
        basis_z=other,
        basis_risk_target=rt,
        basis_name="best",
    )
    rel = {c["name"]: c for c in res["criteria"]}["reliability"]
    assert "risk map of 'best'" in rel["reading"]
    good = next(i for i in rel["values"]["islands"] if i["reliable"])
    assert good["pc1"] > 0  # in the flipped basis the reliable side is on the other end
    density = {c["name"]: c for c in res["criteria"]}["density"]
    assert "risk map of 'best'" in density["reading"]
    with pytest.raises(ValueError, match="projection"):
        evaluate(z, soft, soft, np.zeros(0), min_size=500, projection="tsne")
    with pytest.raises(ValueError, match="risk targets"):
        evaluate(z, soft, soft, np.zeros(0), min_size=500, projection="risk")
    with pytest.raises(ValueError, match="basis_z"):
        evaluate(z, soft, soft, np.zeros(0), min_size=500, basis_z=z[:, :3])
