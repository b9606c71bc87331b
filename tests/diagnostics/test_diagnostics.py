"""Diagnostics (SPEC §6) on synthetic buffers whose answers are known."""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmem_service.diagnostics import trends
from zmem_service.diagnostics.criteria import (
    READING_1_WITHOUT_2,
    READING_2_WITHOUT_1,
    Thresholds,
    evaluate,
    spearman,
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

    res = criteria(evaluate(z, rng.uniform(size=2000), rng.uniform(size=2000), no_queries(), min_size=500))
    assert res["reliability"]["passed"] is False
    assert abs(res["reliability"]["values"]["rho_soft_bind"]) < 0.1
    # (1) without (2): the seed's reading goes on the failed criterion
    assert res["density"]["passed"] is True
    assert READING_1_WITHOUT_2 in res["reliability"]["reading"]


def test_without_islands_either_rank_correlation_alone_passes_reliability() -> None:
    """No islands on the map (a blob): the seed's rank-correlation rule decides alone."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1000, D))
    lam = 0.02 * (z**2).sum(axis=1) + 0.1 * rng.random(1000)  # the dense core pays little lambda
    constant_soft = np.full(1000, 0.5)
    rel = criteria(evaluate(z, constant_soft, lam, no_queries(), min_size=100))["reliability"]
    assert rel["values"]["rho_soft_bind"] is None
    assert len(rel["values"]["islands"]) < 2  # a blob is one island at most
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
    assert conv["values"]["spikes"] is None  # < 100 recorded queries: no query-based test
    assert conv["values"]["recorded_risk_trend"] is None
    assert "converging" in conv["reading"]

    worse = criteria(evaluate(np.vstack([tight, loose]), soft, lam, no_queries(), min_size=500))
    assert worse["convergence"]["passed"] is False
    assert "not clustering more" in worse["convergence"]["reading"]


def test_more_risk_spikes_in_the_newest_fifth_fail_convergence() -> None:
    """Spikes are judged against their noise: a few more in the newest fifth are no growth,
    a fifth of its queries spiking (a worker gone astray) is."""
    rng = np.random.default_rng(5)
    loose, _ = islands(1000, rng, spread=1.5)
    tight, _ = islands(1000, rng, spread=0.2)
    z = np.vstack([loose, tight])
    soft, lam = rng.uniform(size=2000), rng.uniform(size=2000)
    risk = 0.5 + 0.01 * rng.normal(size=400)
    fading, growing, few_more = risk.copy(), risk.copy(), risk.copy()
    fading[0:80:5] = 3.0
    growing[320:400:5] = 3.0
    few_more[[10, 250, 300, 350, 390]] = 3.0

    ok = criteria(evaluate(z, soft, lam, fading, min_size=500))["convergence"]
    assert ok["passed"] is True
    assert ok["values"]["spikes"]["after"] == 0.0 and ok["values"]["spikes"]["change"] <= 0
    assert ok["values"]["recorded_queries"] == 400

    bad = criteria(evaluate(z, soft, lam, growing, min_size=500))["convergence"]
    assert bad["passed"] is False
    assert bad["values"]["spikes"]["after"] == pytest.approx(16 / 80)
    assert bad["values"]["failing"] == ["spikes"]
    assert bad["reading"].startswith("getting worse: recorded risk above")
    assert "not clustering more" not in bad["reading"]

    noise = criteria(evaluate(z, soft, lam, few_more, min_size=500))["convergence"]
    assert noise["passed"] is True  # 2 of 80 against 0: within the noise
    assert "± " in noise["reading"]

    few = criteria(evaluate(z, soft, lam, growing[-99:], min_size=500))["convergence"]
    assert few["passed"] is True
    assert few["values"]["spikes"] is None


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
    assert [c["name"] for c in res["criteria"]] == ["density", "reliability", "convergence", "kernel"]
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
        criteria(evaluate(z, soft, lam, no_queries(), min_size=100, thresholds=strict))["density"]["passed"]
        is False
    )


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        evaluate(np.zeros((5, 2)), np.zeros(4), np.zeros(5), no_queries(), min_size=1)
    with pytest.raises(ValueError):
        evaluate(np.zeros(5), np.zeros(5), np.zeros(5), no_queries(), min_size=1)


def test_spearman() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, np.inf])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(5)) is None
    assert spearman(np.ones(1), np.ones(1)) is None
    # ties take their average rank: ranks [1.5, 1.5, 3] vs [1, 2, 3]
    assert spearman(np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(
        np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]
    )


def test_spikes_are_values_above_a_level_that_does_not_follow_the_majority() -> None:
    """A converged policy's steady rare visits to a worse region keep their share; a new
    regime that a fifth of the queries enter raises it; noise near 0 is never a spike."""
    rng = np.random.default_rng(11)
    n = 1000
    settled = 0.1 + 0.01 * rng.normal(size=n)
    visits = settled.copy()
    visits[rng.uniform(size=n) < 0.1] = 0.8  # 10% rare visits all along
    change, level = trends.exceedances(visits, 1.0, margin=0.25, spread=5.0, min_effect=0.05, z=3.0)
    assert 0.1 < level < 0.8
    assert not change.worse and abs(change.value) < 0.06
    astray = visits.copy()
    astray[800:][rng.uniform(size=200) < 0.25] = 0.8  # a worker goes astray in the last fifth
    change, _ = trends.exceedances(astray, 1.0, margin=0.25, spread=5.0, min_effect=0.05, z=3.0)
    assert change.worse and change.after > 0.25
    underflowed = 1e-6 * rng.lognormal(size=n)
    change, _ = trends.exceedances(underflowed, 1e-6, margin=0.25, spread=5.0, min_effect=0.05, z=3.0)
    assert not change.worse
    assert trends.exceedances(settled[:50], 1.0, margin=0.25, spread=5.0, min_effect=0.05, z=3.0) is None


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
    density = criteria(evaluate(z, np.zeros(300), np.zeros(300), no_queries(), min_size=1))["density"]
    assert density["values"]["full_d_mean_knn_distance"] == pytest.approx(expected, rel=1e-4)


# -- every verdict on every scenario with a known answer ---------------------------------
#
# Each scenario is a buffer (z, soft_bind, lambda_bind in arrival order) plus recorded
# queries whose kernel numbers (Σw, n_eff) come from the seed's kernel over that buffer,
# and the truth of each of the four verdicts.

N, Q = 3000, 600
CENTRES = np.zeros((3, 8))
CENTRES[0, 0], CENTRES[1, 1], CENTRES[2, :2] = 8.0, 8.0, -6.0


def kernel_records(z: np.ndarray, queries: np.ndarray, sigma: float, k: int = 64) -> dict[str, np.ndarray]:
    """What the service records per query: the seed's kernel risk is irrelevant here (zeros);
    Σw unnormalised and n_eff = 1/Σw_norm² (0 where Σw underflows to 0)."""
    import faiss

    d2, _ = faiss.knn(queries.astype(np.float32), z.astype(np.float32), k)
    w = np.exp(-d2.astype(np.float64) / (2 * sigma**2))
    wsum = w.sum(axis=1)
    wn = w / np.where(wsum > 0, wsum, 1.0)[:, None]
    n_eff = np.where(wsum > 0, 1.0 / (wn**2).sum(axis=1), 0.0)
    return {"risk": np.zeros(len(queries)), "wsum": wsum, "n_eff": n_eff}


def island_buffer(
    n: int,
    rng: np.random.Generator,
    which: tuple[int, ...] = (0, 1, 2),
    spread: float = 0.7,
    sparse: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """n z's (d = 8) on the islands `which` plus a fraction `sparse` of exploration between
    them → (z, island label, −1 for the sparse points)."""
    label = rng.choice(which, n)
    z = CENTRES[label] + spread * rng.normal(size=(n, 8))
    between = rng.uniform(size=n) < sparse
    z[between] = rng.uniform(-8, 10, size=(int(between.sum()), 8)) * np.r_[1.0, 1.0, [0.3] * 6]
    label[between] = -1
    return z, label


def reliability_of(
    label: np.ndarray, rng: np.random.Generator, good: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """soft_bind 0.9 on island `good`, 0.3 on the others, 0.1 between; lambda_bind mirrors it."""
    soft = np.where(label == good, 0.9, np.where(label >= 0, 0.3, 0.1)) + 0.05 * rng.normal(size=label.size)
    soft = np.clip(soft, 0, 1)
    return soft, 1.0 - soft + 0.05 * rng.random(label.size)


@functools.cache
def scenario(name: str) -> tuple[dict[str, Any], dict[str, bool]]:
    """(evaluate's result, truth per verdict) of a named scenario."""
    rng = np.random.default_rng(sorted(SCENARIOS).index(name))
    sigma = 1.0
    risk = 0.6 + 0.03 * rng.normal(size=Q)  # steady unless the scenario says otherwise
    if name == "blob":
        z = rng.normal(size=(N, 8))
        soft, lam = rng.uniform(size=N), rng.uniform(size=N)
    elif name in ("islands", "islands_one_reliable"):
        z, label = island_buffer(N, rng)
        soft, lam = reliability_of(label, rng, 1 if name == "islands_one_reliable" else None)
    elif name == "islands_one_low_lambda":
        z, label = island_buffer(N, rng)
        soft = np.clip(0.4 + 0.05 * rng.normal(size=N), 0, 1)  # soft_bind tells nothing apart
        lam = np.where(label == 1, 0.1, 3.0) + 0.05 * rng.random(N)
    elif name in ("tighten_onto_bad", "tighten_onto_good", "steady"):
        older, old_label = island_buffer(N // 2, rng)
        target = 1 if name == "tighten_onto_bad" else 0  # island 0 is the reliable one
        newer, new_label = island_buffer(N - N // 2, rng, which=(target,), spread=0.4, sparse=0.02)
        z, label = np.vstack([older, newer]), np.r_[old_label, new_label]
        soft, lam = reliability_of(label, rng, 0)
        drift = np.linspace(0.54, 1.17, Q)  # the observed rise
        if name == "tighten_onto_bad":
            risk = drift + 0.05 * rng.normal(size=Q)
        elif name == "tighten_onto_good":
            risk = drift[::-1] + 0.05 * rng.normal(size=Q)
    elif name == "kernel_d64_unit":
        z = rng.normal(size=(N, 64))
        soft, lam = rng.uniform(size=N), rng.uniform(size=N)
    elif name == "kernel_d8_small":
        z = 0.1 * rng.normal(size=(N, 8))
        soft, lam = rng.uniform(size=N), rng.uniform(size=N)
    else:
        raise KeyError(name)
    # The newest Q z's stand for the queries that preceded them: searched against the rest.
    records = kernel_records(z[:-Q], z[-Q:], sigma)
    records["risk"] = risk
    risk_target = (1.0 - soft) + 0.05 * lam  # the seed's weights, cone_vol left out
    result = evaluate(z, soft, lam, records, min_size=500, sigma=sigma, k=64, risk_target=risk_target)
    return result, SCENARIOS[name]


SCENARIOS: dict[str, dict[str, bool]] = {
    # a Gaussian blob: no islands; reliability unrelated to the map; halves alike
    "blob": {"density": False, "reliability": False, "convergence": False, "kernel": True},
    # three islands, none reliable (only the sparse points between them are worse)
    "islands": {"density": True, "reliability": False, "convergence": False, "kernel": True},
    "islands_one_reliable": {"density": True, "reliability": True, "convergence": False, "kernel": True},
    # the same islands with soft_bind alike everywhere and one island of low lambda_bind
    "islands_one_low_lambda": {"density": True, "reliability": True, "convergence": False, "kernel": True},
    # the newer half tightens onto an unreliable island while the recorded risk rises
    "tighten_onto_bad": {"density": True, "reliability": True, "convergence": False, "kernel": True},
    "tighten_onto_good": {"density": True, "reliability": True, "convergence": True, "kernel": True},
    # tightening onto the good island with a steady, noisy recorded risk: no spikes
    "steady": {"density": True, "reliability": True, "convergence": True, "kernel": True},
    # unit-variance z at d = 64 with sigma 1: every query's Σw underflows
    "kernel_d64_unit": {"density": False, "reliability": False, "convergence": False, "kernel": False},
    # small-scale z at d = 8 with sigma 1: the kernel is alive
    "kernel_d8_small": {"density": False, "reliability": False, "convergence": False, "kernel": True},
}
VERDICTS = ("density", "reliability", "convergence", "kernel")


@pytest.mark.parametrize("verdict", VERDICTS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_verdict_on_every_scenario_matches_its_truth(name: str, verdict: str) -> None:
    result, truth = scenario(name)
    c = criteria(result)[verdict]
    assert c["passed"] is truth[verdict], c["reading"]
    assert_plain_json(result)


def test_density_is_judged_on_the_map_and_keeps_the_full_d_ratio() -> None:
    blob = criteria(scenario("blob")[0])["density"]["values"]
    assert blob["ratio"] == pytest.approx(1.0, abs=0.05)
    islands = criteria(scenario("islands")[0])["density"]
    assert islands["values"]["ratio"] < islands["values"]["full_d_ratio"]
    assert islands["values"]["pc2_variance_fraction"] > 0.8
    assert f"{islands['values']['ratio']:.2f}×" in islands["reading"]


def test_reliability_names_the_reliable_island() -> None:
    rel = criteria(scenario("islands_one_reliable")[0])["reliability"]
    table = rel["values"]["islands"]
    assert len(table) == 3
    (good,) = [i for i in table if i["reliable"]]
    assert good["soft_bind"] > 0.8
    assert rel["values"]["reliable_islands"] == [good["island"]]
    assert f"#{good['island']} at PC" in rel["reading"]
    assert f"soft_bind {good['soft_bind']:.2f}" in rel["reading"]
    # the plain islands: the old rule (ρ > 0, carried by the sparse points) would have passed
    plain = criteria(scenario("islands")[0])["reliability"]
    assert plain["values"]["rho_soft_bind"] > 0.2
    assert "none of the 3 islands is reliable" in plain["reading"]
    assert READING_1_WITHOUT_2 in plain["reading"]


def test_reliability_counts_low_lambda_bind() -> None:
    rel = criteria(scenario("islands_one_low_lambda")[0])["reliability"]
    (good,) = [i for i in rel["values"]["islands"] if i["reliable"]]
    assert good["lambda_bind"] < 0.2 and good["soft_bind"] < 0.5
    assert f"lambda_bind {good['lambda_bind']:.2f}" in rel["reading"]
    assert READING_1_WITHOUT_2 not in rel["reading"]


def test_convergence_into_risk_fails_on_the_trend_and_a_steady_run_has_no_spikes() -> None:
    bad = criteria(scenario("tighten_onto_bad")[0])["convergence"]
    assert bad["values"]["newer_ratio"] < 0.9 * bad["values"]["older_ratio"]  # it does cluster
    rise = bad["values"]["recorded_risk_trend"]
    assert rise["change"] > 0.3 and rise["worse"]
    assert bad["reading"].startswith("getting worse")
    assert f"{rise['change']:+.3g} ± {rise['se']:.2g}" in bad["reading"]
    good = criteria(scenario("tighten_onto_good")[0])["convergence"]["values"]
    assert good["spikes"]["after"] == 0.0  # a level that falls makes no spikes
    assert good["recorded_risk_trend"]["change"] < 0
    steady = criteria(scenario("steady")[0])["convergence"]["values"]
    assert not steady["spikes"]["worse"] and not steady["recorded_risk_trend"]["worse"]
    assert abs(steady["recorded_risk_trend"]["change"]) < 3 * steady["recorded_risk_trend"]["se"]


def test_a_rise_is_measured_in_the_risk_targets_range() -> None:
    """A recorded risk that moves 0.02 while stored risk targets span ~0.8 (2.5% of it) is no
    rise; the same move measured in the tight series' own range is; readings never call a
    rise "not rising"."""
    rng = np.random.default_rng(7)
    older, _ = islands(1000, rng, spread=1.5)
    newer, _ = islands(1000, rng, spread=0.2)
    z = np.vstack([older, newer])
    soft = rng.uniform(size=2000)
    risk = np.r_[-0.02 + 0.005 * rng.normal(size=500), 0.0 + 0.005 * rng.normal(size=500)]

    def judged(risk_target: np.ndarray | None) -> dict[str, Any]:
        result = evaluate(z, soft, 1 - soft, {"risk": risk}, min_size=500, risk_target=risk_target)
        return criteria(result)["convergence"]

    tight = judged(None)
    assert tight["passed"] is False and tight["values"]["recorded_risk_trend"]["worse"]
    steady = judged(1.0 - soft)  # risk targets spread over ~0.8 (10th–90th percentile)
    assert steady["passed"] is True
    assert steady["values"]["scale"] == pytest.approx(0.8, abs=0.05)
    trend = steady["values"]["recorded_risk_trend"]
    assert trend["change"] > 0 and trend["change"] < 0.05 * steady["values"]["scale"]
    assert "not rising" not in steady["reading"]
    assert f"{trend['change']:+.3g} ± {trend['se']:.2g}" in steady["reading"]


def test_newer_episodes_faring_worse_fail_convergence_even_with_a_flat_recorded_risk() -> None:
    """A run that settles on an unreliable island: the recorded risk is flat, but the newest
    episodes fare worse than the best earlier ones (a higher mean risk target)."""
    rng = np.random.default_rng(8)
    older, old_label = island_buffer(1000, rng)
    newer, new_label = island_buffer(1000, rng, which=(1,), spread=0.4, sparse=0.02)
    z, label = np.vstack([older, newer]), np.r_[old_label, new_label]
    soft, lam = reliability_of(label, rng, 0)  # island 0 reliable; the newer half sits on island 1
    flat = 0.6 + 0.03 * rng.normal(size=400)
    conv = criteria(evaluate(z, soft, lam, {"risk": flat}, min_size=500, risk_target=1.0 - soft))[
        "convergence"
    ]
    assert conv["passed"] is False
    window = conv["values"]["risk_target_window"]
    assert window["worse"] and window["after"] > window["before"]
    assert conv["reading"].startswith("getting worse: risk targets, best earlier fifth → newest")
    # without the risk targets only the recorded risk speaks, and it is flat
    blind = criteria(evaluate(z, soft, lam, {"risk": flat}, min_size=500))["convergence"]
    assert blind["passed"] is True


def test_a_collapse_in_the_last_tenth_fails_and_one_worker_going_astray_fails() -> None:
    rng = np.random.default_rng(9)
    z, label = island_buffer(3000, rng, which=(0,), spread=0.5, sparse=0.02)
    soft, lam = reliability_of(label, rng, 0)
    rt = 1.0 - soft
    late = rt.copy()
    late[2700:] += 0.5  # the last tenth lands somewhere much worse
    spread = np.r_[np.linspace(2.0, 1.0, 1500), np.full(1500, 1.0)][:, None]
    z = z * spread  # the buffer tightens, so clustering alone would pass
    flat = 0.1 + 0.01 * rng.normal(size=600)

    def conv(risk_target: np.ndarray, worker: np.ndarray | None = None) -> dict[str, Any]:
        res = evaluate(z, soft, lam, {"risk": flat}, min_size=500, risk_target=risk_target, worker=worker)
        return criteria(res)["convergence"]

    assert conv(rt)["passed"] is True
    collapsed = conv(late)
    assert collapsed["passed"] is False and collapsed["values"]["risk_target_window"]["worse"]
    workers = np.array([f"w{i % 5}" for i in range(3000)])
    astray = rt.copy()
    astray[(workers == "w3") & (np.arange(3000) >= 1500)] += 0.4
    one = conv(astray, workers)
    assert one["passed"] is False
    assert one["values"]["worst_worker"] == "w3" and "worker" in one["values"]["failing"]
    with pytest.raises(ValueError, match="worker"):
        evaluate(z, soft, lam, {"risk": flat}, min_size=500, worker=workers[:10])


def test_without_islands_a_correlation_over_unreliable_points_fails() -> None:
    """A blob where denser binds a little better but nothing binds well: the rank correlation
    holds, the densest quarter's soft_bind does not reach the floor."""
    rng = np.random.default_rng(13)
    z = rng.normal(size=(2000, D))
    r2 = (z**2).sum(axis=1)
    core = 1 - np.argsort(np.argsort(r2)) / 1999  # 1 at the densest core, 0 at the rim
    weak = np.clip(0.2 + 0.1 * core + 0.03 * rng.normal(size=2000), 0, 1)
    rel = criteria(evaluate(z, weak, 2 * (1 - weak), no_queries(), min_size=500))["reliability"]
    assert rel["values"]["rho_soft_bind"] > 0.2
    assert rel["passed"] is False
    dense = rel["values"]["densest_quarter"]
    assert dense["soft_bind"] < 0.5 and dense["passed"] is False
    assert rel["reading"].startswith("dense regions are not reliable")
    strong = np.clip(0.3 + 0.6 * core + 0.03 * rng.normal(size=2000), 0, 1)
    ok = criteria(evaluate(z, strong, 2 * (1 - strong), no_queries(), min_size=500))["reliability"]
    assert ok["passed"] is True and ok["values"]["densest_quarter"]["soft_bind"] > 0.7


def test_kernel_reading_says_what_to_change() -> None:
    dead = criteria(scenario("kernel_d64_unit")[0])["kernel"]
    assert dead["values"]["underflow_fraction"] == 1.0
    suggested = dead["values"]["suggested_sigma"]
    assert suggested > 5  # d = 64, unit variance: stored z's sit ~9 apart
    assert f"set sigma ≈ {suggested:.3g}" in dead["reading"]
    assert "100.0%" in dead["reading"]
    alive = criteria(scenario("kernel_d8_small")[0])["kernel"]
    assert alive["values"]["underflow_fraction"] == 0.0
    assert alive["values"]["median_n_eff"] > 60  # σ ≫ the spacing: a plain 64-NN average
    assert "plain k-NN average" in alive["reading"]


def test_kernel_is_null_without_enough_recorded_queries_or_episodes() -> None:
    rng = np.random.default_rng(12)
    z = rng.normal(size=(400, 8))
    few = {"risk": np.zeros(99), "wsum": np.zeros(99), "n_eff": np.zeros(99)}
    kernel = criteria(evaluate(z, np.full(400, 0.5), np.zeros(400), few, min_size=10))["kernel"]
    assert kernel["passed"] is None and "99 recorded queries" in kernel["reading"]
    many = {"risk": np.zeros(200), "wsum": np.zeros(200), "n_eff": np.zeros(200)}
    kernel = criteria(evaluate(z, np.full(400, 0.5), np.zeros(400), many, min_size=500))["kernel"]
    assert kernel["passed"] is None and kernel["reading"].startswith("too little data")
    assert kernel["values"]["underflow_fraction"] == 1.0  # the numbers still show
    with pytest.raises(ValueError, match="wsum"):
        evaluate(z, np.full(400, 0.5), np.zeros(400), {**many, "wsum": np.zeros(3)}, min_size=1)
