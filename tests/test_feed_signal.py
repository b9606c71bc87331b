"""Wake-ups of the changes feed's long polls are coalesced: many changes, one wake-up."""

from __future__ import annotations

import asyncio
import threading
import time

from zmem_service.feed import MAX_WAKE_INTERVAL, WAKE_INTERVAL, ChangeSignal, wake_interval


def test_the_interval_grows_with_the_polls_waiting_and_is_bounded() -> None:
    assert wake_interval(0) == wake_interval(1) == WAKE_INTERVAL
    assert WAKE_INTERVAL < wake_interval(50) < wake_interval(100) < MAX_WAKE_INTERVAL
    assert wake_interval(10_000) == MAX_WAKE_INTERVAL


def test_changes_from_another_thread_join_one_wake_up() -> None:
    async def main() -> tuple[int, float, bool]:
        signal = ChangeSignal()
        signal.bind(asyncio.get_running_loop())
        wakes = 0
        with signal.watch("m") as event:
            t0 = time.monotonic()
            writer = threading.Thread(target=lambda: [signal.changed("m") for _ in range(200)])
            writer.start()
            await signal.wait(event, 5)
            woke_after = time.monotonic() - t0
            wakes += event.is_set()
            writer.join()
        await asyncio.sleep(2 * WAKE_INTERVAL)  # the changes that came after the wake-up: one more
        with signal.watch("m") as later:
            await signal.wait(later, 3 * MAX_WAKE_INTERVAL)
            quiet = not later.is_set()
        return wakes, woke_after, quiet

    wakes, woke_after, quiet = asyncio.run(main())
    assert wakes == 1 and WAKE_INTERVAL * 0.5 <= woke_after < 1.0
    assert quiet  # every change was answered by the wake-ups before: nothing left to wake for
