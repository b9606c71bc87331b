"""The torch kNN (`zmem_core.knn_torch`) beyond the contract every path meets (`test_knn.py`):
its certificate on its own, the exact centre, blocked paths, no rescue, argument checks, and on
CUDA no host synchronisation. On CPU tensors here and on CUDA where a device is present.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from zmem_core import knn_torch
from zmem_core.knn_torch import centres_exactly, exact_center, exact_knn, knn_certified

from ..knn_oracle import brute_force, check_same_knn, pair_d2, ring_seqs

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
@pytest.mark.parametrize("b", [1, 17, 40])
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_identical_rows_resolve_without_the_rescue(k: int, b: int, device: str) -> None:
    """Every row the same: the answer is the k oldest rows, oldest first, even without the rescue:
    bit-identical rows get bit-identical approximate distances, and the candidate key orders those
    by seq."""
    xb = np.tile(np.array([[1.0, -2.0, 3.0, 0.5]], np.float32), (20000, 1))
    seq = ring_seqs(20000, 12345)
    xq = np.random.default_rng(b).integers(-3, 4, size=(b, 4)).astype(np.float32)
    d2, idx = search(xb, seq, xq, k, device, rescue=False)
    np.testing.assert_array_equal(idx, np.broadcast_to(np.argsort(seq)[:k], (b, k)))
    np.testing.assert_array_equal(d2, pair_d2(xb, xq, idx).astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 3, 17, 40])
def test_uncentred_far_from_origin_is_rescued(b: int, device: str) -> None:
    """z's far from the origin (1000 + 0.01·noise), not centred: ‖x‖² − 2⟨x, q⟩ in float32 cancels
    catastrophically, the certificate fails and the rescue answers, exactly."""
    rng = np.random.default_rng(b)
    xb = (1000 + 0.01 * rng.normal(size=(20000, 32))).astype(np.float32)
    xq = (1000 + 0.01 * rng.normal(size=(b, 32))).astype(np.float32)
    check(xb, ring_seqs(20000, 1), xq, 10, device, exact=True, centre=False)


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


LIMIT = float(np.finfo(np.float32).max) / 4  # the service's bound on ‖z‖²


@pytest.mark.parametrize(
    ("make", "noise"),
    [
        (lambda rng, d: rng.normal(size=(3000, d)), 0.5),
        (lambda rng, d: 1000 + 0.01 * rng.normal(size=(3000, d)), 0.5),
        (lambda rng, d: 3 * rng.normal(size=(3000, d)) ** 3, 0.5),
        (lambda rng, d: rng.integers(-2, 3, size=(3000, d)), 0.5),
        (lambda rng, d: 1e-23 * rng.normal(size=(3000, d)), 1e-23),
        (lambda rng, d: np.sqrt(LIMIT / d) * rng.uniform(-1, 1, size=(3000, d)), 1e18),
    ],
    ids=["normal", "offset", "heavy-tailed", "integer", "near-1e-23", "near-the-norm-limit"],
)
@pytest.mark.parametrize(("d", "k"), [(1, 64), (8, 10), (16, 64)])
def test_certified_rows_are_exact_without_the_rescue(make, noise: float, d: int, k: int) -> None:
    """The certificate is sound: every row it certifies equals brute force (ties included).

    Near 1e-23 every float32 distance underflows to 0; a certificate that read the k-th exact
    distance after a cast to float32 (0 too) and had no absolute error term certified wrong rows
    (at d = 1, nearly all of them).
    """
    rng = np.random.default_rng(3)
    xb = make(rng, d).astype(np.float32)
    xq = (xb[rng.integers(0, len(xb), 64)] + rng.normal(size=(64, d)) * noise).astype(np.float32)
    xq[:8] = xb[:8]  # queries on stored points
    seq = ring_seqs(len(xb), 999)
    ref_d2, ref_idx = brute_force(xb, seq, xq, k)
    for centre in (True, False):
        base = torch.from_numpy(xb)
        c = exact_center(base) if centre else None
        d2, idx, ok = knn_certified(
            base if c is None else base - c, torch.from_numpy(seq), torch.from_numpy(xq), k, center=c
        )
        rows = ok.numpy()
        np.testing.assert_array_equal(idx.numpy()[rows], ref_idx[rows])
        np.testing.assert_array_equal(d2.numpy()[rows], ref_d2[rows].astype(np.float32))
        if noise == 1e-23:
            assert not rows.any()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(knn_torch, "BLOCK_ELEMENTS", 5000)
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
    for got_d2, got_idx in answers[1:]:
        np.testing.assert_array_equal(got_d2, answers[0][0])
        np.testing.assert_array_equal(got_idx, answers[0][1])


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
def test_bad_arguments_name_the_argument(base, seq, query, k, message) -> None:
    with pytest.raises(ValueError, match=message):
        exact_knn(base, seq, query, k)


def test_importing_the_torch_knn_loads_neither_side_nor_the_http_stack() -> None:
    code = (
        "import sys, zmem_core.knn_torch\n"
        "bad = {'httpx', 'safetensors', 'faiss', 'zmem_client', 'zmem_service'} & set(sys.modules)\n"
        "assert not bad, bad\n"
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
