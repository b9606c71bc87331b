"""The replica's GPU search (the core's grouped kNN over the mirror's window) run on CPU
tensors: the window starts and ends inside groups as the ring slides, and every answer
equals the brute force; rows it cannot certify (a huge group of equal z's) are counted,
never passed off silently. Op counts: the search is the core's, no host reads."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from zmem_client._replica import Replica

from . import test_replica
from .core.test_knn_grouped import OpLog
from .test_replica import FakeFeed, assert_agrees, rows

feed = test_replica.feed  # the fake changes feed's fixtures
make_replica = test_replica.make_replica


def grouped(rep: Replica) -> Replica:
    rep._mirror.grouped = True  # the path a CUDA replica takes, here on CPU tensors
    return rep


def test_the_window_slides_through_groups_and_every_answer_is_exact(
    feed: FakeFeed, make_replica: Callable[..., Replica]
) -> None:
    rng = np.random.default_rng(0)
    feed.create(capacity=75, min_size=5, k=8)
    feed.append(*rows(rng, 40))
    rep = grouped(make_replica())
    q = torch.from_numpy(rng.standard_normal((4, 4))).double()
    assert_agrees(rep, feed, q, 8, 1.0)
    for n in (3, 31, 33, 64, 75, 1, 200, 17):  # windows that start and end anywhere in a group
        feed.append(*rows(rng, n))
        rep.sync()
        st = rep.state
        assert st.start % 32 or (st.start + st.size) % 32 or n in (64,)  # edges inside groups, mostly
        assert_agrees(rep, feed, q, 8, 1.0)
        assert_agrees(rep, feed, q.float(), 75, 0.7, k=200, sigma=0.7)  # every row a candidate
        assert_agrees(rep, feed, q, 1, 0.5, k=1, sigma=0.5)
    assert rep.uncertified == 0


def test_a_huge_tie_group_is_counted_as_uncertified(
    feed: FakeFeed, make_replica: Callable[..., Replica], caplog: pytest.LogCaptureFixture
) -> None:
    """Counted, and said once in the log by the feed thread (which reads the count without
    waiting for the device) even if nobody reads the count."""
    feed.create(capacity=400, min_size=5, k=8)
    z = np.ones((300, 4), np.float32)  # 300 equal z's: far past the candidates' margin
    feed.append(z, np.linspace(0, 1, 300).astype(np.float32))
    rep = grouped(make_replica())
    rep.sync()
    with caplog.at_level(logging.WARNING, logger="zmem_client"):
        rep.risk_and_size(torch.ones(2, 4))
        for _ in range(3):  # pages after the query: the feed thread checks after each
            feed.append(np.zeros((1, 4), np.float32), np.zeros(1, np.float32))
            rep.sync()
        said = [r.getMessage() for r in caplog.records if "could not certify" in r.getMessage()]
        assert len(said) == 1 and "2 query rows" in said[0]
        assert rep.uncertified == 2
    assert sum("could not certify" in r.getMessage() for r in caplog.records) == 1


def test_the_search_reads_nothing_back(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    """No op that makes a CUDA stream wait (`nonzero`, `item`) in the search: the core's grouped
    kNN plus the query's preparation, the edge masks and the count of uncertified rows."""
    rng = np.random.default_rng(1)
    feed.create(capacity=5000, min_size=5, k=64)
    feed.append(*rows(rng, 3000))
    rep = grouped(make_replica())
    rep.sync()
    st = rep.state
    with OpLog() as log:
        rep._mirror.search(st, torch.zeros(1, 4), 64)
    names = [name for name, _, _ in log.ops]
    print(f"replica search B=1: {len(names)} non-view ops: {' '.join(names)}")
    assert not {"nonzero", "item", "_local_scalar_dense"} & set(names), names
    assert len(names) <= 45, names
