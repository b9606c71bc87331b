"""`sigma: "auto"` on the service, in one place: what it resolves to, when, and what the
changes feed sends of it.

The schedule itself (the window, its boundary every capacity/10 writes, the k-th neighbour
distance) is `zmem_core.params`, unit-tested in `tests/core/test_params.py`; here the service
runs it. The replica's side (it answers "auto" with the feed's value, refuses when it has
none, 1.0 for an inactive memory) is in `test_replica.py`, `test_replica_faults.py` and,
against a real server, `test_replica_e2e.py`; the query-side validation of the literal is a
row of the table in `http/test_bad_input.py`.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from zmem_service.settings import ServiceSettings

from .conftest import ready_client
from .test_changes import eps as feed_episodes
from .test_seams import tied_episodes


def export(client) -> dict[str, np.ndarray]:
    r = client.get("/memories/tied/export")
    assert r.status_code == 200
    with np.load(io.BytesIO(r.content), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_auto_sigma_is_not_frozen_by_early_queries(make_client) -> None:
    """Below min_size "auto" is 1.0 (an inactive memory); asked that early, it is not frozen:
    once the memory is active the window's own σ replaces it."""
    client = make_client(min_size=50, capacity=50_000)
    assert client.post("/neighbors", json={"z": [0.0] * 4, "sigma": "auto"}).json()["sigma"] == 1.0
    rng = np.random.default_rng(0)
    eps = [
        {"z": (rng.standard_normal(4) * 40).tolist(), "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
        for _ in range(600)
    ]
    client.post("/episodes", json={"episodes": eps})
    assert client.post("/neighbors", json={"z": [0.0] * 4, "sigma": "auto"}).json()["sigma"] > 10


def test_auto_sigma_depends_on_the_buffer_not_on_when_it_was_asked(make_client) -> None:
    """Two memories that hold the same rows (same z's, same seqs) resolve "auto" to the same σ,
    whether it was first asked early (before most of the current window arrived), never, or
    with later rows already in; and that σ is the window's own: σ² = the mean squared distance
    from each row with seq in (boundary − capacity + capacity/10, boundary] to its k-th nearest
    neighbour among those rows (boundary = the newest seq rounded down to capacity/10)."""
    client = make_client(capacity=300, min_size=10, k=8)
    rng = np.random.default_rng(3)
    z = np.concatenate([rng.standard_normal((300, 4)) * 0.1, rng.standard_normal((350, 4)) * 5.0])
    eps = [{"z": row.tolist(), "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for row in z]

    def sigma(name: str) -> float:
        r = client.post(f"/memories/{name}/neighbors", json={"z": [0.0] * 4, "sigma": "auto"})
        assert r.status_code == 200, r.text
        return float(r.json()["sigma"])

    asked_early = []
    for start in range(0, 650, 50):  # "early" asks once per 50 writes
        assert (
            client.post("/memories/early/episodes", json={"episodes": eps[start : start + 50]}).status_code
            == 200
        )
        asked_early.append(sigma("early"))
    assert client.post("/memories/late/episodes", json={"episodes": eps}).status_code == 200
    assert sigma("late") == asked_early[-1]

    boundary = 650 // 30 * 30  # the newest seq (650) rounded down to capacity/10 = 30
    rows = z[boundary - 300 + 30 : boundary]  # seqs (boundary − 270, boundary], 0-based rows
    d2 = ((rows[:, None, :] - rows[None]) ** 2).sum(-1)
    expected = np.sqrt(np.sort(d2, axis=1)[:, 8].mean())  # column 0 is the row itself
    assert asked_early[-1] == pytest.approx(expected, rel=1e-5)


def test_ties_and_auto_sigma_survive_a_restart_after_a_wrap(tmp_path) -> None:
    """Identical z's written past a wrap: the same query answers with the same seqs (the lowest
    of each tie group) and the same `sigma: "auto"` before and after a restart, although the
    restart refills the ring's slots from 0 in another layout."""
    settings = ServiceSettings(data_dir=tmp_path, capacity=100, min_size=10, k=16, sigma="auto")
    sizes = [7, 31, 13, 50, 29, 11, 40, 3]  # 184 writes: the ring has wrapped
    client = ready_client(settings)
    written = 0
    for n in sizes:
        assert (
            client.post("/memories/tied/episodes", json={"episodes": tied_episodes(n, written)}).status_code
            == 200
        )
        written += n
    queries = {"z": [[float(p), 1.0, -1.0] for p in range(5)] + [[2.5, 0.0, 0.0]], "k": 16}
    before = client.post("/memories/tied/neighbors", json=queries).json()
    held = export(client)
    client.__exit__(None, None, None)

    # Expected: for each query, the held rows sorted by (d2, seq).
    zq = np.array(queries["z"], np.float64)
    d2 = ((zq[:, None, :] - held["z"][None].astype(np.float64)) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(held["seq"], d2.shape), d2), axis=-1)[:, :16]
    assert before["seq"] == held["seq"][order].tolist()
    assert before["sigma"] > 0

    client = ready_client(settings)
    try:
        after = client.post("/memories/tied/neighbors", json=queries).json()
        assert after["seq"] == before["seq"]
        assert after["d2"] == before["d2"]
        assert after["sigma"] == before["sigma"]
    finally:
        client.__exit__(None, None, None)


def test_the_auto_sigma_is_sent_only_where_someone_asked_for_it(make_client) -> None:
    """Resolving "auto" costs a search per capacity/10 writes: a memory with a numeric sigma
    sends its value once a follower (`auto=true`) or a query has asked for "auto"."""
    client = make_client(capacity=100, min_size=5)  # sigma 1.0
    client.post("/episodes", json={"episodes": feed_episodes(20)})
    assert client.get("/changes").json()["sigma_auto"] is None
    asked = client.get("/changes", params={"auto": "true"}).json()["sigma_auto"]
    assert asked == pytest.approx(
        client.post("/neighbors", json={"z": [0, 0, 0], "sigma": "auto"}).json()["sigma"]
    )
    assert client.get("/changes").json()["sigma_auto"] == asked  # asked once: sent from now on


def test_a_put_with_a_bad_sigma_names_both_forms(client) -> None:
    r = client.put("/memories/x", json={"sigma": "Auto"})
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {"loc": ["body", "sigma"], "msg": "must be a positive number or \"auto\", got 'Auto'"}
    ]
    assert client.put("/memories/x", json={"sigma": "auto", "z_dim": 3}).status_code == 201


def test_complete_pages_of_an_auto_memory_carry_its_sigma(make_client) -> None:
    """A memory whose sigma is "auto" sends the value a query would get on every complete page;
    a page cut short by `limit` sends none (the follower is not at the newest row yet)."""
    client = make_client(capacity=20, min_size=5, sigma="auto")
    assert client.post("/memories/m/episodes", json={"episodes": feed_episodes(30)}).status_code == 200
    page = client.get("/memories/m/changes").json()
    auto = client.post("/memories/m/neighbors", json={"z": [0, 0, 0], "sigma": "auto"}).json()["sigma"]
    assert page["complete"] is True and page["sigma_auto"] == pytest.approx(auto)
    params = {"after": 10, "generation": page["generation"], "limit": 3}
    page = client.get("/memories/m/changes", params=params).json()
    assert page["complete"] is False and page["sigma_auto"] is None
