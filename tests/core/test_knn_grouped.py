"""The grouped torch kNN (`zmem_core.knn_grouped`): its op budget (the device part runs a short,
fixed, sync-free sequence of kernels), and exactness against `tests/knn_oracle.py`'s float64 brute
force on `test_knn.py`'s hard kinds of data, in a part-filled, wrapped ring; the threshold pass
answers duplicate-heavy rows without a full scan. CPU tensors (the op sequence is the device's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zmem_core import knn_grouped, knn_torch
from zmem_core.knn import F32_ROUNDOFF
from zmem_core.knn_grouped import GroupedBase, grouped_knn, prepare_query, rescue_uncertified
from zmem_core.knn_torch import exact_center

from ..knn_oracle import brute_force, check_same_knn, pair_d2, ring_seqs
from .test_knn import CASES, KINDS, duplicated_200_fold, integer_ties, normal

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
INDEXING = {"index", "gather", "index_select", "embedding"}
"""Ops whose work is their output, not their (whole) source."""
FORBIDDEN = {"nonzero", "_local_scalar_dense", "item", "_to_copy", "copy_", "to"}
"""Host synchronisations (and copies, which on a device would be to or from the host)."""


class OpLog(TorchDispatchMode):
    """Every non-view aten op run inside: (name, output shapes, work in elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[tuple[int, ...], ...], int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            outs = [
                t for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)
            ]
            ins = [t for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)]
            name = func.overloadpacket.__name__
            sizes = [t.numel() for t in outs] + ([] if name in INDEXING else [t.numel() for t in ins])
            self.ops.append((name, tuple(tuple(t.shape) for t in outs), max(sizes, default=0)))
        return out


def stored(
    xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, *, centre: bool = True, device: str = "cpu"
) -> tuple[GroupedBase, torch.Tensor]:
    """xb and seq in the first len(xb) slots of a base twice as large whose other slots held the
    queries with lower seqs (nearer than anything) and were then emptied: a search that reads an
    empty slot fails. → (the base, the prepared query)."""
    n, d = xb.shape
    c = exact_center(torch.from_numpy(xb)).numpy() if centre else np.zeros(d, np.float32)
    base = GroupedBase(d, torch.device(device))
    base.grow(2 * n + 5)

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    decoys = xq[np.arange(n) % len(xq)] - c
    base.write(put(np.arange(n, 2 * n)), put(decoys), put(seq.min() - 1 - np.arange(n)))
    base.write(put(np.arange(n)), put(xb - c), put(seq))
    base.empty(n, base.capacity)
    return base, put(prepare_query(xq.astype(np.float64) - c.astype(np.float64)))


def answer(
    base: GroupedBase, query: torch.Tensor, k: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """grouped_knn, then the threshold pass for uncertified rows: (d2 float32, slots, certified)."""
    u = knn_torch.unit_roundoff(base.device)
    d2, slots, ok = grouped_knn(base, query, k, n, roundoff=u)
    d2, slots = d2[:, :k].clone(), slots[:, :k].clone()
    bad = np.flatnonzero(~ok.cpu().numpy())
    if len(bad):
        d2[bad], slots[bad] = rescue_uncertified(base, query, k, n, d2, bad, roundoff=u)
    return d2.cpu().numpy().astype(np.float32), slots.cpu().numpy(), ok.cpu().numpy()


def check(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int, device: str = "cpu") -> np.ndarray:
    """The answer equals brute force (slots and float32 d2, ties by seq); → which rows were certified."""
    base, query = stored(xb, seq, xq, device=device)
    d2, slots, ok = answer(base, query, k, len(xb))
    ref_d2, ref_slots = brute_force(xb, seq, xq, k)
    check_same_knn(ref_d2, ref_slots, d2, slots, exact=True)
    np.testing.assert_allclose(pair_d2(xb, xq, slots), d2, rtol=1e-6, atol=1e-45)
    return ok


@pytest.fixture
def full_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts `knn_torch.full_scan` calls (query rows per call)."""
    calls: list[int] = []
    real = knn_torch.full_scan

    def counted(base: torch.Tensor, seq: torch.Tensor, q64: torch.Tensor, k: int) -> Any:
        calls.append(len(q64))
        return real(base, seq, q64, k)

    monkeypatch.setattr(knn_torch, "full_scan", counted)
    return calls


# -- the op budget ---------------------------------------------------------------------------------


def device_ops(make: Any, b: int, n: int = 50_000, d: int = 32, k: int = 64) -> OpLog:
    rng = np.random.default_rng(b)
    xb, xq = (a.astype(np.float32) for a in make(rng, n, b, d))
    base = GroupedBase(d, torch.device("cpu"))
    base.grow(n)
    base.write(torch.arange(n), torch.from_numpy(xb), torch.from_numpy(ring_seqs(n, n // 3)))
    query = torch.from_numpy(prepare_query(xq.astype(np.float64)))
    with OpLog() as log:
        grouped_knn(base, query, k, n, roundoff=F32_ROUNDOFF)
    return log


@pytest.mark.parametrize("b", [1, 256])
def test_the_device_part_fits_the_op_budget(b: int) -> None:
    """N = 50k (one chunk): at most 32 non-view ops, at most 2 with O(B·N) work (the GEMM and the
    group minimum), nothing that reads the device on the host, and the same ops and shapes
    whatever the data."""
    n = 50_000
    log = device_ops(normal, b, n)
    names = [name for name, _, _ in log.ops]
    heavy = [name for name, _, work in log.ops if work >= b * n]
    print(f"B={b}: {len(names)} non-view ops, O(B·N): {heavy}\n  {' '.join(names)}")
    assert len(names) <= 32
    assert heavy == ["addmm", "amin"]
    assert not FORBIDDEN & set(names)
    for make in (integer_ties, duplicated_200_fold):
        assert [(name, shapes) for name, shapes, _ in device_ops(make, b, n).ops] == [
            (name, shapes) for name, shapes, _ in log.ops
        ]


@pytest.mark.parametrize("b", [1, 256])
def test_today_s_torch_knn_for_comparison(b: int) -> None:
    """`knn_torch.exact_knn` as the index called it (stored norms, a centre, no rescue) under the
    same count: the budget's baseline, about twice as many ops, an int64 top-k over packed keys."""
    rng = np.random.default_rng(0)
    n, d = 50_000, 32
    xb = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    xq = torch.from_numpy(rng.normal(size=(b, d)).astype(np.float32))
    sqnorm, seq, center = (xb * xb).sum(dim=1), torch.arange(n), torch.zeros(d)
    with OpLog() as log:
        knn_torch.exact_knn(xb, seq, xq, 64, center=center, base_sqnorm=sqnorm, rescue=False)
    heavy = [name for name, _, work in log.ops if work >= b * n]
    print(f"knn_torch.exact_knn B={b}: {len(log.ops)} non-view ops, O(B·N): {heavy}")
    assert len(log.ops) > len(device_ops(normal, b, n).ops)


# -- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("kind", "k", "d", "b"), CASES, ids=[f"{c[0]}-k{c[1]}-d{c[2]}-B{c[3]}" for c in CASES]
)
def test_equals_brute_force(kind: str, k: int, d: int, b: int, device: str) -> None:
    """`test_knn.py`'s kinds (ties, 200-fold duplicates, far from origin, near 1e-23, near the
    float32 norm limit) with every k in {1, 64, 1024}, d in {1, 33}, B in {1, 3, 256}: 5,000 rows
    of a wrapped ring, part of a larger, partly emptied capacity."""
    rng = np.random.default_rng(sum(map(ord, kind)) * 1009 + k * 31 + d * 7 + b)
    n = 5000
    xb, xq = (a.astype(np.float32) for a in KINDS[kind](rng, n, b, d))
    xq[0] = xb[17]
    check(xb, ring_seqs(n, 3217), xq, k, device)


