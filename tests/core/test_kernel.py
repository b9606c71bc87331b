"""Kernel statistics (`zmem_core.kernel`): the numpy numbers the service answers and records,
the same numbers in the replica's query records, and the same risk as the client's
differentiable torch `kernel_risk`, on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zmem_client import kernel_risk
from zmem_client._replica import query_stats
from zmem_core.kernel import GUARD, kernel_stats


def neighbourhood(rng: np.random.Generator, b: int, k: int, d: int, scale: float = 1.0):
    """Query rows z [b, d], their neighbours [b, k, d], risk targets [b, k] and d2 [b, k] (float64)."""
    z = rng.standard_normal((b, d)) * scale
    nz = z[:, None, :] + rng.standard_normal((b, k, d)) * scale
    rt = rng.uniform(-1.0, 2.0, (b, k))
    d2 = ((nz - z[:, None, :]) ** 2).sum(axis=-1)
    return z, nz, rt, d2


@pytest.mark.parametrize(("k", "d", "sigma"), [(1, 1, 1.0), (8, 3, 0.5), (64, 16, 2.0), (64, 16, 0.05)])
def test_the_numpy_risk_is_the_torch_risk(k: int, d: int, sigma: float) -> None:
    rng = np.random.default_rng(k * 100 + d)
    z, nz, rt, d2 = neighbourhood(rng, 5, k, d)
    risk, wsum, n_eff = kernel_stats(d2, rt, sigma)
    torch_risk = kernel_risk(torch.from_numpy(z), torch.from_numpy(nz), torch.from_numpy(rt), sigma)
    np.testing.assert_allclose(risk, torch_risk.numpy(), rtol=1e-10, atol=1e-300)
    assert risk.dtype == wsum.dtype == n_eff.dtype == np.float64 and risk.shape == (5,)


def test_the_formula() -> None:
    """w = exp(−d2 / 2σ²); risk = Σ w r / (Σw + GUARD); n_eff = (Σw)² / Σw²."""
    d2 = np.array([[0.0, 2.0, 8.0]])
    rt = np.array([[1.0, 2.0, 3.0]])
    w = np.exp(-d2[0] / 2.0)
    risk, wsum, n_eff = kernel_stats(d2, rt, 1.0)
    assert wsum[0] == pytest.approx(w.sum(), rel=1e-15)
    assert risk[0] == pytest.approx((w * rt[0]).sum() / (w.sum() + GUARD), rel=1e-15)
    assert n_eff[0] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-15)


def test_n_eff_counts_the_neighbours_carrying_the_weight() -> None:
    rt = np.ones((3, 4))
    d2 = np.array([[1.0] * 4, [0.0, 1e3, 1e3, 1e3], [0.0, 0.0, 1e3, 1e3]])
    _, _, n_eff = kernel_stats(d2, rt, 1.0)
    np.testing.assert_allclose(n_eff, [4.0, 1.0, 2.0], rtol=1e-12)


def test_underflow_and_empty_rows_are_zero_not_nan() -> None:
    """Every weight underflowed: risk, Σw and n_eff are 0 (the guard keeps n_eff out of 1e140),
    on both paths; k = 0 (an inactive memory) gives zeros too."""
    d2 = np.full((1, 4), 1e6)
    for stats in (
        kernel_stats(d2, np.ones((1, 4)), 1.0),
        kernel_stats(np.zeros((2, 0)), np.zeros((2, 0)), 1.0),
    ):
        for part in stats:
            assert np.isfinite(part).all() and (part == 0).all()
    t = kernel_risk(torch.zeros(1, 2), torch.full((1, 4, 2), 1e3), torch.ones(1, 4), 1.0)
    assert t.item() == 0.0


def test_near_the_guard_both_paths_divide_by_the_same_guard() -> None:
    """Σw of the order of the guard: the risk is visibly below the targets' mean, equally so on both paths."""
    rng = np.random.default_rng(3)
    z, nz, rt, d2 = neighbourhood(rng, 4, 16, 8, scale=2.0)
    sigma = float(np.sqrt(d2.min() / (2 * np.log(1e8))))  # the nearest weight ≈ 1e-8
    risk, wsum, _ = kernel_stats(d2, rt, sigma)
    assert (wsum < 10 * GUARD).any()
    torch_risk = kernel_risk(torch.from_numpy(z), torch.from_numpy(nz), torch.from_numpy(rt), sigma)
    np.testing.assert_allclose(risk, torch_risk.numpy(), rtol=1e-9)


def test_the_replicas_records_are_the_services_numbers() -> None:
    """`query_stats` (the replica's records, posted to …/queries) over queries of different k and
    σ, float32 on the way in as the replica holds them, equals `kernel_stats` row by row."""
    rng = np.random.default_rng(7)
    batch, expected = [], []
    for k, sigma, b in [(4, 1.0, 3), (4, 1.0, 2), (8, 0.3, 1), (4, 2.0, 5)]:
        _, _, rt, d2 = neighbourhood(rng, b, k, 6)
        d2_32, rt_32 = torch.from_numpy(d2).float(), torch.from_numpy(rt).float()
        batch.append((d2_32, rt_32, sigma, None))
        expected.append(kernel_stats(d2_32.numpy(), rt_32.numpy(), sigma))
    got = query_stats(batch)
    for i, key in enumerate(("risk", "wsum", "n_eff")):
        np.testing.assert_array_equal(got[key], np.concatenate([e[i] for e in expected]))
