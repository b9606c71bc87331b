"""The changes feed (`GET …/changes`): what a replica follows to mirror a memory exactly."""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
import safetensors.numpy

from .server import Server

ST = "application/x-safetensors"


def eps(n: int, start: int = 0, d: int = 3) -> list[dict]:
    return [
        {"z": [float(start + i), 0.5, -1.0][:d], "soft_bind": 0.25, "cone_vol": 1.0, "lambda_bind": 0.0}
        for i in range(n)
    ]


def test_pages_resets_and_generations(make_client) -> None:
    client = make_client(capacity=20, min_size=5, sigma="auto")
    empty = client.get("/changes").json()
    assert empty["z"] == [] and empty["seq"] == [] and empty["reset"] is False and empty["complete"] is True
    assert empty["oldest_seq"] is None and empty["size"] == 0 and len(empty["generation"]) == 32
    assert client.get("/memories/nope/changes").status_code == 404

    assert client.post("/memories/m/episodes", json={"episodes": eps(30)}).status_code == 200
    page = client.get("/memories/m/changes").json()
    gen = page["generation"]
    # rows 1..10 were evicted: a follower at 0 must reset and starts at the oldest row
    assert page["reset"] is True and page["seq"] == list(range(11, 31)) and page["oldest_seq"] == 11
    assert page["next_seq"] == 31 and page["last_seq"] == 30 and page["size"] == 20 and page["complete"]
    assert page["settings"]["capacity"] == 20 and page["settings"]["z_dim"] == 3
    assert np.array(page["z"]).shape == (20, 3) and page["risk_target"][0] == pytest.approx(0.75)

    page = client.get("/memories/m/changes", params={"after": 25, "generation": gen}).json()
    assert page["reset"] is False and page["seq"] == [26, 27, 28, 29, 30]
    page = client.get("/memories/m/changes", params={"after": 10, "generation": gen, "limit": 3}).json()
    assert page["seq"] == [11, 12, 13] and page["complete"] is False
    page = client.get("/memories/m/changes", params={"after": 30, "generation": gen}).json()
    assert page["seq"] == [] and page["reset"] is False and page["complete"] is True
    page = client.get("/memories/m/changes", params={"after": 25, "generation": "other"}).json()
    assert page["reset"] is True and page["seq"][0] == 11

    # Re-created or imported: a new incarnation, a new generation.
    export = client.get("/memories/m/export").content
    assert client.delete("/memories/m").status_code == 204
    assert client.get("/memories/m/changes").status_code == 404
    assert client.post("/memories/m/episodes", json={"episodes": eps(2)}).status_code == 200
    again = client.get("/memories/m/changes", params={"after": 30, "generation": gen}).json()
    # seqs go on from the deleted incarnation's: never reused under a name
    assert again["generation"] != gen and again["reset"] is True and again["seq"] == [31, 32]
    assert client.post("/memories/imp/import", content=export).status_code == 200
    imported = client.get("/memories/imp/changes").json()
    assert imported["generation"] not in (gen, again["generation"]) and imported["seq"] == list(range(11, 31))


def test_safetensors_pages_carry_int64_seqs(make_client) -> None:
    client = make_client(capacity=100, min_size=1)
    client.post("/episodes", json={"episodes": eps(7)})
    r = client.get("/changes", params={"after": 2}, headers={"accept": ST})
    assert r.headers["content-type"] == ST
    arrays = safetensors.numpy.load(r.content)
    assert arrays["seq"].dtype == np.int64 and arrays["seq"].tolist() == [3, 4, 5, 6, 7]
    assert arrays["z"].dtype == np.float32 and arrays["z"].shape == (5, 3)
    assert arrays["risk_target"].shape == (5,)


@pytest.mark.parametrize("params", [{"after": -1}, {"limit": 0}, {"wait": 31}, {"generation": "g" * 65}])
def test_bad_parameters_are_422(make_client, params) -> None:
    r = make_client().get("/changes", params=params)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


@pytest.mark.e2e
def test_a_long_poll_answers_when_rows_arrive_and_at_shutdown(tmp_path) -> None:
    srv = Server(tmp_path / "data", "--capacity", "1000", "--min-size", "1").start()
    try:
        httpx.post(srv.url + "/episodes", json={"episodes": eps(3)}).raise_for_status()
        first = httpx.get(srv.url + "/changes").json()
        t0 = time.monotonic()
        idle = httpx.get(srv.url + "/changes", params={"after": 3, "wait": 0.3}, timeout=10).json()
        assert idle["seq"] == [] and time.monotonic() - t0 >= 0.3

        answers: list[dict] = []

        def follow(after: int = 3) -> None:
            params = {"after": after, "generation": first["generation"], "wait": 20}
            answers.append(httpx.get(srv.url + "/changes", params=params, timeout=30).json())

        t = threading.Thread(target=follow)
        t0 = time.monotonic()
        t.start()
        time.sleep(0.3)
        httpx.post(srv.url + "/episodes", json={"episodes": eps(2, 3)}).raise_for_status()
        t.join(25)
        assert answers and answers[0]["seq"] == [4, 5]
        assert time.monotonic() - t0 < 15  # woken by the write, not by the 20 s timeout

        # A poll that is waiting when the server stops answers at once.
        t = threading.Thread(target=follow, args=(5,))
        answers.clear()
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.stop()
        t.join(25)
        assert answers and answers[0]["seq"] == []  # answered, not cut off
        assert time.monotonic() - t0 < 5  # SIGTERM wakes it before uvicorn waits for open requests
    finally:
        srv.stop()


def test_export_and_changes_agree(make_client) -> None:
    client = make_client(capacity=50, min_size=1)
    for i in range(4):
        client.post("/episodes", json={"episodes": eps(17, 17 * i)})
    page = client.get("/changes").json()
    with np.load(io.BytesIO(client.get("/export").content), allow_pickle=False) as f:
        np.testing.assert_array_equal(np.array(page["seq"]), f["seq"])
        np.testing.assert_array_equal(np.array(page["z"], np.float32), f["z"])
        np.testing.assert_array_equal(np.array(page["risk_target"], np.float32), f["risk_target"])
