"""The torch exact kNN (`zmem_client._knn`) against float64 numpy brute force, ties by the lower seq.

The same matrix as test_knn.py (the FAISS CPU backend), on CPU tensors here and on CUDA
where a device is present. Seqs are those of a wrapped ring, so "the lower seq" is not
"the lower row".
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from zmem_client import _knn
from zmem_client._knn import centres_exactly, exact_center, exact_knn, knn_certified

from .knn_oracle import GRID, brute_force, check_same_knn, pair_d2, ring_seqs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def search(
    xb: np.ndarray,
    seq: np.ndarray,
    xq: np.ndarray,
    k: int,
    device: str = "cpu",
    *,
    centre: bool = True,
    rescue: bool | None = True,
) -> tuple[np.ndarray, np.ndarray]:
    base = torch.from_numpy(xb).to(device)
    c = exact_center(base) if centre else None
    if c is not None:
        base = base - c
    d2, idx = exact_knn(
        base, torch.from_numpy(seq).to(device), torch.from_numpy(xq).to(device), k, center=c, rescue=rescue
    )
    assert d2.dtype == torch.float32 and idx.dtype == torch.int64
    return d2.cpu().numpy(), idx.cpu().numpy()


def check(
    xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int, device: str = "cpu", *, exact: bool, **kw: bool
) -> None:
    d2, idx = search(xb, seq, xq, k, device, **kw)
    assert d2.shape == idx.shape == (len(xq), k)
    assert (np.diff(d2, axis=1) >= 0).all(), "not sorted nearest first"
    ref_d2, ref_idx = brute_force(xb, seq, xq, k)
    check_same_knn(ref_d2, ref_idx, d2, idx, exact=exact)
    # the distances are those of the returned rows
    np.testing.assert_allclose(pair_d2(xb, xq, idx), d2, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "d", "k", "b"), GRID, ids=[f"N{n}-d{d}-k{k}-B{b}" for n, d, k, b in GRID])
def test_matches_brute_force_on_random_data(n: int, d: int, k: int, b: int, device: str) -> None:
    rng = np.random.default_rng(n * 1_000_003 + d * 1009 + k * 31 + b)
    xb = rng.normal(size=(n, d)).astype(np.float32)
    xq = rng.normal(size=(b, d)).astype(np.float32)
    # continuous random data has no exact ties: the order is the brute-force order
    check(xb, ring_seqs(n, n // 3), xq, min(k, n), device, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 5, 40, 256])
@pytest.mark.parametrize("k", [1, 10, 64, 1024])
def test_integer_data_ties_go_to_the_lower_seq(k: int, b: int, device: str) -> None:
    """Values in {-3..3}³: 343 distinct points over 20,000 rows, so every distance is tied many times."""
    rng = np.random.default_rng(k * 7 + b)
    xb = rng.integers(-3, 4, size=(20000, 3)).astype(np.float32)
    xq = rng.integers(-4, 5, size=(b, 3)).astype(np.float32)
    check(xb, ring_seqs(20000, 7777), xq, k, device, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rescue", [True, False])
@pytest.mark.parametrize("b", [1, 17, 40])
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_identical_rows_give_the_k_lowest_seqs(k: int, b: int, rescue: bool, device: str) -> None:
    """Every row the same: all 20,000 are tied, and the answer is the k oldest rows, oldest first.

    Without the rescue too: bit-identical rows get bit-identical approximate distances, and the
    candidate key orders those by seq.
    """
    xb = np.tile(np.array([[1.0, -2.0, 3.0, 0.5]], np.float32), (20000, 1))
    seq = ring_seqs(20000, 12345)
    xq = np.random.default_rng(b).integers(-3, 4, size=(b, 4)).astype(np.float32)
    d2, idx = search(xb, seq, xq, k, device, rescue=rescue)
    np.testing.assert_array_equal(idx, np.broadcast_to(np.argsort(seq)[:k], (b, k)))
    np.testing.assert_array_equal(d2, pair_d2(xb, xq, idx).astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 40])
def test_duplicated_rows(b: int, device: str) -> None:
    """50 distinct integer rows each repeated ~400 times in random order; queries on and near them."""
    rng = np.random.default_rng(b)
    base = rng.integers(-4, 5, size=(50, 8)).astype(np.float32)
    xb = base[rng.integers(0, 50, size=20000)]
    seq = rng.permutation(20000).astype(np.int64) * 3 + 11  # any order, gaps between seqs
    xq = base[rng.integers(0, 50, size=b)] + rng.integers(-1, 2, size=(b, 8)).astype(np.float32)
    for k in (1, 10, 64, 1024):
        check(xb, seq, xq, k, device, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 40])
def test_points_on_a_sphere_around_the_query(b: int, device: str) -> None:
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
        check(xb, seq, xq, k, device, exact=False)
    # A couple of exact duplicates of one sphere point, with the query moved onto that point.
    xb2 = np.concatenate([xb, xb[[123, 123, 4567]]])
    seq2 = np.concatenate([seq, [5, 99_999, 7]])  # one duplicate is older than the original
    xq2 = np.repeat(xb[123:124], b, axis=0)
    d2, idx = search(xb2, seq2, xq2, 3, device)
    np.testing.assert_array_equal(idx, np.broadcast_to([20000, 123, 20001], (b, 3)))
    assert (d2 == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("b", [1, 3, 17, 40])
def test_large_common_offset(b: int, centre: bool, device: str) -> None:
    """z's far from the origin (1000 + 0.01·noise): ‖x‖² − 2⟨x, q⟩ in float32 cancels catastrophically
    unless centred; uncentred, the certificate fails and the rescue answers. Exact either way."""
    rng = np.random.default_rng(b)
    xb = (1000 + 0.01 * rng.normal(size=(20000, 32))).astype(np.float32)
    xq = (1000 + 0.01 * rng.normal(size=(b, 32))).astype(np.float32)
    check(xb, ring_seqs(20000, 1), xq, 10, device, exact=True, centre=centre)


def test_the_certificate_fails_where_float32_cannot_tell() -> None:
    """Uncentred far-from-origin data: no row is certified (the rescue is what makes them exact);
    centred, every row is."""
    rng = np.random.default_rng(0)
    xb = torch.from_numpy((1000 + 0.01 * rng.normal(size=(5000, 32))).astype(np.float32))
    xq = torch.from_numpy((1000 + 0.01 * rng.normal(size=(8, 32))).astype(np.float32))
    seq = torch.arange(5000)
    assert not knn_certified(xb, seq, xq, 10)[2].any()
    c = exact_center(xb)
    assert knn_certified(xb - c, seq, xq, 10, center=c)[2].all()


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.normal(size=(3000, 16)),
        lambda rng: 1000 + 0.01 * rng.normal(size=(3000, 16)),
        lambda rng: 3 * rng.normal(size=(3000, 16)) ** 3,
        lambda rng: rng.integers(-2, 3, size=(3000, 16)),
    ],
    ids=["normal", "offset", "heavy-tailed", "integer"],
)
def test_certified_rows_are_exact_without_the_rescue(make) -> None:  # type: ignore[no-untyped-def]
    """The certificate is sound: every row it certifies equals brute force (ties included)."""
    rng = np.random.default_rng(3)
    xb = make(rng).astype(np.float32)
    xq = (xb[rng.integers(0, len(xb), 64)] + rng.normal(size=(64, 16)) * 0.5).astype(np.float32)
    xq[:8] = xb[:8]  # queries on stored points
    seq = ring_seqs(len(xb), 999)
    for centre in (True, False):
        base = torch.from_numpy(xb)
        c = exact_center(base) if centre else None
        d2, idx, ok = knn_certified(
            base if c is None else base - c, torch.from_numpy(seq), torch.from_numpy(xq), 64, center=c
        )
        ref_d2, ref_idx = brute_force(xb, seq, xq, 64)
        rows = ok.numpy()
        np.testing.assert_array_equal(idx.numpy()[rows], ref_idx[rows])
        np.testing.assert_array_equal(d2.numpy()[rows], ref_d2[rows].astype(np.float32))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_knn, "BLOCK_ELEMENTS", 5000)
    yield


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("n", "d", "k", "b"), [(20000, 3, 64, 40), (1000, 32, 1000, 5), (7000, 8, 300, 3)])
def test_blocked_paths_agree(n: int, d: int, k: int, b: int) -> None:
    """Tiny blocks: candidates merged across many blocks, re-rank and rescue in row blocks."""
    rng = np.random.default_rng(n + d)
    xb = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    xq = rng.integers(-3, 4, size=(b, d)).astype(np.float32)
    check(xb, ring_seqs(n, n // 2), xq, k, exact=True)
    xb = rng.normal(size=(n, d)).astype(np.float32)
    check(xb, ring_seqs(n, n // 2), xq, k, exact=True, rescue=False)


def test_the_centre_does_not_change_the_answer() -> None:
    """Centring is exact, so distances are those of the raw z's whatever the centre."""
    rng = np.random.default_rng(4)
    xb = (50 + rng.normal(size=(4000, 8))).astype(np.float32)
    xq = (50 + rng.normal(size=(20, 8))).astype(np.float32)
    seq = ring_seqs(4000, 3)
    base = torch.from_numpy(xb)
    answers = []
    for rows in (slice(0, 1), slice(0, 100), slice(None)):
        c = exact_center(base[rows])
        assert centres_exactly(base, c).all()
        d2, idx = exact_knn(base - c, torch.from_numpy(seq), torch.from_numpy(xq), 32, center=c)
        answers.append((d2.numpy(), idx.numpy()))
    for d2, idx in answers[1:]:
        np.testing.assert_array_equal(d2, answers[0][0])
        np.testing.assert_array_equal(idx, answers[0][1])


