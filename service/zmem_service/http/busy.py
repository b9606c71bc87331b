"""After answering a query the event loop polls for the next request for a moment, rather than
sleeping, while its core is free (`zmem_core.busy`): a training loop's next query then
finds the loop awake and its caches warm. Measured on a 2-core VM, a B=1 `risk()` round
trip fell by ~0.14 ms (`benchmarks/bench_risk`).

The loop polls by keeping a callback scheduled (`call_soon`): it then waits for sockets
with a zero timeout. A spell starts when the last query in flight is answered and ends
when the time is up, when a query comes in (its answer starts the next spell: a loaded
service, with queries always in flight, hardly polls), when the index thread has queued
work (a polling loop would take the interpreter from it), or, for a while, when spells
did not get their core.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from zmem_core.busy import BusyWait


class BusyPoll:
    """`enter()` as a query starts and `leave()` as its answer is sent; `seconds` and
    `backoffs` count the polling (/metrics). `quiet()`: whether the rest of the service has
    nothing queued."""

    def __init__(self, wait: BusyWait, quiet: Callable[[], bool] = lambda: True) -> None:
        self.wait = wait
        self.quiet = quiet
        self.seconds = 0.0  # wall time spent polling, all spells
        self.in_flight = 0  # queries between enter() and leave()
        self._until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = self._cpu = 0.0

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.kick()

    def __enter__(self) -> None:  # `with busy:` around a query, its answer's sending included
        self.enter()

    def __exit__(self, *exc: object) -> None:
        self.leave()

    @property
    def backoffs(self) -> int:
        return self.wait.backoffs

    def kick(self) -> None:
        """Poll until `limit` seconds from now (the running spell, or a new one)."""
        limit = self.wait.limit()
        if not limit:
            return
        now = time.monotonic()
        self._until = now + limit
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._start, self._cpu = now, time.thread_time()
            self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        if now < self._until and self.in_flight == 0 and self.quiet():
            self._loop.call_soon(self._tick)
            return
        self._loop = None
        wall = now - self._start
        self.seconds += wall
        self.wait.spell(wall, time.thread_time() - self._cpu)
