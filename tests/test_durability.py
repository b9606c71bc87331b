"""Durability: acknowledged episodes survive kill -9, retries store nothing twice, settings hold."""

from __future__ import annotations

import multiprocessing as mp

import httpx
import numpy as np
import pytest

from zmem_client import ZMemClient

from .conftest import episodes, load_npz
from .server import Server, wait_until

pytestmark = pytest.mark.e2e


def export(url: str, memory: str = "default") -> dict[str, np.ndarray]:
    path = "/export" if memory == "default" else f"/memories/{memory}/export"
    r = httpx.get(url + path, timeout=30)
    r.raise_for_status()
    return load_npz(r.content)


def batch(tag: str, start: int, n: int) -> list[dict]:
    return episodes(n, start=start, tag=f"{tag}-")


def writer(url: str, rank: int, acks: mp.Queue) -> None:
    """Post batches with ids until the server goes away; report every acknowledgement."""
    sent = 0
    with httpx.Client(base_url=url, timeout=5) as http:
        while True:
            eps = batch(f"w{rank}", sent, 1 + sent % 13)
            try:
                r = http.post("/episodes", json={"episodes": eps})
            except httpx.HTTPError:
                break
            if r.status_code != 200:
                break
            body = r.json()
            acks.put([(e["id"], body["first_seq"] + i) for i, e in enumerate(eps)])
            sent += len(eps)
    acks.put(None)


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_a_stop_mid_stream_loses_no_acknowledged_episode(tmp_path, stop: str) -> None:
    srv = Server(tmp_path / "data", "--capacity", "200000").start()
    ctx = mp.get_context("spawn")
    acks: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(srv.url, rank, acks)) for rank in range(4)]
    for p in procs:
        p.start()
    acknowledged: dict[str, int] = {}
    while len(acknowledged) < 3000:  # kill mid-stream: once all four are well under way
        item = acks.get(timeout=60)
        assert item is not None, "a writer stopped before the kill"
        acknowledged.update(item)
    if stop == "kill -9":
        srv.kill()
    else:  # graceful: in-flight requests finish, queued commits land, the store closes
        assert srv.stop(timeout=30) in (0, -15)
    done = 0
    while done < len(procs):
        item = acks.get(timeout=30)
        if item is None:
            done += 1
        else:
            acknowledged.update(item)
    for p in procs:
        p.join(10)
    assert len(acknowledged) > 100, "the writers barely wrote: the test proves nothing"

    srv.restart()
    try:
        data = export(srv.url)
        stored = dict(zip(data["id"].tolist(), data["seq"].tolist(), strict=True))
        assert len(stored) == len(data["id"]), "duplicate ids in the memory"
        missing = [i for i in acknowledged if i not in stored]
        assert not missing, f"{len(missing)} acknowledged episodes lost, e.g. {missing[:5]}"
        assert all(stored[i] == s for i, s in acknowledged.items())
        assert (np.diff(data["seq"]) > 0).all()
        print(f"{len(acknowledged)} acknowledged, {len(stored)} stored after {stop}")
    finally:
        srv.stop()


def test_a_retried_batch_is_stored_once(server) -> None:
    eps = batch("r", 0, 50)
    first = httpx.post(server.url + "/episodes", json={"episodes": eps}).json()
    again = httpx.post(server.url + "/episodes", json={"episodes": eps}).json()
    assert (first["accepted"], again["accepted"], again["duplicates"]) == (50, 0, 50)
    assert again["first_seq"] is None and again["size"] == 50


