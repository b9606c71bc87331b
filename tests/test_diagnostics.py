"""Diagnostics (SPEC §6) on synthetic buffers whose answers are known."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmem_service.diagnostics import (
    READING_1_WITHOUT_2,
    READING_2_WITHOUT_1,
    Thresholds,
    evaluate,
    spearman,
    spike_threshold,
)

D = 16


def islands(n: int, rng: np.random.Generator, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """n points in 8 Gaussian islands in d=16 → (z [n, 16], island label [n]).

    Island i has radius ``spread * (1 + i)``, so low labels are the dense islands.
    """
    centres = np.random.default_rng(123).normal(size=(8, D)) * 6
    label = rng.integers(0, 8, n)
    z = centres[label] + spread * (1 + label)[:, None] * rng.normal(size=(n, D))
    return z, label


def criteria(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result["criteria"]}


def assert_plain_json(x: Any) -> None:
    """Only Python builtins, no NaN: what json.dumps(allow_nan=False) accepts as is."""
    json.dumps(x, allow_nan=False)
    if isinstance(x, dict):
        for v in x.values():
            assert_plain_json(v)
    elif isinstance(x, list):
        for v in x:
            assert_plain_json(v)
    else:
        assert type(x) in (int, float, bool, str, type(None)), (type(x), x)


def no_queries() -> np.ndarray:
    return np.zeros(0)


def test_islands_pass_density_and_a_blob_fails_at_ratio_one() -> None:
    rng = np.random.default_rng(0)
    z, _ = islands(2000, rng)
    soft = rng.uniform(size=2000)
    lam = rng.uniform(size=2000)
    clustered = criteria(evaluate(z, soft, lam, no_queries(), min_size=500))["density"]
    assert clustered["passed"] is True
    assert clustered["values"]["ratio"] < 0.5

    blob = rng.normal(size=(2000, D)) @ rng.normal(size=(D, D))  # correlated, still a blob
    res = evaluate(blob, soft, lam, no_queries(), min_size=500)
    density = criteria(res)["density"]
    assert density["passed"] is False
    assert density["values"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert 0 < density["values"]["pc2_variance_fraction"] < 1
    assert_plain_json(res)


def test_reliability_tied_to_dense_islands_passes_and_random_fails() -> None:
    rng = np.random.default_rng(1)
    z, label = islands(2000, rng)
    # the dense (low-label) islands bind reliably and need little lambda
    soft = np.clip(0.95 - 0.1 * label + 0.05 * rng.normal(size=2000), 0, 1)
    lam = 0.2 * label + 0.1 * rng.random(2000)
    tied = criteria(evaluate(z, soft, lam, no_queries(), min_size=500))["reliability"]
    assert tied["passed"] is True
    assert tied["values"]["rho_soft_bind"] > 0.5
    assert tied["values"]["rho_lambda_bind"] < -0.5

    res = criteria(
        evaluate(z, rng.uniform(size=2000), rng.uniform(size=2000), no_queries(), min_size=500)
    )
    assert res["reliability"]["passed"] is False
    assert abs(res["reliability"]["values"]["rho_soft_bind"]) < 0.1
    # (1) without (2): the seed's reading goes on the failed criterion
    assert res["density"]["passed"] is True
    assert READING_1_WITHOUT_2 in res["reliability"]["reading"]


def test_either_rank_correlation_alone_passes_reliability() -> None:
    rng = np.random.default_rng(2)
    z, label = islands(1000, rng)
    lam = 0.2 * label + 0.1 * rng.random(1000)
    constant_soft = np.full(1000, 0.5)
    rel = criteria(evaluate(z, constant_soft, lam, no_queries(), min_size=100))["reliability"]
    assert rel["values"]["rho_soft_bind"] is None
    assert rel["passed"] is True


def test_reliable_blob_reads_z_isnt_being_reused() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2000, D))
    soft = np.exp(-0.05 * (z**2).sum(axis=1))  # the blob's dense core binds best
    res = criteria(evaluate(z, soft, rng.uniform(size=2000), no_queries(), min_size=500))
    assert res["density"]["passed"] is False
    assert res["reliability"]["passed"] is True
    assert READING_2_WITHOUT_1 in res["density"]["reading"]


def test_convergence_passes_when_the_newer_half_is_tighter_and_fails_reversed() -> None:
    rng = np.random.default_rng(4)
    loose, _ = islands(1000, rng, spread=1.5)
    tight, _ = islands(1000, rng, spread=0.2)
    soft, lam = rng.uniform(size=2000), rng.uniform(size=2000)

    better = criteria(evaluate(np.vstack([loose, tight]), soft, lam, no_queries(), min_size=500))
    conv = better["convergence"]
    assert conv["passed"] is True
    assert conv["values"]["newer_ratio"] < 0.9 * conv["values"]["older_ratio"]
    assert conv["values"]["older_spike_rate"] is None  # < 100 recorded queries: ratio alone
    assert "converging" in conv["reading"]

    worse = criteria(evaluate(np.vstack([tight, loose]), soft, lam, no_queries(), min_size=500))
    assert worse["convergence"]["passed"] is False
    assert "not clustering more" in worse["convergence"]["reading"]


def test_more_risk_spikes_in_the_newer_half_fail_convergence() -> None:
    rng = np.random.default_rng(5)
    loose, _ = islands(1000, rng, spread=1.5)
    tight, _ = islands(1000, rng, spread=0.2)
    z = np.vstack([loose, tight])
    soft, lam = rng.uniform(size=2000), rng.uniform(size=2000)
    risk = 0.5 + 0.01 * rng.normal(size=400)
    fading, growing = risk.copy(), risk.copy()
    fading[[10, 50, 90, 150, 300]] = 3.0
    growing[[10, 250, 300, 350, 390]] = 3.0

    ok = criteria(evaluate(z, soft, lam, fading, min_size=500))["convergence"]
    assert ok["passed"] is True
    assert ok["values"]["older_spikes"] == 4 and ok["values"]["newer_spikes"] == 1
    assert ok["values"]["recorded_queries"] == 400

    bad = criteria(evaluate(z, soft, lam, growing, min_size=500))["convergence"]
    assert bad["passed"] is False
    assert bad["values"]["newer_spike_rate"] == pytest.approx(4 / 200)
    assert "spikes are not fading" in bad["reading"]
    assert "not clustering more" not in bad["reading"]

    few = criteria(evaluate(z, soft, lam, growing[-99:], min_size=500))["convergence"]
    assert few["passed"] is True
    assert few["values"]["spike_threshold"] is None


def test_below_twice_min_size_every_verdict_is_null_but_numbers_show() -> None:
    rng = np.random.default_rng(6)
    z, _ = islands(999, rng)
    res = evaluate(z, rng.uniform(size=999), rng.uniform(size=999), np.ones(500), min_size=500)
    assert res["size"] == 999
    for c in res["criteria"]:
        assert c["passed"] is None
        assert c["reading"].startswith("too little data")
        assert c["values"]["required_size"] == 1000
    assert criteria(res)["density"]["values"]["ratio"] < 0.8
    assert_plain_json(res)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_and_empty_buffers(n: int) -> None:
    z = np.arange(n * 3, dtype=np.float32).reshape(n, 3) ** 2
    res = evaluate(z, np.full(n, 0.5), np.zeros(n), np.zeros(0), min_size=1)
    assert res["size"] == n
    assert [c["name"] for c in res["criteria"]] == ["density", "reliability", "convergence"]
    assert_plain_json(res)
    if n == 0:
        assert all(c["passed"] is None for c in res["criteria"])
    assert_plain_json(evaluate(np.zeros(0), np.zeros(0), np.zeros(0), no_queries(), min_size=500))


def test_degenerate_buffers_give_nulls_not_nan() -> None:
    same = np.ones((300, 4))
    res = criteria(evaluate(same, np.full(300, 0.5), np.zeros(300), np.zeros(0), min_size=10))
    assert res["density"]["values"]["ratio"] is None
    assert res["density"]["passed"] is None
    assert res["reliability"]["passed"] is None
    assert_plain_json(res)

    rng = np.random.default_rng(7)
    z = np.repeat(rng.normal(size=(50, 4)), 6, axis=0)  # exact duplicates
    res2 = evaluate(z, rng.uniform(size=300), rng.uniform(size=300), np.zeros(0), min_size=10)
    assert_plain_json(res2)


def test_results_are_deterministic_and_seeded() -> None:
    rng = np.random.default_rng(8)
    z, _ = islands(3000, rng)
    args = (z, rng.uniform(size=3000), rng.uniform(size=3000), rng.normal(size=300))
    a = evaluate(*args, min_size=500, sample=1000)
    assert evaluate(*args, min_size=500, sample=1000) == a
    assert evaluate(*args, min_size=500, sample=1000, seed=1) != a
    assert criteria(a)["density"]["values"]["sample"] == 1000


def test_thresholds_are_configurable() -> None:
    rng = np.random.default_rng(9)
    z, _ = islands(1000, rng)
    soft, lam = rng.uniform(size=1000), rng.uniform(size=1000)
    strict = Thresholds(density_ratio=0.01)
    assert (
        criteria(evaluate(z, soft, lam, no_queries(), min_size=100, thresholds=strict))["density"][
            "passed"
        ]
        is False
    )


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        evaluate(np.zeros((5, 2)), np.zeros(4), np.zeros(5), no_queries(), min_size=1)
    with pytest.raises(ValueError):
        evaluate(np.zeros(5), np.zeros(5), np.zeros(5), no_queries(), min_size=1)


def test_spearman_and_spike_threshold() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, np.inf])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(5)) is None
    assert spearman(np.ones(1), np.ones(1)) is None
    # ties take their average rank: ranks [1.5, 1.5, 3] vs [1, 2, 3]
    assert spearman(np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(
        np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]
    )
    assert spike_threshold(np.zeros(0)) is None
    assert spike_threshold(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), 5.0) == pytest.approx(3 + 5 * 1)


@settings(deadline=None, max_examples=30)
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 4),
    q=st.integers(0, 150),
    min_size=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_any_buffer_gives_plain_json(n: int, d: int, q: int, min_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d)).round(1)  # rounding makes ties and duplicates likely
    res = evaluate(
        z, rng.uniform(size=n).round(1), rng.uniform(size=n), rng.normal(size=q), min_size=min_size
    )
    assert_plain_json(res)
    assert res["size"] == n
    if n < 2 * min_size:
        assert all(c["passed"] is None for c in res["criteria"])


def test_knn_distances_match_brute_force() -> None:
    rng = np.random.default_rng(10)
    z = rng.normal(size=(300, 5))
    z[1] = z[0]  # a twin: its neighbour at distance 0 still counts, itself does not
    d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, :10].mean()
    density = criteria(evaluate(z, np.zeros(300), np.zeros(300), no_queries(), min_size=1))[
        "density"
    ]
    assert density["values"]["mean_knn_distance"] == pytest.approx(expected, rel=1e-4)
