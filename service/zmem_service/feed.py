"""A memory's changes feed: its pages, shared by every follower at one position, and the
signal that wakes long polls for them.

A page is cut from the ring by `page`, which its owning `Memory` calls with its lock held
(`Memory.changes`, on a worker thread: it never searches, so it never waits for the index
thread; `sigma: "auto"` comes from the memory's kept value). `Pages` keeps one page per
(memory, generation, after, limit, auto) until the memory changes, computes it once for every
poller that asks meanwhile, and keeps its encoded bodies (one per format) with it.
`ChangeSignal` wakes the long polls waiting on the event loop, at most once per
`wake_interval` per memory, however many rows were applied meanwhile.

What a page says of the memory as a whole (`next_seq`, `size`, `oldest_seq`, `sigma_auto`)
is as of the page: the state it was cut from. A page's rows are a prefix of the history
after `after` of its generation, whenever and from wherever (an HTTP cache) it is served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
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
    sigma_missing: bool = False  # "auto" was wanted but no value is kept: the owner computes one
    encoded: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)
    """What the edge made of this page (its encoded bodies, one per format), shared by every
    poller the page is served to."""

    @property
    def nbytes(self) -> int:
        """Bytes the page and its encoded bodies hold."""
        rows = sum(getattr(self.rows, f).nbytes for f in ("z", "risk_target", "seq"))
        return rows + sum(len(v[0]) for v in self.encoded.values() if isinstance(v, tuple))

    def etag(self, after: int, limit: int, form: str) -> str:
        """A weak validator of the page asked for with `after` and `limit`, encoded as `form`
        (a media type): equal for pages with the same generation, reset, rows, settings, σ and
        `complete`. `next_seq`, `size` and `oldest_seq` of a page below the head are as of
        the page, so two pages with one validator may differ there: hence weak."""
        n = len(self.rows)
        last = int(self.rows.seq[-1]) if n else None
        first = int(self.rows.seq[0]) if n else None
        what = [self.generation, self.reset, after, limit, first, last, n, self.complete, self.sigma_auto]
        if self.complete:  # the tail also says where the head is
            what += [self.next_seq, self.size, self.oldest_seq]
        what += [self.settings, form]
        digest = hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=12).hexdigest()
        return f'W/"{digest}"'

    def immutable(self, asked_generation: str | None) -> bool:
        """Whether the page may be cached indefinitely: a page of the generation asked for, no
        reset, wholly below the head. Its rows are then the first `limit` rows after `after` of
        that generation's history, which never changes (the rows may be evicted later: the page
        is still a valid prefix, and the follower's next page says reset). A page asked for
        without a generation, a reset, or the tail (whose next answer grows) is not."""
        return asked_generation == self.generation and not self.reset and not self.complete

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


class Pages:
    """One page per (memory, position) shared by every poller that asks for it: computed once
    (concurrent askers await the same computation), kept until the memory changes.

    Pages are kept by memory, for one state of it (its `feed_token`): a write drops them
    all at once. At most `max_memories` memories' pages are kept (the least recently asked
    for dropped first), and per memory at most `max_pages` pages and `max_bytes` bytes of
    rows and encoded bodies; a page past those is shared by those asking meanwhile, not
    kept. Event loop only."""

    def __init__(self, max_memories: int = 64, max_pages: int = 1024, max_bytes: int = 64 * 2**20) -> None:
        self.max_memories = max_memories
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self.computed = 0  # pages computed (not served from here): what followers cost
        self._kept: collections.OrderedDict[Hashable, _Kept] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(kept.pages) for kept in self._kept.values())

    async def get(
        self, memory: Hashable, position: Hashable, token: Hashable, compute: Callable[[], Awaitable[Changes]]
    ) -> Changes:
        """The page of `memory` at `position` while the memory is at `token` (what changes it:
        writes, a new value of sigma "auto"); `compute()` makes it otherwise, in a task of its
        own that every asker awaits (one leaving early cancels nothing)."""
        kept = self._kept.get(memory)
        if kept is None or kept.token != token:
            kept = self._kept[memory] = _Kept(token)
            while len(self._kept) > self.max_memories:
                self._kept.popitem(last=False)
        self._kept.move_to_end(memory)
        task = kept.pages.get(position)
        if task is None or not _usable(task):
            task = asyncio.ensure_future(compute())
            self.computed += 1
            if len(kept.pages) < self.max_pages:
                kept.pages[position] = task
                task.add_done_callback(lambda done: kept.settled(position, done, self.max_bytes))
        return await asyncio.shield(task)


class _Kept:
    """The pages kept of one memory at one state."""

    __slots__ = ("bytes", "pages", "token")

    def __init__(self, token: Hashable) -> None:
        self.token = token
        self.pages: dict[Hashable, asyncio.Future[Changes]] = {}
        self.bytes = 0

    def settled(self, position: Hashable, task: asyncio.Future[Changes], max_bytes: int) -> None:
        if self.pages.get(position) is not task:
            return
        if not _usable(task):
            del self.pages[position]
            return
        self.bytes += task.result().nbytes
        if self.bytes > max_bytes:
            del self.pages[position]


def _usable(task: asyncio.Future[Changes]) -> bool:
    return not task.done() or (not task.cancelled() and task.exception() is None)


WAKE_INTERVAL = 0.01
"""Seconds from a change to the wake-up of the long polls waiting for it, with few of them."""
WAKE_PER_POLL = 0.002
"""Seconds the wake-up interval grows per long poll waiting on the memory: woken pollers each
get an answer, so wake-ups come at most every `WAKE_PER_POLL × pollers` seconds, and the
answers they cost stay under 1 / WAKE_PER_POLL = 500 a second however many follow."""
MAX_WAKE_INTERVAL = 0.25
"""The longest wake-up interval: a follower sees a change within about this long."""


def wake_interval(polls: int) -> float:
    """Seconds from a change to the wake-up it causes, with `polls` long polls waiting: the
    changes meanwhile join the same wake-up (and the same page)."""
    return min(MAX_WAKE_INTERVAL, max(WAKE_INTERVAL, polls * WAKE_PER_POLL))


class _Watch:
    """The event the next change of one memory sets, and how many long polls hold it."""

    __slots__ = ("event", "holders")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.holders = 0


class ChangeSignal:
    """Wakes the long polls of a memory's changes feed when the writer has applied rows.

    `changed` may be called from any thread; waiting happens on the event loop. Wake-ups
    are coalesced: a change schedules one `wake_interval` later (unless one is scheduled
    already), and every change until then joins it, so pollers wake at most once per
    interval per memory, together, and ask for the same page. An event is kept only while
    a poll holds it (`watch`), so the names kept are those of memories someone is polling
    right now, never every name ever asked for."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, _Watch] = {}
        self._scheduled: dict[str, asyncio.TimerHandle] = {}  # names with a wake-up to come
        self.closed = False

    def __len__(self) -> int:
        """How many names have an event kept (those polled right now)."""
        return len(self._events)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def changed(self, name: str) -> None:
        """`name` has changed: its pollers wake within `wake_interval` (any thread)."""
        if self._loop is not None and name not in self._scheduled:  # a racy read: `_schedule` checks
            self._loop.call_soon_threadsafe(self._schedule, name)

    def pending(self, name: str) -> bool:
        """Whether a change of `name` has a wake-up to come (event loop only)."""
        return name in self._scheduled

    def _schedule(self, name: str) -> None:
        if name in self._scheduled or self._loop is None:
            return
        watch = self._events.get(name)
        delay = wake_interval(watch.holders if watch is not None else 0)
        self._scheduled[name] = self._loop.call_later(delay, self._wake, name)

    def _wake(self, name: str) -> None:
        self._scheduled.pop(name, None)
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
        for handle in self._scheduled.values():
            handle.cancel()
        self._scheduled.clear()
        for name in list(self._events):
            self._wake(name)

    def close_soon(self) -> None:
        """`close` from any thread or a signal handler: the server is beginning to exit, and
        long polls must answer before it waits for open requests to finish."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close)
        else:
            self.close()
