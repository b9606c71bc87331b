"""Worker islands: the readings say when the workers' z spaces don't line up."""

from __future__ import annotations

from typing import Any

import numpy as np

from zmem_service.diagnostics.criteria import evaluate
from zmem_service.diagnostics.workers import SEPARATED, worker_islands

D, N, WORKERS = 8, 3000, 4
CENTRES = np.zeros((3, D))
CENTRES[0, 0], CENTRES[1, 1], CENTRES[2, :2] = 8.0, 8.0, -6.0


def run(rotated: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four workers on the same three islands, taking turns: (z, soft_bind, lambda_bind,
    worker). With `rotated`, each worker's z is its own rotation of the shared space, as
    separate encoders give; island 0 binds well either way."""
    rng = np.random.default_rng(seed)
    island = rng.integers(0, 3, N)
    who = np.arange(N) % WORKERS
    z = CENTRES[island] + 0.7 * rng.normal(size=(N, D))
    if rotated:
        turns = [np.linalg.qr(rng.normal(size=(D, D)))[0] for _ in range(WORKERS)]
        z = np.stack([z[i] @ turns[w] for i, w in enumerate(who)])
    soft = np.clip(np.where(island == 0, 0.9, 0.3) + 0.05 * rng.normal(size=N), 0, 1)
    return z, soft, 1.0 - soft, np.array([f"worker-{w}" for w in who])


def criteria(z: np.ndarray, soft: np.ndarray, lam: np.ndarray, worker: Any) -> dict[str, dict[str, Any]]:
    res = evaluate(z, soft, lam, np.zeros(0), min_size=500, worker=worker)
    return {c["name"]: c for c in res["criteria"]}


def test_each_worker_in_its_own_rotation_of_z_is_said_plainly() -> None:
    c = criteria(*run(rotated=True))
    found = c["reliability"]["values"]["workers"]
    assert found["separated"] is True and found["separation"] > 0.95
    assert found["expected_own_neighbours"] < 0.3  # four workers, mixed: about a quarter
    reading = c["reliability"]["reading"]
    assert reading.startswith("the workers' z spaces don't line up")
    assert "shared encoder" in reading and "average their parameters" in reading
    assert f"{found['own_neighbours']:.0%} of each z's 10 nearest neighbours" in reading
    assert "don't line up" in c["density"]["reading"]
    assert "each island on the map" not in reading  # on the 2-D map the rotations overlap


def test_workers_sharing_one_z_space_get_no_warning() -> None:
    c = criteria(*run(rotated=False))
    found = c["reliability"]["values"]["workers"]
    assert found["separated"] is False and abs(found["separation"]) < 0.1
    assert all("line up" not in x["reading"] for x in c.values())
    assert c["reliability"]["passed"] is True  # island 0 binds well


def test_islands_that_are_workers_name_their_worker() -> None:
    """Each worker alone on its own island: every island is one worker's, and the reading
    lists them."""
    rng = np.random.default_rng(3)
    who = np.arange(N) % 3
    z = CENTRES[who] + 0.7 * rng.normal(size=(N, D))
    soft = np.clip(np.where(who == 0, 0.9, 0.1) + 0.05 * rng.normal(size=N), 0, 1)
    c = criteria(z, soft, 1 - soft, np.array([f"w{w}" for w in who]))["reliability"]
    found = c["values"]["workers"]
    assert found["separated"] is True
    assert sorted(i["worker"] for i in found["islands"]) == ["w0", "w1", "w2"]
    assert all(i["share"] > 0.99 for i in found["islands"])
    assert "each island on the map is one worker's (#1: 100% 'w" in c["reading"]


def test_without_two_workers_there_is_nothing_to_compare() -> None:
    z, soft, lam, _ = run(rotated=True)
    assert criteria(z, soft, lam, None)["reliability"]["values"]["workers"] is None
    one = np.full(N, "solo")
    assert criteria(z, soft, lam, one)["reliability"]["values"]["workers"] is None
    few = one.astype(object)
    few[:50] = "rare"  # under 5% of the sample: not a second worker to compare with
    assert worker_islands(z, few, np.full(N, -1), 10) is None
    unnamed = np.array([None, "a"] * (N // 2), dtype=object)  # None is a worker of its own
    shared = run(rotated=False)[0]
    found = worker_islands(shared, unnamed, np.full(N, -1), 10)
    assert found is not None and found["workers"] == 2 and found["islands"] == []
    assert found["separation"] < SEPARATED
