"""The busy-waiting policy: poll while the core proves free, back off when it doesn't."""

from __future__ import annotations

import pytest

from zmem_core import busy
from zmem_core.busy import BusyWait


def test_polling_stops_for_a_while_after_spells_that_did_not_get_their_core(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(busy.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(busy, "runqueue_wait", lambda: None)  # the spells' own measure only
    wait = BusyWait(0.002)
    assert wait.limit() == 0.002
    wait.spell(0.0001, 0.0)  # too short to say anything
    for _ in range(3):
        for _ in range(busy.POOR_SPELLS - 1):  # a moment's contention changes nothing
            wait.spell(0.002, 0.001)
        wait.spell(0.002, 0.0019)  # had its core
    assert wait.limit() == 0.002 and (wait.spells, wait.backoffs) == (3 * busy.POOR_SPELLS + 1, 0)

    def poor_until_it_stops(pause: float) -> None:
        wait.spell(0.002, 0.001)
        assert wait.limit() == 0
        now[0] += pause - 0.01
        assert wait.limit() == 0
        now[0] += 0.02
        assert wait.limit() == 0.002  # one spell tries again

    for _ in range(busy.POOR_SPELLS - 1):
        wait.spell(0.002, 0.001)
    poor_until_it_stops(busy.BACKOFF)
    poor_until_it_stops(2 * busy.BACKOFF)  # still wanted elsewhere: twice as long
    for _ in range(20):  # ... up to the longest pause
        wait.spell(0.002, 0.0)
    poor_until_it_stops(busy.MAX_BACKOFF)
    wait.spell(0.002, 0.002)  # a spell that had its core: polling goes on, and pauses start short again
    for _ in range(busy.POOR_SPELLS - 1):
        wait.spell(0.002, 0.001)
    poor_until_it_stops(busy.BACKOFF)


def test_polling_stops_while_the_thread_waits_for_a_core(monkeypatch) -> None:
    now, waited = [100.0], [7.0]
    monkeypatch.setattr(busy.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(busy, "runqueue_wait", lambda: waited[0])
    wait = BusyWait(0.002)
    assert wait.limit() == 0.002  # the first reading: nothing to compare with yet

    def later(seconds: float, waiting: float) -> float:
        now[0] += seconds
        waited[0] += waiting
        return wait.limit()

    assert later(busy.CHECK_EVERY, 0.01) == 0.002  # 2% of the time waiting for a core: free
    assert later(busy.CHECK_EVERY, 0.3) == 0 and wait.backoffs == 1  # 60%: the cores are shared
    assert later(busy.CHECK_EVERY / 2, 0) == 0  # until the next reading
    assert later(busy.CHECK_EVERY / 2, 0.2) == 0 and wait.backoffs == 2  # still shared
    assert later(busy.CHECK_EVERY, 0.0) == 0.002  # free again
    assert later(0.01, 0.01) == 0.002  # between readings, nothing is read


def test_the_runqueue_wait_is_read_where_linux_tells_it() -> None:
    import os

    waited = busy.runqueue_wait()
    if os.path.exists(busy.SCHEDSTAT):
        assert waited is not None and waited >= 0
    else:
        assert waited is None


def test_zero_never_polls_and_a_limit_out_of_range_is_refused() -> None:
    assert BusyWait(0).limit() == 0
    for bad in (-0.001, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="busy_poll"):
            BusyWait(bad, "busy_poll")
