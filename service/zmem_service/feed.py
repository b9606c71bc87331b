"""A memory's changes feed: its pages, and the signal that wakes long polls for them.

A page is cut from the ring by `page`, which its owning `Memory` calls with its lock held
(`Memory.changes`, on the index thread: resolving `sigma: "auto"` for the page may search).
`ChangeSignal` wakes the long polls waiting on the event loop when the writer has applied
rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .ring import Columns, Ring
from .settings import MemorySettings


@dataclass
class Changes:
    """A page of a memory's changes feed (see `Memory.changes`)."""

    generation: str
    reset: bool
    next_seq: int
    oldest_seq: int | None
    size: int
    settings: dict[str, Any]
    sigma_auto: float | None
    rows: Columns
    complete: bool  # the page reaches the newest row

    @property
    def meta(self) -> dict[str, Any]:
        n = len(self.rows)
        return {
            "generation": self.generation,
            "reset": self.reset,
            "next_seq": self.next_seq,
            "oldest_seq": self.oldest_seq,
            "size": self.size,
            "last_seq": int(self.rows.seq[-1]) if n else None,
            "settings": self.settings,
            "sigma_auto": self.sigma_auto,
            "complete": self.complete,
        }


def page(
    ring: Ring | None,
    generation: str,
    next_seq: int,
    settings: MemorySettings,
    after: int,
    asked_generation: str | None,
    limit: int,
) -> Changes:
    """The rows of `ring` with seq > `after`, oldest first, at most `limit`, without
    `sigma_auto` (the memory adds it). Reads the ring: its owner's lock held.

    When `asked_generation` names another incarnation than `generation`, or rows after
    `after` have been evicted, the page is a reset: it starts at the oldest row held."""
    dumped = settings.model_dump()
    other = asked_generation not in (None, generation)
    if ring is None or ring.size == 0:
        reset = other or after >= next_seq
        return Changes(
            generation,
            reset,
            next_seq,
            None,
            0,
            dumped,
            None,
            Columns.empty(settings.z_dim or 0),
            complete=True,
        )
    oldest = int(ring.column("seq")[ring.slots(0, 1)[0]])
    reset = other or after < oldest - 1 or after >= next_seq
    start = ring.position_after(0 if reset else after)
    rows = ring.rows(ring.slots(start, start + limit))
    complete = start + limit >= ring.size
    return Changes(generation, reset, next_seq, oldest, ring.size, dumped, None, rows, complete)


GATHER_SECONDS = 0.005
"""A long poll woken by a write waits this long for more rows before answering."""


class _Watch:
    """The event the next change of one memory sets, and how many long polls hold it."""

    __slots__ = ("event", "holders")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.holders = 0


class ChangeSignal:
    """Wakes the long polls of a memory's changes feed when the writer has applied rows.

    `changed` may be called from any thread; waiting happens on the event loop. An event
    is kept only while a poll holds it (`watch`), so the names kept are those of memories
    someone is polling right now, never every name ever asked for."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, _Watch] = {}
        self.closed = False

    def __len__(self) -> int:
        """How many names have an event kept (those polled right now)."""
        return len(self._events)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def changed(self, name: str) -> None:
        if self._loop is not None and name in self._events:
            self._loop.call_soon_threadsafe(self._wake, name)

    def _wake(self, name: str) -> None:
        watch = self._events.pop(name, None)
        if watch is not None:
            watch.event.set()

    @contextlib.contextmanager
    def watch(self, name: str) -> Iterator[asyncio.Event]:
        """The event the next change of `name` sets, held for the block (event loop only).

        Enter it *before* reading the memory, so a change that lands between the read and
        the wait still wakes the waiter; check the name first, as the event is kept under
        it until the last holder leaves."""
        watch = self._events.get(name)
        if watch is None:
            watch = self._events[name] = _Watch()
        watch.holders += 1
        try:
            yield watch.event
        finally:
            watch.holders -= 1
            if not watch.holders and self._events.get(name) is watch:
                del self._events[name]

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Return when `event` is set (a change, or shutdown) or after `timeout` seconds."""
        if self.closed or timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def close(self) -> None:
        """Wake every waiter now (shutdown); later waits return at once."""
        self.closed = True
        for name in list(self._events):
            self._wake(name)

    def close_soon(self) -> None:
        """`close` from any thread or a signal handler: the server is beginning to exit, and
        long polls must answer before it waits for open requests to finish."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close)
        else:
            self.close()
