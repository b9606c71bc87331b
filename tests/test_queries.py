"""Recorded queries: the `QueryLog` ring (against a deque) and `POST …/queries`."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import safetensors.numpy
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from zmem_service.http.auth import Tokens
from zmem_service.querylog import QueryLog


@given(
    capacity=st.integers(0, 40),
    batches=st.lists(st.integers(0, 60), max_size=8),
)
def test_the_log_keeps_the_last_capacity_rows_like_a_deque(capacity: int, batches: list[int]) -> None:
    log = QueryLog(capacity)
    oracle: collections.deque[tuple[float, float, float, float]] = collections.deque(maxlen=capacity)
    counter = 0
    for t, n in enumerate(batches):
        risk = np.arange(counter, counter + n, dtype=np.float64)
        counter += n
        log.extend(risk, risk * 2, risk * 3, ts=float(t))
        oracle.extend((r, 2 * r, 3 * r, float(t)) for r in risk)
        snap = log.snapshot()
        assert len(log) == len(oracle)
        for i, name in enumerate(("risk", "wsum", "n_eff", "ts")):
            assert snap[name].tolist() == [row[i] for row in oracle]
    assert log.nbytes <= log.bound_bytes == 5 * 8 * capacity  # four columns and the workers' codes


@given(
    capacity=st.integers(0, 40),
    steps=st.lists(
        st.tuples(st.sampled_from(["pend", "extend"]), st.integers(0, 5), st.sampled_from([1, 3, 8])),
        max_size=30,
    ),
)
def test_pended_queries_read_as_if_computed_at_once_in_order(
    capacity: int, steps: list[tuple[str, int, int]]
) -> None:
    """Rows kept by `pend` (numbers computed later, in batches) read exactly as rows whose
    numbers were computed at once by `kernel_stats`, in the order they came, mixed with
    `extend` rows and across settles."""
    import zmem_service.querylog as querylog
    from zmem_core.kernel import kernel_stats

    rng = np.random.default_rng(capacity)
    log = QueryLog(capacity)
    oracle: collections.deque[tuple[float, float, float, float]] = collections.deque(maxlen=capacity)
    for t, (how, b, k) in enumerate(steps):
        d2 = (rng.random((b, k)) * 3).astype(np.float32)
        target = rng.standard_normal((b, k)).astype(np.float32)
        sigma = float(rng.choice([0.3, 1.0, 2.5]))
        risk, wsum, n_eff = kernel_stats(d2, target, sigma)
        if how == "pend":
            log.pend(d2, target, sigma, ts=float(t))
        else:
            log.extend(risk, wsum, n_eff, ts=float(t))
        oracle.extend(zip(risk, wsum, n_eff, [float(t)] * b, strict=True))
        assert len(log) == len(oracle)
        if t % 7 == 6:
            snap = log.snapshot()
            for i, name in enumerate(querylog.COLUMNS):
                assert snap[name].tolist() == [row[i] for row in oracle], name
    snap = log.snapshot()
    for i, name in enumerate(querylog.COLUMNS):
        assert snap[name].tolist() == [row[i] for row in oracle], name


def test_pended_queries_settle_by_themselves_past_a_bound() -> None:
    import zmem_service.querylog as querylog

    log = QueryLog(100_000)
    k = 64
    for _ in range(querylog.PENDING_ELEMENTS // k):
        log.pend(np.ones((1, k), np.float32), np.ones((1, k), np.float32), 1.0, ts=0.0)
    assert log._pending == [] and log._size == querylog.PENDING_ELEMENTS // k


def test_the_log_grows_on_demand_and_snapshots_are_copies() -> None:
    log = QueryLog(100_000)
    assert log.nbytes == 0
    log.extend([1.0], [0.5], [2.0], ts=3.0)
    assert 0 < log.nbytes < log.bound_bytes
    snap = log.snapshot()
    snap["risk"][0] = 9.0
    assert log.snapshot()["risk"].tolist() == [1.0]
    with pytest.raises(ValueError, match="same length"):
        log.extend([1.0, 2.0], [1.0], [1.0], ts=0.0)
    with pytest.raises(ValueError, match="capacity"):
        QueryLog(-1)


def rows(n: int, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {
        "risk": rng.uniform(size=n).tolist(),
        "wsum": rng.uniform(size=n).tolist(),
        "n_eff": rng.uniform(1, 64, size=n).tolist(),
    }


def test_posted_queries_are_kept_in_order_at_root_and_by_name(client: TestClient) -> None:
    body = rows(5)
    r = client.post("/queries", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"recorded": 5, "recorded_queries": 5}
    memory = client.app.state.zmem.memory("default")  # type: ignore[attr-defined]
    kept = memory.recorded_queries()
    assert kept["risk"].tolist() == body["risk"]
    assert kept["n_eff"].tolist() == body["n_eff"]
    assert (
        client.post(
            "/episodes", json={"episodes": [{"z": [0.0], "soft_bind": 1, "cone_vol": 1, "lambda_bind": 0}]}
        ).status_code
        == 200
    )
    client.post(
        "/memories/m/episodes",
        json={"episodes": [{"z": [0.0], "soft_bind": 1, "cone_vol": 1, "lambda_bind": 0}]},
    )
    assert client.post("/memories/m/queries", json=rows(3)).json()["recorded_queries"] == 3


def test_posted_queries_keep_the_worker_that_asked_them(client: TestClient) -> None:
    rows = {"risk": [0.1, 0.2], "wsum": [1.0, 1.0], "n_eff": [2.0, 2.0]}
    assert client.post("/queries", json={**rows, "worker": "w7"}).status_code == 200
    assert client.post("/queries", json=rows).status_code == 200
    body = safetensors.numpy.save({k: np.array(v) for k, v in rows.items()}, metadata={"worker": '"w8"'})
    r = client.post("/queries", content=body, headers={"content-type": "application/x-safetensors"})
    assert r.status_code == 200, r.text
    kept = client.app.state.zmem.memory("default").recorded_queries()  # type: ignore[attr-defined]
    assert kept["worker"].tolist() == ["w7", "w7", None, None, "w8", "w8"]


def test_safetensors_f32_and_f64_are_accepted(client: TestClient) -> None:
    tensors = {
        "risk": np.array([0.1, 0.2], np.float64),
        "wsum": np.array([0.0, 1.0], np.float32),  # Σw may underflow to 0: n_eff is 0 then
        "n_eff": np.array([0.0, 3.0], np.float64),
    }
    r = client.post(
        "/queries",
        content=safetensors.numpy.save(tensors),
        headers={"content-type": "application/x-safetensors"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["recorded"] == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"risk": [1.0], "wsum": [1.0]}, "n_eff"),
        ({"risk": [1.0, 2.0], "wsum": [1.0], "n_eff": [1.0]}, "wsum"),
        ({"risk": [1.0], "wsum": [-1.0], "n_eff": [1.0]}, "wsum"),
        ({"risk": [1.0], "wsum": [1.0], "n_eff": [-0.5]}, "n_eff"),
        ({"risk": ["a"], "wsum": [1.0], "n_eff": [1.0]}, "risk"),
        ({"risk": [True], "wsum": [1.0], "n_eff": [1.0]}, "risk"),
        ({"risk": [1e400], "wsum": [1.0], "n_eff": [1.0]}, "risk"),
        ({"risk": [1.0], "wsum": [1.0], "n_eff": [1.0], "z": [1.0]}, "z"),
        ({"risk": [10**400], "wsum": [1.0], "n_eff": [1.0]}, "risk"),  # an integer beyond float64
        ({"risk": [1.0], "wsum": [1e308], "n_eff": [1.0]}, "wsum"),  # beyond float32's range
        ({"risk": [-1e39], "wsum": [1.0], "n_eff": [1.0]}, "risk"),
        ({"risk": [1.0], "wsum": [1.0], "n_eff": [1.0], "worker": 7}, "worker"),
        ({"risk": [1.0], "wsum": [1.0], "n_eff": [1.0], "worker": "w" * 65}, "worker"),
    ],
)
def test_bad_bodies_are_422_naming_the_field_and_change_nothing(
    client: TestClient, body: dict[str, list[object]], field: str
) -> None:
    import json

    r = client.post("/queries", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["loc"][0] == field
    assert len(client.app.state.zmem.memory("default").queries) == 0  # type: ignore[attr-defined]


def test_limits_unparseable_bodies_and_unknown_memories(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(capacity=1000, min_size=10, max_batch=4)
    assert client.post("/queries", json=rows(5)).status_code == 422
    assert (
        client.post("/queries", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    )
    bad = client.post("/queries", content=b"xx", headers={"content-type": "application/x-safetensors"})
    assert bad.status_code == 400
    i32 = safetensors.numpy.save({f: np.zeros(2, np.int32) for f in ("risk", "wsum", "n_eff")})
    r = client.post("/queries", content=i32, headers={"content-type": "application/x-safetensors"})
    assert r.status_code == 422
    r = client.post("/memories/nobody/queries", json=rows(2))
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"


def test_a_body_too_long_for_max_batch_rows_is_413_before_it_is_parsed(make_client) -> None:  # type: ignore[no-untyped-def]
    import json

    client = make_client(capacity=1000, min_size=10, max_batch=100)
    big = json.dumps({f: [0.123456789] * 100_000 for f in ("risk", "wsum", "n_eff")})
    r = client.post("/queries", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert client.post("/queries", json=rows(100)).status_code == 200  # the longest legitimate body


def test_a_read_token_may_post_queries(make_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = make_client(capacity=1000, min_size=10, token="w" * 20, read_token="r" * 20)
    assert isinstance(client.app.state.tokens, Tokens)
    read = {"authorization": "Bearer " + "r" * 20}
    assert client.post("/queries", json=rows(2), headers=read).status_code == 200
    assert client.post("/queries", json=rows(2)).status_code == 401