def test_exact_center() -> None:
    z = torch.tensor([[1000.25, 0.5, -3.0], [1000.75, -0.5, -3.0]])
    c = exact_center(z)
    assert c[0] == 1000.0 and c[2] == -3.0  # 8 significant bits of the mean
    assert c[1] == 0.0  # mean 0
    assert ((z - c).double() == z.double() - c.double()).all()
    tiny = torch.tensor([[1e-30, 1.0], [3e-30, 1.0]])
    assert centres_exactly(tiny, exact_center(tiny)).all()


def test_no_query_rows() -> None:
    d2, idx = exact_knn(torch.zeros(5, 2), torch.arange(5), torch.zeros(0, 2), 3)
    assert d2.shape == idx.shape == (0, 3)


@pytest.mark.parametrize(
    ("base", "seq", "query", "k", "message"),
    [
        (torch.zeros(5, 2), torch.arange(5), torch.zeros(1, 2), 0, "k must be in 1..5"),
        (torch.zeros(5, 2), torch.arange(5), torch.zeros(1, 2), 6, "k must be in 1..5"),
        (torch.zeros(5, 2, dtype=torch.float64), torch.arange(5), torch.zeros(1, 2), 1, "base must be"),
        (torch.zeros(5, 2), torch.arange(5), torch.zeros(1, 3), 1, "query must be"),
        (torch.zeros(5, 2), torch.arange(4), torch.zeros(1, 2), 1, "seq must be"),
        (torch.zeros(5, 2), torch.arange(5).int(), torch.zeros(1, 2), 1, "seq must be"),
    ],
)
def test_bad_arguments_name_the_argument(base, seq, query, k, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        exact_knn(base, seq, query, k)


def test_importing_the_knn_module_needs_no_http_stack() -> None:
    code = (
        "import sys, zmem_client._knn\n"
        "bad = {'httpx', 'safetensors', 'zmem_client._client'} & set(sys.modules)\n"
        "assert not bad, bad\n"
        "from zmem_client import ZMemClient, kernel_risk, TransportError\n"
        "import zmem_client\n"
        "assert set(zmem_client.__all__) <= set(dir(zmem_client))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@CUDA
def test_cuda_search_never_synchronises_with_the_host() -> None:
    """`exact_knn` (without the rescue) and `knn_certified` on CUDA under sync debug mode "error"."""
    rng = np.random.default_rng(8)
    base = torch.from_numpy(rng.normal(size=(50000, 32)).astype(np.float32)).cuda()
    seq = torch.arange(50000, device="cuda")
    c = exact_center(base)
    base = base - c
    sqnorm = (base * base).sum(dim=1)
    queries = [torch.randn(b, 32, device="cuda") for b in (1, 256)]
    torch.cuda.synchronize()
    results = []
    try:
        with warnings.catch_warnings():  # "a prototype feature": we rely on it only as a check
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        for q in queries:
            results.append(exact_knn(base, seq, q, 64, center=c, base_sqnorm=sqnorm))
            results.append(knn_certified(base, seq, q, 64, center=c, base_sqnorm=sqnorm)[:2])
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("default")
    xb = (base + c).cpu().numpy()
    for i, q in enumerate(queries):
        ref_d2, ref_idx = brute_force(xb, seq.cpu().numpy(), q.cpu().numpy(), 64)
        for d2, idx in results[2 * i : 2 * i + 2]:
            check_same_knn(ref_d2, ref_idx, d2.cpu().numpy(), idx.cpu().numpy(), exact=True)


@pytest.mark.parametrize(("n", "b", "k"), [(20000, 1, 64), (20000, 40, 10), (5000, 3, 1024), (3000, 17, 64)])
def test_faiss_candidates_give_the_same_exact_answer(n: int, b: int, k: int) -> None:
    """The replica's CPU shortcut: FAISS finds the candidates, the re-rank and rescue are the
    same; the answer equals brute force, ties by seq included (integer data ties everywhere)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(n + b + k)
    seq = ring_seqs(n, n // 3)
    for xb in (
        rng.normal(size=(n, 8)).astype(np.float32),
        rng.integers(-2, 3, size=(n, 3)).astype(np.float32),
    ):
        xq = rng.normal(size=(b, xb.shape[1])).astype(np.float32).round(0)
        kk = min(k, n)
        d2, idx = exact_knn(
            torch.from_numpy(xb), torch.from_numpy(seq), torch.from_numpy(xq), kk, faiss_candidates=True
        )
        ref_d2, ref_idx = brute_force(xb, seq, xq, kk)
        check_same_knn(ref_d2, ref_idx, d2.numpy(), idx.numpy(), exact=True)