def test_client_loses_nothing_while_the_server_is_down(tmp_path) -> None:
    srv = Server(tmp_path / "data").start()
    mem = ZMemClient(srv.url, timeout=2)
    try:
        for i in range(200):
            mem.record(np.full(4, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
        mem.flush(timeout=30)
        srv.kill()
        for i in range(200, 500):
            mem.record(np.full(4, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
        # The sender has met the dead server (and keeps everything) before it comes back.
        retries = mem._sender.retries
        wait_until(lambda: mem._sender.retries > retries, 30, "a failed send to the dead server")
        assert mem.pending > 0
        srv.restart()
        mem.flush(timeout=60)
        data = export(srv.url)
        assert sorted(data["z"][:, 0].astype(int).tolist()) == list(range(500))
        assert len(set(data["id"].tolist())) == 500
        assert mem._sender.retries > 0
    finally:
        mem.close(timeout=5)
        srv.stop()


def test_settings_and_answers_survive_a_restart_with_other_flags(tmp_path) -> None:
    srv = Server(tmp_path / "data", "--min-size", "10").start()
    try:
        put = httpx.put(srv.url + "/memories/x", json={"z_dim": 4, "capacity": 300, "k": 5})
        assert put.status_code == 201
        rng = np.random.default_rng(0)
        for memory in ("default", "x"):
            prefix = "" if memory == "default" else "/memories/x"
            eps = [
                {
                    "z": rng.standard_normal(4).tolist(),
                    "soft_bind": float(rng.uniform()),
                    "cone_vol": 1.0,
                    "lambda_bind": 0.0,
                }
                for _ in range(400)
            ]
            assert httpx.post(srv.url + prefix + "/episodes", json={"episodes": eps}).status_code == 200
        query = {"z": rng.standard_normal((3, 4)).tolist(), "sigma": "auto"}
        before = {
            m: httpx.post(srv.url + p + "/neighbors", json=query).json()
            for m, p in (("default", ""), ("x", "/memories/x"))
        }
        settings = {
            m: httpx.get(srv.url + p + "/stats").json()["settings"]
            for m, p in (("default", ""), ("x", "/memories/x"))
        }
        # SIGTERM: uvicorn drains, the lifespan closes the store, then re-raises the signal.
        assert srv.stop(timeout=30) in (0, -15)

        srv.restart("--capacity", "1000", "--k", "7", "--sigma", "2.5", "--min-size", "3")
        for m, p in (("default", ""), ("x", "/memories/x")):
            assert httpx.get(srv.url + p + "/stats").json()["settings"] == settings[m]
            assert httpx.post(srv.url + p + "/neighbors", json=query).json() == before[m]
        assert "keeps its stored" in srv.log.read_text()
        assert before["x"]["k"] == 5 and len(before["x"]["seq"][0]) == 5
        conflict = httpx.put(srv.url + "/memories/x", json={"capacity": 301, "k": 5, "sigma": 2.0})
        assert conflict.status_code == 409
        fields = {c["field"]: (c["stored"], c["requested"]) for c in conflict.json()["conflicts"]}
        assert fields == {"capacity": (300, 301), "sigma": (1.0, 2.0)}
        same = httpx.put(srv.url + "/memories/x", json={"capacity": 300, "k": 5})
        assert same.status_code == 200
        new = httpx.put(srv.url + "/memories/y", json={"z_dim": 2})
        assert new.json()["settings"]["k"] == 7 and new.json()["settings"]["capacity"] == 1000
    finally:
        srv.stop()


def test_export_import_round_trip(server) -> None:
    rng = np.random.default_rng(1)
    eps = [
        {
            "z": rng.standard_normal(6).tolist(),
            "soft_bind": float(rng.uniform()),
            "cone_vol": float(rng.uniform()),
            "lambda_bind": 1.0,
            "E_T": 2.0,
            "Hr": 3.0,
            "worker": f"w{i % 2}",
            **({"id": f"i{i}"} if i % 3 else {}),
        }
        for i in range(700)
    ]
    httpx.post(server.url + "/memories/src/episodes", json={"episodes": eps}).raise_for_status()
    original = httpx.get(server.url + "/memories/src/export").content
    r = httpx.post(server.url + "/memories/dst/import", content=original)
    assert r.status_code == 200, r.text
    a, b = export(server.url, "src"), export(server.url, "dst")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    again = httpx.post(server.url + "/memories/dst/import", content=original)
    assert again.status_code == 409
    dup = httpx.post(server.url + "/memories/dst/episodes", json={"episodes": eps[1:2]}).json()
    assert dup["duplicates"] == 1  # ids came back with the import


def test_durability_none_keeps_nothing_on_disk(tmp_path) -> None:
    srv = Server(tmp_path / "data", "--durability", "none").start()
    try:
        httpx.post(srv.url + "/episodes", json={"episodes": batch("n", 0, 5)}).raise_for_status()
        srv.stop()
        assert not (tmp_path / "data").exists()
        srv.restart()
        assert httpx.get(srv.url + "/stats").json()["size"] == 0
    finally:
        srv.stop()
