"""The seams: answers that depend only on the buffer, reservation before commit, store upgrades."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zmem_service.index import FaissCpuIndex
from zmem_service.settings import ServiceSettings

from .conftest import ready_client

DATA = Path(__file__).parent / "data"


def tied_episodes(n: int, start: int) -> list[dict]:
    """Five distinct z's, each repeated: every query onto one of them ties many rows at d2 = 0."""
    return [
        {"z": [float((start + i) % 5), 1.0, -1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1}
        for i in range(n)
    ]


def test_seqs_are_never_reused_under_a_name_after_delete_and_restart(tmp_path) -> None:
    """A memory deleted and made again (by PUT, by a write, or `default` itself) goes on from
    its old next seq, also after a restart: a seq names one episode of a name for good."""
    settings = ServiceSettings(data_dir=tmp_path, capacity=100, min_size=1)
    client = ready_client(settings)
    try:
        for name in ("m", "default"):
            first = client.post(f"/memories/{name}/episodes", json={"episodes": tied_episodes(7, 0)})
            assert first.json()["last_seq"] == 7
            assert client.delete(f"/memories/{name}").status_code == 204
        assert client.put("/memories/m", json={"z_dim": 3}).status_code == 201
        again = client.post("/memories/m/episodes", json={"episodes": tied_episodes(2, 0)}).json()
        assert (again["first_seq"], again["last_seq"]) == (8, 9)
        assert client.delete("/memories/m").status_code == 204
    finally:
        client.__exit__(None, None, None)
    client = ready_client(settings)
    try:
        for name, first_seq in (("m", 10), ("default", 8)):
            r = client.post(f"/memories/{name}/episodes", json={"episodes": tied_episodes(1, 0)}).json()
            assert r["first_seq"] == first_seq, name
    finally:
        client.__exit__(None, None, None)


def test_a_reservation_that_fails_stores_nothing_and_the_memory_keeps_working(
    make_client, monkeypatch
) -> None:
    client = make_client(capacity=1000, min_size=1)
    r = client.post("/memories/m/episodes", json={"episodes": tied_episodes(10, 0)})
    assert r.json()["last_seq"] == 10  # 64 slots reserved
    before = client.get("/memories/m/export").content
    real = FaissCpuIndex.reserve

    def fail_to_grow(self: FaissCpuIndex, slots: int) -> None:
        if slots > 64:
            raise MemoryError("no room for the index")
        real(self, slots)

    monkeypatch.setattr(FaissCpuIndex, "reserve", fail_to_grow)
    r = client.post("/memories/m/episodes", json={"episodes": tied_episodes(60, 10)})  # needs 128 slots
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/memories/m/export").content == before
    assert client.get("/memories/m/stats").json()["next_seq"] == 11
    # Within the reserved room, writes still work; once growing works again, so do big ones.
    assert (
        client.post("/memories/m/episodes", json={"episodes": tied_episodes(5, 10)}).json()["first_seq"] == 11
    )
    monkeypatch.setattr(FaissCpuIndex, "reserve", real)
    r = client.post("/memories/m/episodes", json={"episodes": tied_episodes(60, 15)})
    assert r.status_code == 200 and r.json()["first_seq"] == 16 and r.json()["last_seq"] == 75


def test_a_reservation_that_fails_on_a_new_memory_creates_nothing(make_client, monkeypatch) -> None:
    client = make_client(capacity=1000, min_size=1)

    def no_room(self: FaissCpuIndex, slots: int) -> None:
        raise MemoryError("no room")

    monkeypatch.setattr(FaissCpuIndex, "reserve", no_room)
    assert client.post("/memories/new/episodes", json={"episodes": tied_episodes(3, 0)}).status_code == 503
    assert client.get("/memories/new/stats").status_code == 404
    monkeypatch.undo()
    r = client.post("/memories/new/episodes", json={"episodes": tied_episodes(3, 0)})
    assert r.status_code == 200 and r.json()["first_seq"] == 1


def test_a_data_dir_of_release_0_1_0_opens_and_answers(tmp_path) -> None:
    """tests/data/v1-zmem.sqlite3 was written by release 0.1.0 (no schema version): memory `old`
    (capacity 50, d=3, 80 writes: wrapped) and `auto` (sigma auto, capacity 20, 30 writes)."""
    (tmp_path / "data").mkdir()
    shutil.copy(DATA / "v1-zmem.sqlite3", tmp_path / "data" / "zmem.sqlite3")
    client = ready_client(ServiceSettings(data_dir=tmp_path / "data"))
    try:
        listed = {m["name"]: m for m in client.get("/memories").json()["memories"]}
        assert listed["old"]["size"] == 50 and listed["old"]["z_dim"] == 3
        assert listed["auto"]["size"] == 20 and listed["auto"]["total_written"] == 30
        # The answer release 0.1.0 gave to this query (no ties in this data).
        r = client.post("/memories/old/neighbors", json={"z": [0, 0, 0], "k": 5}).json()
        assert r["seq"] == [71, 78, 36, 41, 47]
        np.testing.assert_allclose(r["d2"], [0.39377, 0.42279, 0.43302, 0.63287, 0.68890], rtol=1e-4)
        stats = client.get("/memories/old/stats").json()
        assert stats["seq_range"] == [31, 80] and len(stats["generation"]) == 32
        assert stats["workers"] == {"w1": 25, "w2": 25}
        ep = {"z": [0.0, 0.0, 0.0], "soft_bind": 1.0, "cone_vol": 1.0, "lambda_bind": 0.0, "id": "e79"}
        assert client.post("/memories/old/episodes", json={"episodes": [ep]}).json()["duplicates"] == 1
        ep["id"] = "new"
        assert client.post("/memories/old/episodes", json={"episodes": [ep]}).json()["first_seq"] == 81
        assert client.post("/memories/auto/neighbors", json={"z": [0, 0], "k": 3}).json()["sigma"] > 0
    finally:
        client.__exit__(None, None, None)
    db = sqlite3.connect(tmp_path / "data" / "zmem.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    generations = dict(db.execute("SELECT name, generation FROM memories"))
    assert len(set(generations.values())) == 2  # each memory its own
    db.close()
    # Reopened by this release again, the generations are kept.
    client = ready_client(ServiceSettings(data_dir=tmp_path / "data"))
    try:
        assert client.get("/memories/old/stats").json()["generation"] == generations["old"]
    finally:
        client.__exit__(None, None, None)


def test_a_memory_with_a_corrupt_row_is_skipped_and_reported(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "zmem.sqlite3"
    shutil.copy(DATA / "v1-zmem.sqlite3", path)
    db = sqlite3.connect(path)
    db.execute("UPDATE episodes SET z = x'0000' WHERE memory = 'old' AND seq = 60")
    db.commit()
    db.close()
    client = ready_client(ServiceSettings(data_dir=tmp_path / "data"))
    try:
        ready = client.get("/readyz").json()
        assert "old" in ready["skipped_memories"] and "seq 60" in ready["skipped_memories"]["old"]
        assert client.get("/memories/old/stats").status_code == 404
        assert client.get("/memories/auto/stats").json()["size"] == 20  # the others are served
    finally:
        client.__exit__(None, None, None)


@pytest.mark.e2e
def test_an_unreadable_store_stops_the_server_with_a_clear_message(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    blob = (DATA / "v1-zmem.sqlite3").read_bytes()
    (tmp_path / "data" / "zmem.sqlite3").write_bytes(blob[:100] + b"\x00" * 3000)  # truncated, garbled
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "zmem_service.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "zmem.sqlite3" in r.stderr and ("malformed" in r.stderr or "not a database" in r.stderr)
