"""Service behaviour beyond single requests: budget, readiness, wire formats, trimming, imports."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading

import httpx
import numpy as np
import pytest
import safetensors.numpy

from zmem_service.index import FaissCpuIndex
from zmem_service.memory import id_bytes
from zmem_service.ring import row_bytes
from zmem_service.service import ZMem

from .conftest import ST, episodes, ready_client
from .seed_reference import random_episodes
from .server import wait_until


def test_the_memory_budget_gives_507_and_changes_nothing(make_client) -> None:
    # 64 slots of d=4 (ring and index) and 70 ids fit; growing to 128 slots does not. No
    # recorded queries: their bound would be counted from the first rows on.
    slot = row_bytes(4) + FaissCpuIndex(4, 1).bytes_after(1)
    budget = 64 * slot + id_bytes(["e00"] * 70)
    client = make_client(max_memory_bytes=budget, capacity=1000, min_size=1, recorded_queries=0)
    assert client.post("/episodes", json={"episodes": episodes(60)}).status_code == 200
    before = client.get("/export").content
    r = client.post("/episodes", json={"episodes": episodes(10, start=60)})
    assert r.status_code == 507 and r.headers["content-type"] == "application/problem+json"
    assert "--max-memory-bytes" in r.json()["detail"]
    assert client.get("/export").content == before
    assert client.post("/episodes", json={"episodes": episodes(4, start=60)}).status_code == 200


def test_readyz_is_503_until_the_memories_are_loaded(tmp_path, monkeypatch) -> None:
    from zmem_service.settings import ServiceSettings

    release = threading.Event()
    real_load = ZMem.load

    def slow_load(self: ZMem) -> None:
        release.wait(30)
        real_load(self)

    monkeypatch.setattr(ZMem, "load", slow_load)
    from fastapi.testclient import TestClient

    from zmem_service.http.app import create_app

    with TestClient(create_app(ServiceSettings(data_dir=tmp_path))) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        r = client.post("/episodes", json={"episodes": episodes(1)})
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        release.set()  # the load goes on only once the 503s are seen: no race with a timer
        wait_until(lambda: client.get("/readyz").status_code == 200, 10, "/readyz 200 after the load")
        assert client.post("/episodes", json={"episodes": episodes(1)}).status_code == 200


def test_json_and_safetensors_answers_agree(client) -> None:
    data = random_episodes(300, 6)
    body = safetensors.numpy.save(
        {k: v for k, v in data.items()}, metadata={"id": json.dumps([f"s{i}" for i in range(300)])}
    )
    r = client.post("/episodes", content=body, headers={"content-type": ST})
    assert r.json()["accepted"] == 300
    q = random_episodes(3, 6, seed=5)["z"]
    for route in ("neighbors", "risk"):
        as_json = client.post(f"/{route}", json={"z": q.tolist(), "k": 7}).json()
        raw = client.post(
            f"/{route}",
            content=safetensors.numpy.save({"z": q}, metadata={"k": "7"}),
            headers={"content-type": ST, "accept": ST},
        )
        assert raw.headers["content-type"] == ST
        arrays = safetensors.numpy.load(raw.content)
        for key, value in arrays.items():
            np.testing.assert_allclose(value, np.array(as_json[key]), rtol=1e-6, err_msg=key)
    one = client.post("/risk", json={"z": q[0].tolist(), "k": 7}).json()
    assert isinstance(one["risk"], float)
    by_param = client.post("/neighbors?k=3&sigma=auto", json={"z": q[0].tolist()}).json()
    assert by_param["k"] == 3 and by_param["sigma"] > 0
    body_wins = client.post("/neighbors?k=3", json={"z": q[0].tolist(), "k": 5}).json()
    assert body_wins["k"] == 5


def test_stored_rows_beyond_capacity_are_trimmed(make_client, tmp_path) -> None:
    client = make_client(capacity=500, data_dir=tmp_path / "trim")
    for start in range(0, 3000, 250):
        client.post("/episodes", json={"episodes": episodes(250, start=start)})
    db = sqlite3.connect(tmp_path / "trim" / "zmem.sqlite3")
    stored = db.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM episodes").fetchone()
    assert stored[2] == 3000 and stored[0] < 500 + 1000 + 250  # trimmed every max(1000, cap/10)
    assert client.get("/stats").json()["seq_range"] == [2501, 3000]


def test_import_with_other_settings_into_a_configured_memory_is_409(client) -> None:
    client.post("/memories/src/episodes", json={"episodes": episodes(20)})
    exported = client.get("/memories/src/export").content
    client.put("/memories/dst", json={"z_dim": 4, "k": 9})
    r = client.post("/memories/dst/import", content=exported)
    assert r.status_code == 409
    assert {c["field"] for c in r.json()["conflicts"]} == {"k"}
    assert client.get("/memories/dst/stats").json()["size"] == 0
    bad = client.post("/memories/dst2/import", content=b"not an npz")
    assert bad.status_code == 422
    with np.load(io.BytesIO(exported), allow_pickle=False) as f:
        assert json.loads(str(f["settings"]))["z_dim"] == 4


@pytest.mark.e2e
def test_episodes_recorded_just_before_exit_are_sent(server) -> None:
    script = textwrap.dedent(f"""
        import numpy as np
        from zmem_client import ZMemClient
        mem = ZMemClient({server.url!r})
        for i in range(300):
            mem.record(np.full(3, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
        # no flush, no close: the interpreter exits here
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert httpx.get(server.url + "/stats").json()["size"] == 300


def test_metrics_count_requests_and_episodes(client) -> None:
    client.post("/episodes", json={"episodes": episodes(5)})
    client.post("/episodes", json={"episodes": episodes(5)})
    text = client.get("/metrics").text
    assert 'zmem_episodes_accepted_total{memory="default"} 5.0' in text
    assert 'zmem_episodes_duplicate_total{memory="default"} 5.0' in text
    assert 'zmem_http_requests_total{method="POST",route="/episodes",status="200"} 2.0' in text
    assert 'zmem_memory_size_episodes{memory="default"} 5.0' in text


def test_a_read_answers_while_many_writes_are_in_flight(tmp_path) -> None:
    from zmem_service.settings import ServiceSettings

    client = ready_client(ServiceSettings(data_dir=tmp_path, min_size=1))
    try:
        client.post("/episodes", json={"episodes": episodes(10)})
        errors: list[int] = []

        def write(start: int) -> None:
            r = client.post("/episodes", json={"episodes": episodes(200, start=start)})
            if r.status_code != 200:
                errors.append(r.status_code)

        threads = [threading.Thread(target=write, args=(1000 * (i + 1),)) for i in range(8)]
        for t in threads:
            t.start()
        for _ in range(20):
            r = client.post("/neighbors", json={"z": [0.0] * 4, "k": 5})
            assert r.status_code == 200 and r.json()["k"] == 5
        for t in threads:
            t.join()
        assert not errors
        assert client.get("/stats").json()["size"] == 10 + 8 * 200
    finally:
        client.__exit__(None, None, None)
