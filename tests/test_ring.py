"""The FIFO ring equals `collections.deque(maxlen=capacity)` over arrival order (SPEC §1).

Every column of a row is a function of its seq, so comparing seqs with the deque and
then checking each column against its seq shows that growth and wrap-around keep the
data in place.
"""

from __future__ import annotations

import collections

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from zmem_service.ring import FLOAT_FIELDS, Columns, Ring


def make_batch(z_dim: int, first_seq: int, n: int) -> Columns:
    """Episodes first_seq … first_seq+n-1, each column derived from the seq."""
    cols = Columns.empty(z_dim, n)
    seq = np.arange(first_seq, first_seq + n, dtype=np.int64)
    cols.seq[:] = seq
    cols.z[:] = seq[:, None] * 10 + np.arange(z_dim)[None, :]  # exact in float32 for seq < 2**20
    for j, name in enumerate((*FLOAT_FIELDS, "risk_target")):
        getattr(cols, name)[:] = (seq % 97) + j / 10
    cols.ts[:] = 1.7e9 + seq / 8
    cols.id[:] = [f"id-{s}" if s % 3 else None for s in seq]
    cols.worker[:] = [f"w{s % 5}" for s in seq]
    return cols


def assert_rows_match_seqs(cols: Columns, z_dim: int) -> None:
    """Each row holds exactly what `make_batch` wrote for its seq."""
    expected = make_batch(z_dim, 0, 0)
    if len(cols):
        seq = cols.seq
        lo = int(seq.min())
        full = make_batch(z_dim, lo, int(seq.max()) - lo + 1)
        expected = full.take(seq - lo)
    for name in Columns.NAMES:
        got, want = getattr(cols, name), getattr(expected, name)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if got.dtype == object:
            assert list(got) == list(want), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def run_against_deque(capacity: int, z_dim: int, sizes: list[int]) -> None:
    ring = Ring(z_dim, capacity)
    ref: collections.deque[int] = collections.deque(maxlen=capacity)
    assert ring.size == 0 and ring.allocated == 0  # nothing preallocated
    next_seq = 1
    for n in sizes:
        # evicted_by(n): exactly the stored items that the deque drops when n more arrive
        survivors = set((list(ref) + list(range(next_seq, next_seq + n)))[-capacity:])
        dropped = [s for s in ref if s not in survivors]
        gone = ring.evicted_by(n)
        assert list(gone.seq) == dropped
        assert_rows_match_seqs(gone, z_dim)
        predicted, allocated_before = ring.allocation_after(n), ring.allocated

        ring.append(make_batch(z_dim, next_seq, n))
        ref.extend(range(next_seq, next_seq + n))
        next_seq += n

        assert ring.size == len(ref)
        assert ring.allocated == predicted
        assert ring.size <= ring.allocated <= capacity
        assert ring.allocated >= allocated_before  # never shrinks
        ordered = ring.ordered()
        assert list(ordered.seq) == list(ref)
        assert_rows_match_seqs(ordered, z_dim)
        # the slot-order views agree with the rows they index
        assert sorted(ring.column("seq").tolist()) == sorted(ref)
        np.testing.assert_array_equal(ring.z[ring.order()], ordered.z)
        # arrival positions without copies (the changes feed pages with them)
        np.testing.assert_array_equal(ring.slots(0, ring.size), ring.order())
        for seq in {0, next_seq - 1, *(list(ref)[:1] + list(ref)[-1:]), next_seq + 5, (next_seq + 1) // 2}:
            assert ring.position_after(seq) == sum(1 for s in ref if s <= seq)


@st.composite
def small_rings(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    capacity = draw(st.integers(1, 50))
    z_dim = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(0, 3 * capacity), max_size=25))
    return capacity, z_dim, sizes


@given(small_rings())
def test_ring_equals_deque(case: tuple[int, int, list[int]]) -> None:
    run_against_deque(*case)


@st.composite
def growing_rings(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """Capacities past the 64-slot first allocation, mostly small batches: several growth steps."""
    capacity = draw(st.integers(65, 400))
    sizes = draw(
        st.lists(st.one_of(st.integers(0, 40), st.integers(0, 3 * capacity)), min_size=1, max_size=30)
    )
    return capacity, 2, sizes


@given(growing_rings())
def test_growth_keeps_data_and_order(case: tuple[int, int, list[int]]) -> None:
    run_against_deque(*case)


@given(st.integers(1, 50), st.integers(0, 200), st.integers(0, 200))
def test_evicted_by_matches_deque(capacity: int, stored: int, n: int) -> None:
    ring = Ring(2, capacity)
    ring.append(make_batch(2, 1, stored))
    ref = collections.deque(range(1, stored + 1), maxlen=capacity)
    before = list(ref)
    ref.extend(range(stored + 1, stored + 1 + n))
    assert list(ring.evicted_by(n).seq) == [s for s in before if s not in set(ref)]


def test_growth_doubles_from_64_and_stops_at_capacity() -> None:
    ring = Ring(1, 1000)
    allocations = []
    for _ in range(100):
        ring.append(make_batch(1, ring.size + 1, 10))
        allocations.append(ring.allocated)
    assert sorted(set(allocations)) == [64, 128, 256, 512, 1000]
    assert ring.size == 1000
    assert list(ring.ordered().seq) == list(range(1, 1001))


def test_one_batch_longer_than_capacity_keeps_its_tail() -> None:
    ring = Ring(3, 5)
    ring.append(make_batch(3, 1, 2))
    ring.append(make_batch(3, 3, 12))  # seqs 3..14: only 10..14 remain
    assert list(ring.ordered().seq) == [10, 11, 12, 13, 14]
    assert_rows_match_seqs(ring.ordered(), 3)
