"""Convergence names the worker that holds the spikes (read from its episodes: recorded
queries carry no worker)."""

from __future__ import annotations

from typing import Any

import numpy as np

from zmem_service.diagnostics.criteria import evaluate

WORKERS = 5
N = 3000


def _run(stuck: bool, seed: int = 4) -> dict[str, Any]:
    """Five workers on a buffer that tightens (clustering passes); the recorded risk spikes in
    the newest fifth on one query in five. With `stuck`, worker w3's episodes sit in a worse
    region from half time on; without, the worse episodes of the newest fifth are everyone's."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, 8)) * np.r_[np.linspace(2.0, 1.0, N // 2), np.full(N - N // 2, 1.0)][:, None]
    soft, lam = rng.uniform(size=N), rng.uniform(size=N)
    worker = np.array([f"w{i % WORKERS}" for i in range(N)])
    rt = 0.3 + 0.05 * rng.normal(size=N)
    late = np.arange(N) >= N // 2
    if stuck:
        rt[late & (worker == "w3")] += 0.5
    else:
        rt[late & (rng.uniform(size=N) < 1 / WORKERS)] += 0.5
    risk = 0.3 + 0.01 * rng.normal(size=600)
    risk[480::5] = 0.8
    result = evaluate(z, soft, lam, {"risk": risk}, min_size=500, risk_target=rt, worker=worker)
    return {c["name"]: c for c in result["criteria"]}["convergence"]


def test_spikes_that_are_one_worker_s_are_named_with_that_worker() -> None:
    conv = _run(stuck=True)
    assert conv["passed"] is False and "spikes" in conv["values"]["failing"]
    holder = conv["values"]["spike_worker"]
    assert holder is not None and holder["worker"] == "w3"
    assert holder["share"] > 0.9 and holder["others"] < 0.2 and holder["held"] > 0.5
    assert "likely from worker 'w3'" in conv["reading"]
    # the risk-target part names the same worker
    assert conv["values"]["worst_worker"] == "w3"


def test_spikes_spread_over_every_worker_name_none() -> None:
    conv = _run(stuck=False)
    assert conv["passed"] is False and "spikes" in conv["values"]["failing"]
    assert conv["values"]["spike_worker"] is None
    assert "likely from worker" not in conv["reading"]


def test_without_workers_the_spikes_name_none() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(N, 8))
    risk = 0.3 + 0.01 * rng.normal(size=600)
    risk[480::5] = 0.8
    result = evaluate(z, rng.uniform(size=N), rng.uniform(size=N), {"risk": risk}, min_size=500)
    conv = {c["name"]: c for c in result["criteria"]}["convergence"]
    assert conv["values"]["spike_worker"] is None
