"""The exact kNN contract (`zmem_core.knn`, `zmem_core.knn_torch`; SPEC §1 "Search is exact"):
every search path equals `tests/knn_oracle.py`'s float64 brute force, ties by the lower seq,
and so every path gives the same seqs.

The paths: the CPU search with numpy or FAISS candidates (the service's FAISS index), the
torch search on centred rows (the service's torch index) and on raw rows with FAISS
candidates (the client's replica on CPU), and the torch search on CUDA where a device is
present. Seqs are those of a wrapped ring (not monotonic in slot order), and the searched
rows are the filled part of a larger buffer whose other rows would be everyone's nearest.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmem_core import knn

from ..knn_oracle import GRID, brute_force, check_same_knn, pair_d2, ring_seqs

F32_MAX = float(np.finfo(np.float32).max)
HAS_FAISS = importlib.util.find_spec("faiss") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
NEEDS_FAISS = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")
NEEDS_TORCH = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


def _cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


Search = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def numpy_search(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return knn.exact_knn(xb, seq, xq, k, use_faiss=False)


def faiss_search(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    norm2 = float(np.einsum("nd,nd->n", xb, xb, dtype=np.float64).max())
    return knn.exact_knn(xb, seq, xq, k, base_sqnorm_max=norm2, threads=os.cpu_count() or 1, use_faiss=True)


def norms_search(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """With the rows' squared norms given: batches of GEMM_QUERY_ROWS to SMALL_QUERY_ROWS rows
    take one numpy product from the rows' own layout, larger ones FAISS's with those norms."""
    sqnorm = np.einsum("nd,nd->n", xb, xb, dtype=np.float64)
    return knn.exact_knn(
        xb,
        seq,
        xq,
        k,
        base_sqnorm_max=float(sqnorm.max()),
        base_sqnorm=sqnorm.astype(np.float32),
        threads=os.cpu_count() or 1,
        use_faiss=True,
    )


def transposed(xb: np.ndarray) -> np.ndarray:
    """xb [N, d] transposed over its rows' squared norms, [d + 1, N], as the service's index
    keeps it: the front of a buffer with room for more rows (a view whose rows are strided)."""
    n, d = xb.shape
    base_t = np.full((d + 1, n + 37), np.nan, np.float32)[:, :n]
    base_t[:d] = xb.T
    base_t[d] = np.einsum("nd,nd->n", xb, xb, dtype=np.float64)
    return base_t


def service_search(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """As the service's FAISS index asks: with the rows transposed over their norms, so batches
    of GEMM_QUERY_ROWS to SMALL_QUERY_ROWS rows take the product from that layout."""
    return knn.exact_knn(
        xb,
        seq,
        xq,
        k,
        base_sqnorm_max=float(np.einsum("nd,nd->n", xb, xb, dtype=np.float64).max()),
        base_t=transposed(xb),
        threads=os.cpu_count() or 1,
        use_faiss=True,
    )


def torch_search(device: str, *, centre: bool = True, faiss_candidates: bool = False) -> Search:
    def search(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from zmem_core.knn_torch import exact_center, exact_knn

        base = torch.from_numpy(xb).to(device)
        c = exact_center(base) if centre else None
        d2, idx = exact_knn(
            base if c is None else base - c,
            torch.from_numpy(seq).to(device),
            torch.from_numpy(xq).to(device),
            k,
            center=c,
            rescue=True,
            faiss_candidates=faiss_candidates,
        )
        assert d2.dtype == torch.float32 and idx.dtype == torch.int64
        return d2.cpu().numpy(), idx.cpu().numpy()

    return search


PATHS: dict[str, tuple[Search, bool]] = {  # name: (search, whether it can run here)
    "numpy": (numpy_search, True),
    "faiss": (faiss_search, HAS_FAISS),
    "norms": (norms_search, HAS_FAISS),
    "service": (service_search, HAS_FAISS),
    "torch": (torch_search("cpu"), HAS_TORCH),
    "torch-faiss": (torch_search("cpu", centre=False, faiss_candidates=True), HAS_TORCH),
    "torch-cuda": (torch_search("cuda"), _cuda()),
}
ALL_PATHS = [
    pytest.param(search, id=name, marks=pytest.mark.skipif(not runs, reason=f"{name} cannot run here"))
    for name, (search, runs) in PATHS.items()
]


@pytest.fixture(autouse=True)
def restore_omp_threads() -> Iterator[None]:
    if not HAS_FAISS:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def part_filled(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xb and seq as the filled front of buffers twice as long, whose other rows copy the queries
    with lower seqs: nearer than anything, so a search that reads past the filled rows fails."""
    n, extra = len(xb), max(len(xb), len(xq))
    z = np.empty((n + extra, xb.shape[1]), np.float32)
    s = np.empty(n + extra, np.int64)
    z[:n], s[:n] = xb, seq
    z[n:], s[n:] = xq[np.arange(extra) % len(xq)], seq.min() - 1 - np.arange(extra)
    return z[:n], s[:n]


