"""k and σ resolution (`zmem_core.params`): the rules the service and a replica both follow."""

from __future__ import annotations

import numpy as np
import pytest

from zmem_core import params


def test_a_query_without_k_or_sigma_takes_the_memorys() -> None:
    assert params.asked_k(None, 64) == 64
    assert params.asked_k(5, 64) == 5
    assert params.asked_sigma(None, "auto") == params.AUTO
    assert params.asked_sigma(None, 0.5) == 0.5
    assert params.asked_sigma(2, "auto") == 2.0
    assert params.is_auto(None, "auto") and params.is_auto("auto", 1.0)
    assert not params.is_auto(None, 1.0) and not params.is_auto(0.3, "auto")


@pytest.mark.parametrize(
    ("asked", "size", "active", "answered"),
    [(64, 1000, True, 64), (64, 10, True, 10), (64, 10, False, 0), (1, 0, False, 0)],
)
def test_an_answer_holds_k_clipped_to_the_size_and_none_while_inactive(
    asked: int, size: int, active: bool, answered: int
) -> None:
    assert params.answered_k(asked, size, active) == answered


def test_the_auto_window_moves_once_per_tenth_of_capacity_and_at_powers_of_two_before() -> None:
    capacity = 50_000
    boundaries = {params.auto_sigma_window(newest, capacity)[0] for newest in range(1, 20_001)}
    assert sorted(boundaries) == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
        2048,
        4096,
        5000,
        10000,
        15000,
        20000,
    ]
    boundary, low = params.auto_sigma_window(123_456, capacity)
    assert (boundary, low) == (120_000, 75_000)
    # Until the next boundary, FIFO evicts only rows at or below `low`: the window stays held.
    for newest in range(boundary, boundary + capacity // 10):
        assert params.auto_sigma_window(newest, capacity) == (boundary, low)
        assert newest - capacity < low  # the oldest row held is newest - capacity + 1 ≤ low + 1


def test_the_auto_sample_is_seeded_sorted_and_bounded() -> None:
    small = params.auto_sigma_sample(10)
    assert small.tolist() == list(range(10))
    big = params.auto_sigma_sample(50_000)
    assert len(big) == params.AUTO_SIGMA_SAMPLE and (np.diff(big) > 0).all()
    assert np.array_equal(big, params.auto_sigma_sample(50_000))
    assert params.auto_sigma_k(64, 10) == 9 and params.auto_sigma_k(64, 1000) == 64


def test_sigma_from_the_kth_distances() -> None:
    assert params.sigma_from_kth(np.array([1.0, 3.0], np.float32)) == pytest.approx(np.sqrt(2.0))
    assert params.sigma_from_kth(np.zeros(5)) == params.INACTIVE_SIGMA  # all duplicates
    assert params.sigma_from_kth(np.array([1.0, np.nan])) == params.INACTIVE_SIGMA
