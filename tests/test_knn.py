"""Exact kNN (SPEC §1: "Search is exact"): the FAISS CPU index against numpy brute force.

Results are compared the way FAISS's own tests do
(`faiss.contrib.evaluation.check_ref_knn_with_draws`): distances equal to rtol 1e-5,
indices equal except inside groups of tied distances, whose members may come in any
order. Where distances are exact (integer data, duplicated rows) ties must be broken
by the lower seq, so there the indices must equal the reference exactly. Most tests
give row i the seq i; the wrapped-ring tests give seqs in ring order after a wrap.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import faiss
import numpy as np
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws
from fastapi.testclient import TestClient

from zmem_service import index as zindex
from zmem_service.index import SMALL_QUERY_ROWS, FaissCpuIndex

from . import knn_oracle
from .knn_oracle import GRID

RTOL = 1e-5


def brute_force(
    xb: np.ndarray, xq: np.ndarray, k: int, seq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 squared distances to every row, k nearest, ties by the lower seq (default: row)."""
    return knn_oracle.brute_force(xb, np.arange(len(xb)) if seq is None else seq, xq, k)


def search(
    xb: np.ndarray, xq: np.ndarray, k: int, seq: np.ndarray | None = None, threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A FAISS CPU index holding xb in slots 0..N-1 (seq = slot unless given), searched once."""
    index = FaissCpuIndex(xb.shape[1], threads or os.cpu_count() or 1)
    index.reserve(len(xb))
    index.write(np.arange(len(xb)), xb, np.arange(len(xb)) if seq is None else seq)
    return index.search(xq, k, len(xb))


def check_knn(xb: np.ndarray, xq: np.ndarray, k: int, *, exact_ties: bool = False) -> None:
    d2, idx = search(xb, xq, k)
    assert d2.shape == idx.shape == (len(xq), k)
    assert d2.dtype == np.float32 and idx.dtype == np.int64
    assert (np.diff(d2, axis=1) >= 0).all(), "not sorted nearest first"
    ref_d2, ref_idx = brute_force(xb, xq, k)
    check_ref_knn_with_draws(ref_d2, ref_idx, d2, idx, rtol=RTOL)
    # the distances are those of the returned rows (not just of some rows)
    np.testing.assert_allclose(knn_oracle.pair_d2(xb, xq, idx), d2, rtol=RTOL)
    if exact_ties:
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))


@pytest.fixture(autouse=True)
def restore_omp_threads() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize(("n", "d", "k", "b"), GRID, ids=[f"N{n}-d{d}-k{k}-B{b}" for n, d, k, b in GRID])
def test_matches_brute_force_on_random_data(n: int, d: int, k: int, b: int) -> None:
    rng = np.random.default_rng(n * 1_000_003 + d * 1009 + k * 31 + b)
    xb = rng.normal(size=(n, d)).astype(np.float32)
    xq = rng.normal(size=(b, d)).astype(np.float32)
    # continuous random data has no exact ties: beyond the tie-aware check, the order is the brute-force order
    check_knn(xb, xq, min(k, n), exact_ties=True)


@pytest.mark.parametrize("b", [1, 5, 40, 256])
@pytest.mark.parametrize("k", [1, 10, 64, 1024])
def test_integer_data_ties_go_to_the_lower_row(k: int, b: int) -> None:
    """Values in {-3..3}³: 343 distinct points over 20,000 rows, so every distance is tied many times."""
    rng = np.random.default_rng(k * 7 + b)
    xb = rng.integers(-3, 4, size=(20000, 3)).astype(np.float32)
    xq = rng.integers(-4, 5, size=(b, 3)).astype(np.float32)
    check_knn(xb, xq, k, exact_ties=True)


@pytest.mark.parametrize("b", [1, 17, 40])
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_identical_rows_give_the_first_k_rows(k: int, b: int) -> None:
    """Every row the same: all 20,000 are tied, and the answer is rows 0..k-1 in order."""
    xb = np.tile(np.array([[1.0, -2.0, 3.0, 0.5]], np.float32), (20000, 1))
    xq = np.random.default_rng(b).integers(-3, 4, size=(b, 4)).astype(np.float32)
    d2, idx = search(xb, xq, k)
    np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(k), (b, k)))
    np.testing.assert_array_equal(d2, knn_oracle.pair_d2(xb, xq, idx).astype(np.float32))


@pytest.mark.parametrize("b", [1, 40])
def test_duplicated_rows(b: int) -> None:
    """50 distinct integer rows each repeated ~400 times in random order; queries on and near them."""
    rng = np.random.default_rng(b)
    base = rng.integers(-4, 5, size=(50, 8)).astype(np.float32)
    xb = base[rng.integers(0, 50, size=20000)]
    xq = base[rng.integers(0, 50, size=b)] + rng.integers(-1, 2, size=(b, 8)).astype(np.float32)
    for k in (1, 10, 64, 1024):
        check_knn(xb, xq, k, exact_ties=True)


@pytest.mark.parametrize("b", [1, 40])
def test_points_on_a_sphere_around_the_query(b: int) -> None:
    """20,000 points at distance 3 from the query, up to float32 rounding: one big near-tie group."""
    rng = np.random.default_rng(b)
    d = 32
    centre = rng.normal(size=d) * 10
    u = rng.normal(size=(20000, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    xb = (centre + 3 * u).astype(np.float32)
    xq = np.repeat(centre[None].astype(np.float32), b, axis=0)
    for k in (1, 64, 1024):
        check_knn(xb, xq, k)
    # A couple of exact duplicates of one sphere point, with the query moved onto that point.
    xb2 = np.concatenate([xb, xb[[123, 123, 4567]]])
    xq2 = np.repeat(xb[123:124], b, axis=0)
    d2, idx = search(xb2, xq2, 3)
    np.testing.assert_array_equal(idx, np.broadcast_to([123, 20000, 20001], (b, 3)))
    assert (d2 == 0).all()


@pytest.mark.parametrize("b", [1, 3, SMALL_QUERY_ROWS, SMALL_QUERY_ROWS + 1, 40])
def test_large_common_offset(b: int) -> None:
    """z's far from the origin (1000 + 0.01·noise): ‖x‖² + ‖y‖² − 2⟨x, y⟩ in float32 cancels
    catastrophically, which FAISS's multi-threaded small-batch path uses; the answer must still
    be exact whatever the thread count."""
    rng = np.random.default_rng(b)
    xb = (1000 + 0.01 * rng.normal(size=(20000, 32))).astype(np.float32)
    xq = (1000 + 0.01 * rng.normal(size=(b, 32))).astype(np.float32)
    ref_d2, ref_idx = brute_force(xb, xq, 10)
    for threads in (1, 2, 4, 16):
        d2, idx = search(xb, xq, 10, threads=threads)
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"threads={threads}")
        np.testing.assert_allclose(d2, ref_d2, rtol=RTOL)


def test_single_query_does_not_depend_on_the_thread_setting() -> None:
    rng = np.random.default_rng(5)
    xb = rng.normal(size=(20000, 32)).astype(np.float32)
    xq = rng.normal(size=(1, 32)).astype(np.float32)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    a = search(xb, xq, 64)
    faiss.omp_set_num_threads(1)
    b = search(xb, xq, 64)
    c = search(xb, xq, 64, threads=1)
    for other in (b, c):
        np.testing.assert_array_equal(a[0], other[0])
        np.testing.assert_array_equal(a[1], other[1])
    check_ref_knn_with_draws(*brute_force(xb, xq, 64), *a, rtol=RTOL)


def test_numpy_reference_agrees() -> None:
    """The index module's own brute force (the fallback) gives the same answer, ties included."""
    rng = np.random.default_rng(9)
    xb = rng.integers(-2, 3, size=(3000, 4)).astype(np.float32)
    xq = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)
    seq = np.arange(len(xb))
    for k in (1, 10, 100):
        a, b = search(xb, xq, k), zindex.brute_force(xb, seq, xq, k)
        np.testing.assert_array_equal(a[0], b[0].astype(np.float32))
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("b", [1, 40])
@pytest.mark.parametrize("k", [1, 10, 64, 1024])
def test_ties_go_to_the_lower_seq_after_a_wrap(k: int, b: int) -> None:
    """A wrapped ring: slot i holds seq (i - head) mod N + 1, so the lowest seq isn't slot 0.
    Integer data ties everywhere; the answer must follow seq, never slot."""
    rng = np.random.default_rng(k + b)
    n, head = 20000, 12345
    seq = (np.arange(n) - head) % n + 1
    xb = rng.integers(-3, 4, size=(n, 3)).astype(np.float32)
    xq = rng.integers(-4, 5, size=(b, 3)).astype(np.float32)
    d2, idx = search(xb, xq, k, seq=seq)
    ref_d2, ref_idx = brute_force(xb, xq, k, seq=seq)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))


def test_identical_rows_after_a_wrap_give_the_oldest_seqs() -> None:
    n, head = 5000, 3000
    seq = (np.arange(n) - head) % n + 1
    xb = np.ones((n, 8), np.float32)
    d2, idx = search(xb, np.zeros((3, 8), np.float32), 64, seq=seq)
    assert (d2 == 8).all()
    np.testing.assert_array_equal(seq[idx], np.broadcast_to(np.arange(1, 65), (3, 64)))


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
