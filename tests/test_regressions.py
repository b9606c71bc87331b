"""Regressions for bugs found in review: each test names what used to go wrong."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

from zmem_client import FlushTimeout, NoSuchMemory, RequestRejected, SendFailed, ZMemClient
from zmem_service.episodes import EpisodeBatch
from zmem_service.registry import Memories
from zmem_service.ring import FLOAT_FIELDS
from zmem_service.settings import ServiceSettings
from zmem_service.store import SqliteStore
from zmem_service.writer import Writer

from .conftest import ST, episodes
from .server import Server


def npz(**overrides: np.ndarray | str) -> bytes:
    n = 3
    data: dict = {
        "z": np.zeros((n, 4), np.float32),
        "seq": np.arange(1, n + 1),
        "ts": np.zeros(n),
        "id": np.array(["a", "b", "c"]),
        "worker": np.array(["", "", ""]),
        "settings": json.dumps(
            {
                "z_dim": None,
                "capacity": 100,
                "min_size": 1,
                "k": 4,
                "sigma": 1.0,
                "risk": {"a": 1, "b": 0.2, "c": 0.05, "eps": 1e-8},
            }
        ),
    }
    for f in (*FLOAT_FIELDS, "risk_target"):
        data[f] = np.zeros(n, np.float32)
    data["soft_bind"] = data["cone_vol"] = np.ones(n, np.float32)  # risk target 0 with these weights
    data.update(overrides)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.array(v) for k, v in data.items()})
    return buf.getvalue()


@pytest.mark.parametrize(
    "overrides",
    [
        {"z": np.zeros((3, 0), np.float32)},  # used to store z_dim 0 and break every restart
        {"z": np.zeros((3, 5000), np.float32)},
        {"seq": np.array([2**63 - 3, 2**63 - 2, 2**63 - 1])},  # used to be a 503 from SQLite
        {"seq": np.array([-5, -4, -3])},
        {"seq": np.array([1.0, 2.0, 3.0])},
        {"id": np.array(["a" * 129, "b", "c"])},
    ],
    ids=["z_dim_0", "z_dim_5000", "huge_seq", "negative_seq", "float_seq", "long_id"],
)
def test_a_bad_import_is_422_and_stores_nothing(client, overrides) -> None:
    r = client.post("/memories/imp/import", content=npz(**overrides))
    assert r.status_code == 422, r.text
    assert client.get("/memories/imp/stats").status_code == 404
    assert client.post("/memories/ok/import", content=npz()).status_code == 200


def test_a_lone_surrogate_id_is_422(client) -> None:
    data = {
        "z": np.zeros((2, 4), np.float32),
        **{f: np.zeros(2, np.float32) for f in ("soft_bind", "lambda_bind")},
        "cone_vol": np.ones(2, np.float32),
    }
    for key in ("id", "worker"):
        body = safetensors.numpy.save(data, metadata={key: json.dumps(["ok", "bad\ud800"])})
        r = client.post("/episodes", content=body, headers={"content-type": ST})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["episodes", 1, key]


def test_one_job_that_cannot_commit_does_not_fail_its_group(tmp_path) -> None:
    store = SqliteStore(tmp_path)
    real_insert = store.insert

    def insert(name, rows):  # type: ignore[no-untyped-def]
        if name == "poison":
            raise RuntimeError("the store refused this row")
        real_insert(name, rows)

    store.insert = insert  # type: ignore[method-assign]
    writer = Writer(Memories(ServiceSettings(data_dir=tmp_path)), store)

    def batch(tag: str) -> EpisodeBatch:
        return EpisodeBatch(
            np.ones((2, 3), np.float32),
            {f: np.full(2, 0.5, np.float32) for f in FLOAT_FIELDS},
            [f"{tag}0", f"{tag}1"],
            [None, None],
        )

    async def burst() -> list:
        jobs = [writer.write("poison" if i == 5 else "good", batch(f"b{i}-")) for i in range(12)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    replies = asyncio.run(burst())
    writer.close()
    failed = [i for i, r in enumerate(replies) if isinstance(r, Exception)]
    assert failed == [5]
    assert sum(r["accepted"] for r in replies if isinstance(r, dict)) == 22


def test_infinite_risk_targets_are_refused(client) -> None:
    assert client.put("/memories/w", json={"z_dim": 4, "risk": {"a": 1e39}}).status_code == 201
    r = client.post("/memories/w/episodes", json={"episodes": episodes(2)})
    assert r.status_code == 422 and "risk target" in r.json()["detail"]


@pytest.mark.e2e
def test_risk_on_a_memory_nobody_wrote_to_is_zero(server) -> None:
    with ZMemClient(server.url, memory="fresh_run_1") as mem:
        z = torch.ones(3, 4, requires_grad=True)
        assert mem.risk(z).tolist() == [0.0, 0.0, 0.0]
        assert mem.risk(z[:1]).shape == ()
        assert mem.risk(torch.ones(1, 4, dtype=torch.int64)).dtype == torch.get_default_dtype()
        # The real service's 404 is the one the client knows; reads say so plainly.
        with pytest.raises(NoSuchMemory, match="no such memory yet"):
            mem.diagnostics()
        with pytest.raises(NoSuchMemory):
            mem.stats()
    with ZMemClient(server.url + "/not-a-prefix") as wrong:  # a route 404 is no memory's answer
        with pytest.raises(RequestRejected) as info:
            wrong.risk(torch.ones(1, 4))
        assert info.value.status == 404 and not isinstance(info.value, NoSuchMemory)


def test_a_broken_sender_surfaces_instead_of_hanging() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise ZeroDivisionError("a bug in the sending path")

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    mem.record(np.zeros(3), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
    with pytest.raises(SendFailed, match="ZeroDivisionError"):
        mem.flush(timeout=10)
    mem.close(timeout=5)


def test_repeated_ids_in_one_batch_keep_the_first() -> None:
    sent: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        n = int.from_bytes(request.content[:8], "little")
        sent.append(json.loads(json.loads(request.content[8 : 8 + n])["__metadata__"]["id"]))
        return httpx.Response(
            200, json={"accepted": len(sent[-1]), "duplicates": 0, "size": 1, "first_seq": 1, "last_seq": 1}
        )

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    for value in (0.1, 0.2, 0.3):
        mem.record(np.zeros(3), soft_bind=value, cone_vol=1.0, lambda_bind=0.0, id="ep-42")
    mem.flush(timeout=10)
    assert all(len(ids) == len(set(ids)) for ids in sent)
    mem.close()


@pytest.mark.e2e
def test_a_close_that_times_out_keeps_the_client_usable(tmp_path) -> None:
    srv = Server(tmp_path / "data")
    mem = ZMemClient(srv.url, timeout=1)
    mem.record(np.zeros(3), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
    with pytest.raises(FlushTimeout):
        mem.close(timeout=0.5)
    srv.start()
    try:
        mem.close(timeout=30)
        assert httpx.get(srv.url + "/stats").json()["size"] == 1
    finally:
        srv.stop()