def check(
    search: Search, xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int, *, exact: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The search's answer, checked equal to brute force: indices and float32 d2 exactly
    (exact=True), else up to the order inside groups of distances equal to 1e-5."""
    xb, seq = part_filled(xb, seq, xq)
    d2, idx = search(xb, seq, xq, k)
    assert d2.dtype == np.float32 and idx.dtype == np.int64
    assert d2.shape == idx.shape == (len(xq), k)
    assert (np.diff(d2, axis=1) >= 0).all(), "not sorted nearest first"
    ref_d2, ref_idx = brute_force(xb, seq, xq, k)
    check_same_knn(ref_d2, ref_idx, d2, idx, exact=exact)
    np.testing.assert_allclose(pair_d2(xb, xq, idx), d2, rtol=1e-6, atol=1e-45)  # d2 of the rows returned
    return d2, idx


# -- the hard kinds of data, each with several k, d and B ------------------------------------------


def normal(rng: np.random.Generator, n: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, d)), rng.normal(size=(b, d))


def integer_ties(rng: np.random.Generator, n: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Few distinct values: every distance is tied many times."""
    return rng.integers(-2, 3, size=(n, d)), rng.integers(-3, 4, size=(b, d))


def duplicated_200_fold(rng: np.random.Generator, n: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """n / 200 distinct rows, each stored 200 times in random order; queries on and near them."""
    distinct = rng.permutation(n // 200)[:, None] + rng.integers(-4, 5, size=(n // 200, d))
    xb = distinct[rng.permutation(np.arange(n) % len(distinct))]
    return xb, distinct[rng.integers(0, len(distinct), size=b)] + rng.integers(-1, 2, size=(b, d))


def far_from_origin(rng: np.random.Generator, n: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """1000 + 0.01·noise: ‖x‖² − 2⟨x, q⟩ + ‖q‖² in float32 cancels catastrophically."""
    return 1000 + 0.01 * rng.normal(size=(n, d)), 1000 + 0.01 * rng.normal(size=(b, d))


def tiny(rng: np.random.Generator, n: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates near 1e-23: squares near 1e-46 underflow float32, so every float32 distance is 0
    or subnormal; the float64 distances still order them."""
    return 1e-23 * rng.normal(size=(n, d)), 1e-23 * rng.normal(size=(b, d))


def near_the_norm_limit(rng: np.random.Generator, n: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared norms up to just under float32's max / 4, the service's limit on z."""
    x = rng.normal(size=(n + b, d))
    x *= np.sqrt(F32_MAX / 4) * (1 - 1e-6) / np.linalg.norm(x, axis=1).max()
    x[: n // 2] *= rng.uniform(0.5, 1, size=(n // 2, 1))  # not all on one sphere
    return x[:n], x[n:]


KINDS = {
    f.__name__: f
    for f in (normal, integer_ties, duplicated_200_fold, far_from_origin, tiny, near_the_norm_limit)
}
# (k, d, B): each kind meets every k in {1, 64, 1024}, every d in {1, 33} and every B in {1, 3, 256}.
SHAPES = [(1, 33, 3), (64, 1, 256), (1024, 33, 1), (64, 33, 256), (1024, 1, 3)]
CASES = [(kind, k, d, b) for kind in KINDS for k, d, b in SHAPES]


@pytest.mark.parametrize(
    ("kind", "k", "d", "b"), CASES, ids=[f"{c[0]}-k{c[1]}-d{c[2]}-B{c[3]}" for c in CASES]
)
def test_every_path_equals_brute_force(kind: str, k: int, d: int, b: int) -> None:
    """All paths on the same data: each equals brute force (indices and d2), so all give the
    same seqs; 5,000 rows in a wrapped ring, part of a larger buffer."""
    rng = np.random.default_rng(sum(map(ord, kind)) * 1009 + k * 31 + d * 7 + b)
    n = 5000
    xb, xq = (a.astype(np.float32) for a in KINDS[kind](rng, n, b, d))
    xq[0] = xb[17]  # a query on a stored row
    seq = ring_seqs(n, 3217)
    answers = {name: check(search, xb, seq, xq, k) for name, (search, runs) in PATHS.items() if runs}
    first = answers["numpy"]
    for name, (d2, idx) in answers.items():
        np.testing.assert_array_equal(seq[idx], seq[first[1]], err_msg=name)
        np.testing.assert_array_equal(d2, first[0], err_msg=name)


# -- further contract tests, on each path ----------------------------------------------------------


@pytest.mark.parametrize("search", ALL_PATHS)
@pytest.mark.parametrize(("n", "d", "k", "b"), GRID, ids=[f"N{n}-d{d}-k{k}-B{b}" for n, d, k, b in GRID])
def test_random_data_in_brute_force_order(n: int, d: int, k: int, b: int, search: Search) -> None:
    """N in {1, 7, 1000, 20000}, d in {1, 3, 32, 128}, k in {1, 10, 64, 1024}, B in {1, 5, 40, 256}
    (k clipped to N). Continuous data has no exact ties: the order is the brute-force order."""
    rng = np.random.default_rng(n * 1_000_003 + d * 1009 + k * 31 + b)
    xb = rng.normal(size=(n, d)).astype(np.float32)
    xq = rng.normal(size=(b, d)).astype(np.float32)
    check(search, xb, ring_seqs(n, n // 3), xq, min(k, n))


@pytest.mark.parametrize("search", ALL_PATHS)
@pytest.mark.parametrize("b", [1, 17, 40])
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_identical_rows_give_the_k_lowest_seqs(k: int, b: int, search: Search) -> None:
    """Every row the same: all 20,000 are tied, and the answer is the k oldest rows, oldest first."""
    xb = np.tile(np.array([[1.0, -2.0, 3.0, 0.5]], np.float32), (20000, 1))
    seq = ring_seqs(20000, 12345)
    xq = np.random.default_rng(b).integers(-3, 4, size=(b, 4)).astype(np.float32)
    d2, idx = search(xb, seq, xq, k)
    np.testing.assert_array_equal(idx, np.broadcast_to(np.argsort(seq)[:k], (b, k)))
    np.testing.assert_array_equal(d2, pair_d2(xb, xq, idx).astype(np.float32))


@pytest.mark.parametrize("search", ALL_PATHS)
@pytest.mark.parametrize("b", [1, 40])
def test_points_on_a_sphere_around_the_query(b: int, search: Search) -> None:
    """20,000 points at distance 3 from the query, up to float32 rounding: one big near-tie group."""
    rng = np.random.default_rng(b)
    d = 32
    centre = rng.normal(size=d) * 10
    u = rng.normal(size=(20000, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    xb = (centre + 3 * u).astype(np.float32)
    seq = ring_seqs(20000, 500)
    xq = np.repeat(centre[None].astype(np.float32), b, axis=0)
    for k in (1, 64, 1024):
        check(search, xb, seq, xq, k, exact=False)
    # A couple of exact duplicates of one sphere point, with the query moved onto that point.
    xb2 = np.concatenate([xb, xb[[123, 123, 4567]]])
    seq2 = np.concatenate([seq, [5, 99_999, 7]])  # one duplicate is older than the original
    xq2 = np.repeat(xb[123:124], b, axis=0)
    d2, idx = search(xb2, seq2, xq2, 3)
    np.testing.assert_array_equal(idx, np.broadcast_to([20000, 123, 20001], (b, 3)))
    assert (d2 == 0).all()


@pytest.mark.parametrize("search", ALL_PATHS)
@pytest.mark.parametrize("b", [1, 3, knn.SMALL_QUERY_ROWS, knn.SMALL_QUERY_ROWS + 1, 40])
def test_far_from_origin_whatever_the_thread_count(b: int, search: Search) -> None:
    """FAISS's multi-threaded small-batch path and every other one stay exact on data far from
    the origin."""
    rng = np.random.default_rng(b)
    xb, xq = (a.astype(np.float32) for a in far_from_origin(rng, 20000, b, 32))
    check(search, xb, ring_seqs(20000, 1), xq, 10)


@NEEDS_FAISS
def test_a_single_query_does_not_depend_on_the_thread_setting() -> None:
    import faiss

    rng = np.random.default_rng(5)
    xb = rng.normal(size=(20000, 32)).astype(np.float32)
    xq = rng.normal(size=(1, 32)).astype(np.float32)
    seq = np.arange(20000)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    a = knn.exact_knn(xb, seq, xq, 64, threads=os.cpu_count() or 1, use_faiss=True)
    faiss.omp_set_num_threads(1)
    for threads in (1, 16):
        b = knn.exact_knn(xb, seq, xq, 64, threads=threads, use_faiss=True)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_the_module_brute_force_is_the_oracle() -> None:
    """The rescue's brute force gives the oracle's answer bit for bit, ties included."""
    rng = np.random.default_rng(9)
    xb = rng.integers(-2, 3, size=(3000, 4)).astype(np.float32)
    xq = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)
    seq = ring_seqs(3000, 1234)
    for k in (1, 10, 100, 3000):
        got, ref = knn.brute_force(xb, seq, xq, k), brute_force(xb, seq, xq, k)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


# -- the certificate -------------------------------------------------------------------------------


@pytest.mark.parametrize("use_faiss", [pytest.param(True, marks=NEEDS_FAISS), False], ids=["faiss", "numpy"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_certified_rows_are_exact_without_the_rescue(kind: str, use_faiss: bool) -> None:
    """The certificate is sound: every row it certifies equals brute force, ties included."""
    rng = np.random.default_rng(3)
    xb, xq = (a.astype(np.float32) for a in KINDS[kind](rng, 4000, 64, 16))
    xq[:8] = xb[:8]
    seq = ring_seqs(4000, 999)
    d2, idx, ok = knn.knn_certified(xb, seq, xq, 64, use_faiss=use_faiss)
    ref_d2, ref_idx = brute_force(xb, seq, xq, 64)
    np.testing.assert_array_equal(idx[ok], ref_idx[ok])
    np.testing.assert_array_equal(d2[ok], ref_d2[ok])
    if kind == "normal":
        assert ok.mean() > 0.9  # and it certifies the common case
    if kind == "tiny":
        assert not ok.any()  # float32 cannot tell these apart


def test_the_certificate_has_an_absolute_term() -> None:
    """z's near 1e-23: every float32 distance is 0 and every exact one near 1e-45. A relative bound
    would certify 1e-45 < 0 + 1e-45 − 0; the absolute term (float32's smallest normal) refuses."""
    kth, last = np.array([1e-45]), np.array([3e-45])
    assert not knn.certify(kth, last, 1e-44, np.array([1e-44]), 8, knn.F32_ROUNDOFF).any()
    assert knn.certify(np.array([1.0]), np.array([1.1]), 4.0, np.array([4.0]), 8, knn.F32_ROUNDOFF).all()


def test_the_certificate_refuses_where_float32_may_overflow_or_nan() -> None:
    """Norms whose float32 distances may overflow certify nothing (the approximate distance may be
    inf, or a wrong finite value); nor do NaN or infinite inputs."""
    big = F32_MAX / 4
    assert not knn.certify(np.array([1.0]), np.array([1e30]), big, np.array([big]), 8, knn.F32_ROUNDOFF).any()
    nan, inf = np.array([np.nan]), np.array([np.inf])
    assert not knn.certify(nan, np.array([2.0]), 1.0, np.array([1.0]), 8, knn.F32_ROUNDOFF).any()
    assert not knn.certify(np.array([1.0]), nan, 1.0, np.array([1.0]), 8, knn.F32_ROUNDOFF).any()
    assert not knn.certify(
        np.array([1.0]), np.array([2.0]), np.inf, np.array([1.0]), 8, knn.F32_ROUNDOFF
    ).any()
    assert not knn.certify(np.array([1.0]), inf, big, np.array([big]), 8, knn.F32_ROUNDOFF).any()


@NEEDS_TORCH
def test_the_certificate_is_the_same_on_tensors() -> None:
    import torch

    rng = np.random.default_rng(1)
    kth = rng.uniform(0, 2, 100)
    q2 = rng.uniform(0, 3, 100)
    for dim, u in ((4, knn.F32_ROUNDOFF), (33, 2.0**-11)):
        bound = 2 * (dim + 3) * u * (2.5**0.5 + q2**0.5) ** 2  # the relative term at these norms
        last = kth + bound * rng.uniform(0, 2, 100)
        a = knn.certify(kth, last, 2.5, q2, dim, u)
        b = knn.certify(
            torch.from_numpy(kth),
            torch.from_numpy(last),
            torch.tensor(2.5, dtype=torch.float64),
            torch.from_numpy(q2),
            dim,
            u,
        )
        np.testing.assert_array_equal(a, b.numpy())
        assert 0 < a.sum() < 100


def test_the_margin_rule() -> None:
    assert [knn.margin(k) for k in (1, 64, 65, 1024)] == [16, 16, 16, 256]
    assert knn.candidate_count(64, 50_000) == 80 and knn.candidate_count(64, 70) == 70
    assert knn.candidate_count(1024, 10**6) <= 2048  # faiss-gpu's largest k


def test_no_query_rows() -> None:
    for use_faiss in [False] + [True] * HAS_FAISS:
        d2, idx = knn.exact_knn(
            np.zeros((500, 2), np.float32),
            np.arange(500),
            np.zeros((0, 2), np.float32),
            3,
            use_faiss=use_faiss,
        )
        assert d2.shape == idx.shape == (0, 3)


def test_importing_the_core_kNN_loads_neither_faiss_nor_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, zmem_core, zmem_core.knn\n"
        "bad = {'faiss', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_single_query_path_is_the_general_one(dtype: type) -> None:
    """One query row with FAISS takes a shorter path (`_single_query`): the same float64
    distances bit for bit, the same rows in the same order, the same certificate."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((3000, 16)).astype(np.float32)
    xb[1000:1100] = xb[0]  # a tie group past the margin: uncertified either way
    seq = rng.permutation(10_000)[:3000].astype(np.int64)
    sqmax = float(np.einsum("nd,nd->n", xb, xb, dtype=np.float64).max())
    for i in range(60):
        xq = (xb[i : i + 1] if i % 3 == 0 else rng.standard_normal((1, 16))).astype(dtype)
        for k in (1, 7, 64):
            fast = knn.knn_certified(xb, seq, xq, k, base_sqnorm_max=sqmax, use_faiss=True)
            general = knn.knn_certified(xb, seq, xq, k, use_faiss=True)  # no bound given: the general path
            assert fast[0].dtype == general[0].dtype == np.float64
            np.testing.assert_array_equal(fast[0], general[0])
            np.testing.assert_array_equal(fast[1], general[1])
            np.testing.assert_array_equal(fast[2], general[2])


@NEEDS_FAISS
@pytest.mark.parametrize("b", [knn.BLAS_QUERY_ROWS - 1, knn.BLAS_QUERY_ROWS])
@pytest.mark.parametrize("kind", ["normal", "integer_ties", "far_from_origin", "near_the_norm_limit"])
def test_both_ways_faiss_forms_distances_are_exact(kind: str, b: int) -> None:
    """Below BLAS_QUERY_ROWS FAISS scans row by row, from it by one matrix product (another
    rounding): on either side of the switch, the answer is brute force's, ties included."""
    import faiss

    rng = np.random.default_rng(b)
    xb, xq = (a.astype(np.float32) for a in KINDS[kind](rng, 20000, b, 32))
    xq[0] = xb[5]
    seq = ring_seqs(20000, 777)
    seen: list[int] = []
    knn_l2sqr = faiss.knn_L2sqr

    def spied(*args: object) -> object:
        seen.append(faiss.cvar.distance_compute_blas_threshold)
        return knn_l2sqr(*args)

    faiss.knn_L2sqr = spied
    try:
        d2, idx = knn.exact_knn(xb, seq, xq, 64, use_faiss=True)
    finally:
        faiss.knn_L2sqr = knn_l2sqr
    assert seen and all((blas == 0) == (b >= knn.BLAS_QUERY_ROWS) for blas in seen)
    ref_d2, ref_idx = brute_force(xb, seq, xq, 64)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(d2, ref_d2.astype(np.float32))


@NEEDS_FAISS
@pytest.mark.parametrize("layout", ["transposed", "rows"])
@pytest.mark.parametrize(
    "b",
    [
        knn.GEMM_QUERY_ROWS,
        3,
        5,
        10,
        knn.SMALL_QUERY_ROWS,
        knn.SMALL_QUERY_ROWS + 1,
        knn.PARALLEL_QUERY_ROWS + 3,
    ],
)
@pytest.mark.parametrize("kind", list(KINDS))
def test_small_batches_take_one_product_and_stay_exact(kind: str, b: int, layout: str) -> None:
    """With the rows' norms given, GEMM_QUERY_ROWS to SMALL_QUERY_ROWS query rows get their
    candidates from one numpy product, and FAISS is not called; with the base transposed over
    those norms, so do larger batches (split over the threads from PARALLEL_QUERY_ROWS rows),
    while from the rows' layout they go to FAISS. Either way the answer is brute force's, ties
    included, over several chunks of the base (of rows and of columns)."""
    import faiss

    rng = np.random.default_rng(b * 101 + len(kind))
    n = 3 * knn.CHUNK_ROWS + 123
    assert n > 2 * knn.CHUNK_COLUMNS
    xb, xq = (a.astype(np.float32) for a in KINDS[kind](rng, n, b, 16))
    xq[0] = xb[n - 5]  # a query on a row of the last, partial chunk
    seq = ring_seqs(n, 4321)
    calls: list[int] = []
    knn_l2sqr = faiss.knn_L2sqr

    def spied(*args: object) -> object:
        calls.append(1)
        return knn_l2sqr(*args)

    faiss.knn_L2sqr = spied
    try:
        check(service_search if layout == "transposed" else norms_search, xb, seq, xq, 64)
    finally:
        faiss.knn_L2sqr = knn_l2sqr
    assert bool(calls) == (b > knn.SMALL_QUERY_ROWS and layout == "rows")
    if kind == "normal":
        sqnorm = np.einsum("nd,nd->n", xb, xb, dtype=np.float64)
        given = (
            {"base_t": transposed(xb)}
            if layout == "transposed"
            else {"base_sqnorm": sqnorm.astype(np.float32)}
        )
        certified = knn.knn_certified(xb, seq, xq, 64, base_sqnorm_max=float(sqnorm.max()), **given)[2]
        assert certified.all()  # the product's distances certify the common case


@pytest.mark.parametrize("use_faiss", [pytest.param(True, marks=NEEDS_FAISS), False])
def test_a_large_batch_split_over_threads_answers_as_one_thread(use_faiss: bool) -> None:
    """From PARALLEL_QUERY_ROWS query rows the transposed base's search is split over the
    threads given (each part at least SMALL_QUERY_ROWS rows): the same distances, rows and
    certificates, bit for bit, in the order asked, as on one thread; the parts run on other
    threads. Without the transposed base (a caller without FAISS) nothing is split."""
    rng = np.random.default_rng(8)
    xb = rng.standard_normal((5000, 16)).astype(np.float32)
    xb[100:160] = xb[7]  # a tie group larger than the candidates: uncertified either way
    seq = ring_seqs(5000, 99)
    xq = rng.standard_normal((knn.PARALLEL_QUERY_ROWS + 37, 16)).astype(np.float32)
    xq[::10] = xb[7]
    sqmax = float(np.einsum("nd,nd->n", xb, xb, dtype=np.float64).max())
    base_t = transposed(xb)
    one = knn.knn_certified(xb, seq, xq, 32, base_sqnorm_max=sqmax, base_t=base_t, use_faiss=use_faiss)
    assert not one[2].all() and one[2].any()
    seen: list[str] = []
    real = knn._gemm_candidates
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            knn, "_gemm_candidates", lambda *a: seen.append(threading.current_thread().name) or real(*a)
        )
        for threads in (2, 3, 64):
            split = knn.knn_certified(
                xb, seq, xq, 32, base_sqnorm_max=sqmax, base_t=base_t, threads=threads, use_faiss=use_faiss
            )
            for got, want in zip(split, one, strict=True):
                np.testing.assert_array_equal(got, want)
        assert any(name.startswith(knn.POOL_NAME) for name in seen)
        assert len(seen) == 2 + 3 + len(xq) // knn.SMALL_QUERY_ROWS
        if not use_faiss:
            seen.clear()
            knn.knn_certified(xb, seq, xq, 32, threads=2, use_faiss=False)
            assert seen == [threading.current_thread().name]


def test_a_split_search_asked_on_the_pools_own_thread_runs_there() -> None:
    """A split search asked from one of the pool's threads runs inline there, rather than
    waiting on parts queued behind itself (which would hang that search and every later one)."""
    rng = np.random.default_rng(10)
    xb = rng.standard_normal((3000, 8)).astype(np.float32)
    seq = np.arange(3000, dtype=np.int64)
    xq = rng.standard_normal((knn.PARALLEL_QUERY_ROWS, 8)).astype(np.float32)
    base_t = transposed(xb)
    want = knn.exact_knn(xb, seq, xq, 5, base_t=base_t, use_faiss=False)
    nested = knn._pool(1).submit(knn.exact_knn, xb, seq, xq, 5, base_t=base_t, threads=2, use_faiss=False)
    got = nested.result(timeout=60)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    later = knn.exact_knn(xb, seq, xq, 5, base_t=base_t, threads=2, use_faiss=False)  # the pool still serves
    for a, b in zip(later, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_splits_a_search_on_threads_of_its_own() -> None:
    """A process forked after a split search (a training worker, a data loader) gets no thread
    of its parent's pool: its own split search still answers, and in time."""
    rng = np.random.default_rng(9)
    xb = rng.standard_normal((2000, 8)).astype(np.float32)
    seq = np.arange(2000, dtype=np.int64)
    xq = rng.standard_normal((knn.PARALLEL_QUERY_ROWS, 8)).astype(np.float32)
    base_t = transposed(xb)
    want = knn.exact_knn(
        xb, seq, xq, 5, base_t=base_t, threads=2, use_faiss=False
    )  # the parent's pool starts
    assert knn._pool.cache_info().currsize
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only on the right answer
        got = knn.exact_knn(xb, seq, xq, 5, base_t=base_t, threads=2, use_faiss=False)
        os._exit(0 if all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)) else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's search hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@NEEDS_FAISS
def test_a_base_too_large_for_one_block_of_scores_goes_to_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small batches take the product only while their scores fit in one block (BLOCK_ELEMENTS):
    over a larger base, FAISS finds the candidates, exactly."""
    import faiss

    rng = np.random.default_rng(5)
    xb, xq = (a.astype(np.float32) for a in normal(rng, 3000, 4, 8))
    seq = ring_seqs(3000, 17)
    calls: list[int] = []
    knn_l2sqr = faiss.knn_L2sqr
    monkeypatch.setattr(faiss, "knn_L2sqr", lambda *a: calls.append(1) or knn_l2sqr(*a))
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", 4 * 3000 - 1)
    check(service_search, xb, seq, xq, 10)
    assert calls
    calls.clear()
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", 4 * 3000)
    check(service_search, xb, seq, xq, 10)
    assert not calls


def test_the_selection_keeps_the_c_smallest() -> None:
    """`_smallest`: the c smallest of each row whatever its sampled threshold leaves, NaN last."""
    rng = np.random.default_rng(8)
    n, c = 20 * knn.SAMPLE_STEP * 10, 80
    score = rng.normal(size=(5, n)).astype(np.float32)
    score[1, :: knn.SAMPLE_STEP] = -np.arange(n // knn.SAMPLE_STEP) - 1000.0  # the sample is the smallest
    score[2] = 7.0  # all tied
    score[3, rng.permutation(n)[: n // 2]] = np.nan
    score[4, :100] = -np.inf
    picked = knn._smallest(score, c)
    assert picked.shape == (5, c)
    for row, cols in zip(score, picked, strict=True):
        assert len(set(cols.tolist())) == c
        kept = np.sort(row[cols])
        expected = np.sort(row)[:c]  # NaN sorts last
        np.testing.assert_array_equal(kept, expected)
    small = rng.normal(size=(2, 100)).astype(np.float32)  # too few to sample: sorted whole
    kept = np.take_along_axis(small, knn._smallest(small, 20), 1)
    np.testing.assert_array_equal(np.sort(kept), np.sort(small)[:, :20])


@given(
    rows=st.integers(1, 4),
    n=st.integers(2, 3000),
    c=st.integers(1, 400),
    values=st.sampled_from(["normal", "few", "nan", "inf"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_selection_matches_a_sort(rows: int, n: int, c: int, values: str, seed: int) -> None:
    """`_smallest` over any scores (c < N): the values it keeps are each row's c smallest, as
    a sort orders them (NaN last), sampled threshold or not."""
    c = min(c, n - 1)
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(rows, n)).astype(np.float32)
    if values == "few":
        score = rng.integers(-2, 3, size=(rows, n)).astype(np.float32)
    elif values == "nan":
        score[rng.random((rows, n)) < 0.3] = np.nan
    elif values == "inf":
        score[rng.random((rows, n)) < 0.3] = np.inf
    picked = knn._smallest(score, c)
    assert picked.shape == (rows, c)
    for row, cols in zip(score, picked, strict=True):
        assert len(np.unique(cols)) == c
        np.testing.assert_array_equal(np.sort(row[cols]), np.sort(row)[:c])
