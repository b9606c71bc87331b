"""The service's FAISS CPU index (`zmem_service.index.FaissCpuIndex`) and `/neighbors` against
numpy brute force (SPEC §1: "Search is exact").

The kNN itself (every path, the hard kinds of data, the certificate) is tested in
`tests/core/test_knn.py`; here, the index as a memory drives it: slots reserved beyond those
filled, a ring that wrapped (seqs not in slot order), overwrites, `clear`, FAISS threads.
Through the API, results are compared the way FAISS's own tests do
(`faiss.contrib.evaluation.check_ref_knn_with_draws`), and exactly where there are no ties.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import faiss
import numpy as np
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws
from fastapi.testclient import TestClient

from zmem_service.index import FaissCpuIndex

from . import knn_oracle

RTOL = 1e-5


def brute_force(
    xb: np.ndarray, xq: np.ndarray, k: int, seq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 squared distances to every row, k nearest, ties by the lower seq (default: row)."""
    return knn_oracle.brute_force(xb, np.arange(len(xb)) if seq is None else seq, xq, k)


@pytest.fixture(autouse=True)
def restore_omp_threads() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("k", [1, 64, 1024])
def test_a_wrapped_ring_in_a_larger_reservation(k: int) -> None:
    """20,000 slots reserved, 12,000 filled, written twice round a ring of 12,000 (so seqs are
    not in slot order and the first rows were overwritten, once far from the others); integer
    data ties everywhere: the answer follows seq, never slot, and never reads unfilled slots."""
    rng = np.random.default_rng(k)
    n, d = 12_000, 3
    index = FaissCpuIndex(d, 2)
    index.reserve(20_000)
    index.write(np.arange(n), np.full((n, d), 1e6, np.float32), np.arange(n))  # overwritten below
    head = 4321
    slots = (head + np.arange(n)) % n
    z = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    index.write(slots, z, n + np.arange(n))
    xb, seq = np.empty_like(z), np.empty(n, np.int64)
    xb[slots], seq[slots] = z, n + np.arange(n)
    xq = rng.integers(-4, 5, size=(40, d)).astype(np.float32)
    d2, idx = index.search(xq, k, n)
    ref_d2, ref_idx = brute_force(xb, xq, k, seq=seq)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))
    index.clear()
    assert index.nbytes == 0


@pytest.mark.parametrize("b", [1, 3, 17, 40])
def test_far_from_origin_whatever_the_thread_setting(b: int) -> None:
    """z's far from the origin, where float32 distances cancel; the answer must be exact
    whatever the index's thread count (FAISS splits small batches over threads)."""
    rng = np.random.default_rng(b)
    xb = (1000 + 0.01 * rng.normal(size=(20000, 32))).astype(np.float32)
    xq = (1000 + 0.01 * rng.normal(size=(b, 32))).astype(np.float32)
    ref_d2, ref_idx = brute_force(xb, xq, 10)
    for threads in (1, 2, 4, 16):
        index = FaissCpuIndex(32, threads)
        index.reserve(len(xb))
        index.write(np.arange(len(xb)), xb, np.arange(len(xb)))
        d2, idx = index.search(xq, 10, len(xb))
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"threads={threads}")
        np.testing.assert_allclose(d2, ref_d2, rtol=RTOL)


@pytest.mark.parametrize("offset", [30.0, 1e4])
def test_data_far_from_the_origin_are_certified_without_a_full_scan(
    offset: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows stored minus an exact centre: the float32 candidate search's error scales with
    the spread, not the offset, so single queries certify (no float64 full scan) and the
    distances equal the raw rows' bit for bit."""
    from zmem_core import knn

    scans = []
    real = knn.brute_force
    monkeypatch.setattr(knn, "brute_force", lambda *a, **kw: scans.append(1) or real(*a, **kw))
    rng = np.random.default_rng(7)
    xb = (offset + rng.normal(size=(20_000, 32))).astype(np.float32)
    xq = (offset + 0.3 * rng.normal(size=(20, 32))).astype(np.float32)
    index = FaissCpuIndex(32, 1)
    index.reserve(len(xb))
    index.write(np.arange(len(xb)), xb, np.arange(len(xb)))
    for i in range(len(xq)):
        d2, idx = index.search(xq[i : i + 1], 64, len(xb))
        ref_d2, ref_idx = brute_force(xb, xq[i : i + 1], 64)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))
    assert not scans


def test_rows_the_centre_cannot_subtract_exactly_recentre_the_index() -> None:
    """Data far out, then rows near the origin (z − c inexact there), overwriting part of a
    ring: every answer stays exact, ties by seq, against the raw rows."""
    rng = np.random.default_rng(8)
    n, d = 3000, 8
    index = FaissCpuIndex(d, 1)
    index.reserve(n)
    xb = (500 + rng.integers(-3, 4, size=(n, d))).astype(np.float32)
    seq = np.arange(n, dtype=np.int64)
    index.write(np.arange(n), xb, seq)
    for step, z_new in enumerate(
        [1e-3 * rng.normal(size=(700, d)), 7 + rng.normal(size=(500, d)), 500 + rng.normal(size=(900, d))]
    ):
        slots = (step * 700 + np.arange(len(z_new))) % n
        z_new = z_new.astype(np.float32)
        new_seq = seq.max() + 1 + np.arange(len(z_new))
        index.write(slots, z_new, new_seq)
        xb[slots], seq[slots] = z_new, new_seq
        xq = np.concatenate([xb[rng.choice(n, 5)] + 0.5, rng.normal(size=(3, d)) * 200]).astype(np.float32)
        for k in (1, 64):
            d2, idx = index.search(xq, k, n)
            ref_d2, ref_idx = brute_force(xb, xq, k, seq=seq)
            np.testing.assert_array_equal(idx, ref_idx, err_msg=f"step {step}, k={k}")
            np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))