@pytest.mark.parametrize("kind", list(KINDS))
def test_certified_rows_are_exact_without_the_rescue(kind: str) -> None:
    rng = np.random.default_rng(3)
    xb, xq = (a.astype(np.float32) for a in KINDS[kind](rng, 4000, 64, 16))
    xq[:8] = xb[:8]
    seq = ring_seqs(4000, 999)
    base, query = stored(xb, seq, xq)
    d2, slots, ok = grouped_knn(base, query, 64, 4000, roundoff=F32_ROUNDOFF)
    ref_d2, ref_slots = brute_force(xb, seq, xq, 64)
    ok_ = ok.numpy()
    np.testing.assert_array_equal(slots[:, :64].numpy()[ok_], ref_slots[ok_])
    np.testing.assert_array_equal(d2[:, :64].numpy()[ok_].astype(np.float32), ref_d2[ok_].astype(np.float32))
    if kind in ("normal", "far_from_origin"):
        assert ok_.mean() > 0.9
    if kind == "tiny":
        assert not ok_.any()


NEARLY_EMPTY = [(n, k) for n in (1, 7, 40, 300) for k in (1, 5, 64, 100) if k <= n]


@pytest.mark.parametrize(("n", "k"), NEARLY_EMPTY, ids=[f"N{n}-k{k}" for n, k in NEARLY_EMPTY])
def test_nearly_empty_bases(n: int, k: int) -> None:
    """Fewer rows than candidates (empty slots among them), k not a power of two: still exact."""
    rng = np.random.default_rng(n + k)
    xb = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)
    check(xb, ring_seqs(n, n // 2), rng.integers(-2, 3, size=(4, 3)).astype(np.float32), k)


def test_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks over the capacity (small `BLOCK_ELEMENTS`): each keeps its candidates, the union is
    cut again, and the answer is the same."""
    monkeypatch.setattr(knn_grouped, "BLOCK_ELEMENTS", 40 * 256)
    rng = np.random.default_rng(4)
    for make in (normal, integer_ties, duplicated_200_fold):
        xb, xq = (a.astype(np.float32) for a in make(rng, 6000, 40, 8))
        for k in (1, 64, 300):
            check(xb, ring_seqs(6000, 77), xq, k)


# -- uncertified rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 64, 1024])
def test_200_fold_duplicates_take_no_full_scan(k: int, full_scans: list[int]) -> None:
    """50,000 rows, each distinct z stored 200 times: tie groups run past the margin, so rows are
    uncertified, and the threshold pass answers them exactly without one full scan."""
    rng = np.random.default_rng(k)
    xb, xq = (a.astype(np.float32) for a in duplicated_200_fold(rng, 50_000, 8, 4))
    ok = check(xb, ring_seqs(50_000, 4321), xq, k)
    if k < 200:  # a tie group longer than the margin: the threshold pass ran
        assert not ok.all()
    assert full_scans == []


def test_past_the_cap_a_full_scan(full_scans: list[int]) -> None:
    """Near 1e-23 every float32 score is 0, so every row is within the bound of the k-th: more than
    the cap, and the full scan answers (exactly)."""
    rng = np.random.default_rng(6)
    n = knn_grouped.RESCUE_MIN_ROWS + 1000
    xb, xq = ((1e-23 * rng.normal(size=(m, 4))).astype(np.float32) for m in (n, 3))
    ok = check(xb, ring_seqs(n, 10), xq, 10)
    assert not ok.any() and full_scans == [3]
