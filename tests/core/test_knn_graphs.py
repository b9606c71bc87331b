"""CUDA graphs for the grouped kNN (`zmem_core.knn_graphs`): where capture fails (forced here on CPU
tensors) the search falls back to eager, says so once in the log, and answers the same; on CUDA
(where present) replays equal the eager search, across new data, growth and batch sizes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from zmem_core.knn import F32_ROUNDOFF
from zmem_core.knn_graphs import MAX_ROWS, GraphedSearch, rows_bucket
from zmem_core.knn_grouped import GroupedBase, grouped_knn, prepare_query
from zmem_core.knn_torch import unit_roundoff

from ..knn_oracle import ring_seqs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def filled(device: str, n: int, d: int, seed: int = 0) -> GroupedBase:
    rng = np.random.default_rng(seed)
    base = GroupedBase(d, torch.device(device))
    base.grow(n)
    x = torch.from_numpy(rng.integers(-3, 4, size=(n, d)).astype(np.float32)).to(device)
    base.write(torch.arange(n, device=device), x, torch.from_numpy(ring_seqs(n, n // 3)).to(device))
    return base


def queries(device: str, b: int, d: int, seed: int) -> torch.Tensor:
    q = np.random.default_rng(seed).integers(-3, 4, size=(b, d)).astype(np.float64)
    return torch.from_numpy(prepare_query(q)).to(device)


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_rows_buckets() -> None:
    assert [rows_bucket(b) for b in (1, 2, 3, 5, 200, 256)] == [1, 2, 4, 8, 256, 256]
    with pytest.raises(ValueError, match="query rows"):
        rows_bucket(MAX_ROWS + 1)


def test_a_failed_capture_falls_back_to_eager_once(caplog: pytest.LogCaptureFixture) -> None:
    """On CPU tensors a capture cannot succeed: the first search logs why, once, and every search
    answers as the eager one does."""
    base = filled("cpu", 3000, 5)
    graphs = GraphedSearch(enabled=True)
    with caplog.at_level(logging.WARNING, logger="zmem.knn"):
        for seed, (b, k) in enumerate([(1, 10), (7, 64), (256, 1)]):
            q = queries("cpu", b, 5, seed)
            got, u = graphs.search(base, q, k, 3000)
            assert u == unit_roundoff(base.device)
            same(got, grouped_knn(base, q, k, 3000, roundoff=u))
    assert graphs.failed and not graphs.graphed
    assert len([r for r in caplog.records if "capture failed" in r.message]) == 1


def test_graphs_off_never_capture(caplog: pytest.LogCaptureFixture) -> None:
    base = filled("cpu", 500, 3)
    graphs = GraphedSearch(enabled=False)
    with caplog.at_level(logging.WARNING, logger="zmem.knn"):
        q = queries("cpu", 4, 3, 1)
        same(graphs.search(base, q, 5, 500)[0], grouped_knn(base, q, 5, 500, roundoff=F32_ROUNDOFF))
    assert graphs.failed is None and not caplog.records


@CUDA
def test_replays_equal_the_eager_search() -> None:
    """New query data, new rows written in place, a growth (new tensors: recaptured), several
    row buckets and k: every replay equals the eager search; a replay makes no host sync."""
    base = filled("cuda", 20_000, 8)
    graphs = GraphedSearch(enabled=True)
    for step in range(3):
        for b, k in ((1, 64), (3, 64), (256, 10), (1, 1)):
            q = queries("cuda", b, 8, 10 * step + b)
            got, u = graphs.search(base, q, k, base.capacity)
            assert u == F32_ROUNDOFF and graphs.failed is None
            same(tuple(t.clone() for t in got), grouped_knn(base, q, k, base.capacity, roundoff=F32_ROUNDOFF))
        rows = torch.arange(100, device="cuda") + step * 100
        base.write(rows, torch.full((100, 8), float(step + 5), device="cuda"), rows + 10**6)
        if step == 1:
            base.grow(base.capacity + 1000)
            base.empty(20_000, base.capacity)
    q = queries("cuda", 1, 8, 99)
    graphs.search(base, q, 64, 20_000)  # captured above for this shape: a pure replay
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphs.search(base, q, 64, 20_000)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_graphs_are_kept_per_shape_up_to_a_bound() -> None:
    from zmem_core import knn_graphs

    base = filled("cuda", 5000, 4)
    graphs = GraphedSearch(enabled=True)
    for k in range(1, knn_graphs.MAX_GRAPHS + 5):
        graphs.search(base, queries("cuda", 1, 4, k), k, 5000)
    assert len(graphs._graphs) == knn_graphs.MAX_GRAPHS and graphs.failed is None