def test_the_rows_norms_follow_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index keeps its rows transposed over their squared norms for the small batches'
    product: after writes, overwrites and a recentre they are the stored rows' own (a stale
    row or norm would make the certificate trust wrong candidates), and a batch of 4 normal
    queries is answered exactly without a full scan."""
    from zmem_core import knn

    scans = []
    real = knn.brute_force
    monkeypatch.setattr(knn, "brute_force", lambda *a, **kw: scans.append(1) or real(*a, **kw))
    rng = np.random.default_rng(11)
    n, d = 6000, 16
    index = FaissCpuIndex(d, 1)
    index.reserve(n)
    xb = (40 + rng.normal(size=(n, d))).astype(np.float32)
    seq = np.arange(n, dtype=np.int64)
    index.write(np.arange(n), xb, seq)
    center = index._center
    for step, z_new in enumerate([rng.normal(size=(1000, d)) * 1e-3, rng.normal(size=(n, d))]):
        slots = (step * 1000 + np.arange(len(z_new))) % n
        z_new = z_new.astype(np.float32)
        new_seq = seq.max() + 1 + np.arange(len(z_new))
        index.write(slots, z_new, new_seq)
        xb[slots], seq[slots] = z_new, new_seq
        stored = index._z[:n]
        np.testing.assert_array_equal(index._zt[:d, :n], stored.T)  # the product's transposed copy
        np.testing.assert_array_equal(
            index._zt[d, :n], np.einsum("nd,nd->n", stored, stored, dtype=np.float64).astype(np.float32)
        )
    assert not np.array_equal(index._center, center)  # the rows near the origin recentred it
    scans.clear()
    xq = rng.normal(size=(4, d)).astype(np.float32)
    d2, idx = index.search(xq, 64, n)
    ref_d2, ref_idx = brute_force(xb, xq, 64, seq=seq)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))
    assert not scans


# -- through the HTTP API --------------------------------------------------------------------------


def post_random(client: TestClient, name: str, n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d)).astype(np.float32)
    for start in range(0, n, 500):
        eps = [
            {"z": row.tolist(), "soft_bind": 0.5, "cone_vol": 0.1, "lambda_bind": 0.0}
            for row in z[start : start + 500]
        ]
        r = client.post(f"/memories/{name}/episodes", json={"episodes": eps})
        assert r.status_code == 200, r.text


def exported(client: TestClient, name: str) -> tuple[np.ndarray, np.ndarray]:
    r = client.get(f"/memories/{name}/export")
    assert r.status_code == 200
    with np.load(io.BytesIO(r.content), allow_pickle=False) as f:
        return f["z"], f["seq"]


@pytest.mark.parametrize(
    ("stored", "k"), [(300, 500), (300, 1024), (1300, 64)], ids=["k>size", "k=max", "wrapped"]
)
def test_neighbors_endpoint_matches_brute_force_over_export(client: TestClient, stored: int, k: int) -> None:
    """`/neighbors` (capacity 1000): k = min(k, size); seqs and d2s equal brute force over `/export`.

    1300 writes wrap the ring, so slot order is no longer arrival order.
    """
    d = 8
    post_random(client, "knn", stored, d, seed=stored)
    z, seq = exported(client, "knn")
    assert len(z) == min(stored, 1000)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(5, d)).astype(np.float32)
    queries[1] = z[17]  # a stored point: distance 0 first
    r = client.post("/memories/knn/neighbors", json={"z": queries.tolist(), "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    kk = min(k, len(z))
    assert body["k"] == kk and body["size"] == len(z) and body["active"]
    got_seq, got_d2 = np.array(body["seq"]), np.array(body["d2"])
    got_z = np.array(body["z"], np.float32)
    assert got_seq.shape == got_d2.shape == (5, kk) and got_z.shape == (5, kk, d)
    ref_d2, ref_idx = brute_force(z, queries, kk)
    np.testing.assert_allclose(got_d2, ref_d2, rtol=RTOL, atol=1e-12)
    check_ref_knn_with_draws(ref_d2, seq[ref_idx], got_d2, got_seq, rtol=RTOL)
    np.testing.assert_array_equal(got_seq, seq[ref_idx])  # random data: no ties
    assert got_seq[1, 0] == seq[17] and got_d2[1, 0] == 0
    # the z's returned are the stored z's of those seqs
    by_seq = dict(zip(seq.tolist(), z, strict=True))
    np.testing.assert_array_equal(got_z, np.array([[by_seq[s] for s in row] for row in got_seq.tolist()]))
    if kk == len(z):  # everything returned: each row holds every stored seq once
        assert all(sorted(row) == sorted(seq.tolist()) for row in got_seq.tolist())


def test_neighbors_endpoint_one_dimensional_query(client: TestClient) -> None:
    post_random(client, "knn", 200, 3, seed=1)
    z, seq = exported(client, "knn")
    q = np.array([0.1, -0.2, 0.3], np.float32)
    r = client.post("/memories/knn/neighbors", json={"z": q.tolist(), "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    ref_d2, ref_idx = brute_force(z, q[None], 10)
    np.testing.assert_array_equal(np.array(body["seq"]), seq[ref_idx[0]])
    np.testing.assert_allclose(np.array(body["d2"]), ref_d2[0], rtol=RTOL)
