"""FIFO semantics: the buffer is deque(maxlen=capacity) over the server's arrival order."""

from __future__ import annotations

from collections import deque

import numpy as np

from .conftest import load_npz

CAPACITY = 1000


def episodes(start: int, n: int, d: int = 3) -> list[dict]:
    return [
        {
            "z": [float(i)] * d,
            "soft_bind": 0.5,
            "cone_vol": 1.0,
            "lambda_bind": float(i % 7),
            "id": f"ep{i}",
            "worker": f"w{i % 3}",
        }
        for i in range(start, start + n)
    ]


def export(client, path: str = "/export") -> dict[str, np.ndarray]:
    r = client.get(path)
    assert r.status_code == 200
    return load_npz(r.content)


def test_export_after_two_and_a_half_capacities_holds_the_last_capacity(client) -> None:
    expected: deque[int] = deque(maxlen=CAPACITY)
    rng = np.random.default_rng(0)
    sent = 0
    while sent < int(2.5 * CAPACITY):
        n = int(rng.integers(1, 400))
        r = client.post("/episodes", json={"episodes": episodes(sent, n)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accepted"] == n and body["last_seq"] - body["first_seq"] == n - 1
        expected.extend(range(sent, sent + n))
        sent += n
    data = export(client)
    assert len(data["z"]) == CAPACITY
    assert data["z"][:, 0].astype(int).tolist() == list(expected)
    assert data["id"].tolist() == [f"ep{i}" for i in expected]
    assert (np.diff(data["seq"]) == 1).all() and data["seq"][-1] == sent
    assert (np.diff(data["ts"]) >= 0).all()
    stats = client.get("/stats").json()
    assert stats["size"] == CAPACITY and stats["total_written"] == sent
    assert stats["seq_range"] == [sent - CAPACITY + 1, sent]
    assert sum(stats["workers"].values()) == CAPACITY


def test_one_batch_larger_than_capacity_keeps_its_tail(client) -> None:
    r = client.post("/episodes", json={"episodes": episodes(0, CAPACITY + 234)})
    assert r.json()["accepted"] == CAPACITY + 234
    data = export(client)
    assert data["z"][:, 0].astype(int).tolist() == list(range(234, CAPACITY + 234))


def test_ids_are_duplicates_only_while_in_the_memory(client) -> None:
    first = client.post("/episodes", json={"episodes": episodes(0, 10)}).json()
    again = client.post("/episodes", json={"episodes": episodes(5, 10)}).json()
    assert (again["accepted"], again["duplicates"]) == (5, 5)
    assert again["first_seq"] == first["last_seq"] + 1
    client.post("/episodes", json={"episodes": episodes(100, CAPACITY)})  # evicts ep0..ep14
    back = client.post("/episodes", json={"episodes": episodes(0, 1)}).json()
    assert back["accepted"] == 1


def test_named_memories_are_separate(client) -> None:
    client.post("/memories/a/episodes", json={"episodes": episodes(0, 5)})
    client.post("/memories/b/episodes", json={"episodes": episodes(0, 7, d=2)})
    assert len(export(client, "/memories/a/export")["z"]) == 5
    assert export(client, "/memories/b/export")["z"].shape == (7, 2)
    names = {m["name"]: m for m in client.get("/memories").json()["memories"]}
    assert names["a"]["z_dim"] == 3 and names["b"]["z_dim"] == 2 and names["default"]["size"] == 0
    assert client.delete("/memories/a").status_code == 204
    assert client.get("/memories/a/stats").status_code == 404
    assert client.delete("/memories/a").status_code == 404


def test_empty_default_memory(client) -> None:
    stats = client.get("/stats").json()
    assert stats["size"] == 0 and stats["z_dim"] is None and not stats["active"]
    data = export(client)
    assert len(data["seq"]) == 0
    r = client.post("/neighbors", json={"z": [[0.0, 1.0], [1.0, 2.0]]}).json()
    assert r["k"] == 0 and r["active"] is False and np.array(r["z"]).shape == (2, 0)
    assert client.post("/episodes", json={"episodes": []}).json()["accepted"] == 0
    assert client.get("/stats").json()["total_written"] == 0
