"""Busy-waiting, where a core would otherwise sit idle: the policy the client and the service share.

A process that sleeps on a socket pays for waking up when the data come: on a virtual
machine that was measured at 0.15–0.2 ms per wake-up (the wake-up itself, and the caches
it left cold), a quarter of a small query's whole time. Polling instead keeps the core
awake, at the price of that core's time while waiting: worth it only on a core that no
other process wants. The client polls for a query's answer (`zmem_client._transport`),
the service's event loop for the next request after a query (`zmem_service.http.busy`).

Two measures say whether the core is free. Where Linux tells it
(`/proc/thread-self/schedstat`), the time the polling thread spent ready to run but
waiting for a core, read every CHECK_EVERY seconds: more than WAIT_SHARE of that time
(processes sharing too few cores) stops polling until the next reading says otherwise.
And each spell of polling measures itself: the thread's CPU time over the spell's wall
time. A spell that got less than SHARE of its core means other processes were scheduled
on it, another thread held the interpreter, or a CPU quota throttled this one.
POOR_SPELLS such spells in a row stop polling for a while: BACKOFF seconds, doubled
after each further poor spell up to MAX_BACKOFF, back to BACKOFF after a spell that had
its core (a lone poor spell, a moment's contention, changes nothing). Workers and a
service that share too few cores so hardly poll, and never each other out for long.
"""

from __future__ import annotations

import math
import threading
import time

SHARE = 0.8
"""A spell that got less than this share of its core means the core is wanted elsewhere."""
POOR_SPELLS = 3
"""Poor spells in a row that stop polling."""
BACKOFF = 0.5
"""Seconds without polling after such a spell (doubled after each further one)."""
MAX_BACKOFF = 60.0
MIN_SPELL = 200e-6
"""Spells shorter than this say nothing about the core (the clocks' own noise)."""
CHECK_EVERY = 0.5
"""Seconds between two readings of the thread's wait for a core."""
WAIT_SHARE = 0.1
"""More of the time than this spent waiting for a core: the cores are shared too thinly."""
SCHEDSTAT = "/proc/thread-self/schedstat"


def runqueue_wait() -> float | None:
    """Seconds the calling thread has spent ready to run but waiting for a core (None where
    the platform doesn't say)."""
    try:
        with open(SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class BusyWait:
    """How long to poll before sleeping: `seconds` (0: never), while the core proves free.

    `limit()` is the polling time for the next wait (0 while backed off), called by the
    thread that would poll; `spell(wall, cpu)` reports a spell's wall and CPU seconds
    (`time.monotonic`, `time.thread_time`). `backoffs` counts the times polling stopped.
    """

    def __init__(self, seconds: float, name: str = "busy_wait") -> None:
        if not 0 <= seconds <= 1:  # NaN fails too
            raise ValueError(f"{name} must be in [0, 1] seconds, got {seconds!r}")
        self.seconds = float(seconds)
        self.off_until = -math.inf
        self.spells = 0
        self.backoffs = 0  # times polling stopped for a while
        self._poor = 0  # poor spells in a row
        self._backoff = BACKOFF
        self._checked = -math.inf
        self._reading: tuple[int, float, float] | None = None  # (thread, monotonic, runqueue wait)

    def limit(self) -> float:
        if self.seconds == 0:
            return 0.0
        now = time.monotonic()
        if now - self._checked >= CHECK_EVERY:
            self._check(now)
        return 0.0 if now < self.off_until else self.seconds

    def _check(self, now: float) -> None:
        """Stop polling until the next reading if this thread waited for a core too long since
        the last one (a reading from another thread only starts anew)."""
        self._checked = now
        waited = runqueue_wait()
        if waited is None:
            return
        me, last = threading.get_ident(), self._reading
        self._reading = (me, now, waited)
        if last is None or last[0] != me or now <= last[1]:
            return
        if (waited - last[2]) / (now - last[1]) > WAIT_SHARE and now >= self.off_until:
            self.backoffs += 1
            self.off_until = now + CHECK_EVERY

    def spell(self, wall: float, cpu: float) -> None:
        self.spells += 1
        if wall < MIN_SPELL:
            return
        if cpu >= SHARE * wall:
            self._poor, self._backoff = 0, BACKOFF
            return
        self._poor += 1
        if self._poor < POOR_SPELLS:
            return
        self.backoffs += 1
        self.off_until = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, MAX_BACKOFF)
