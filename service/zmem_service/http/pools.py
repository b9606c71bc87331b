"""Admission: the bounded pools and slots that large bodies and answers need, shared fairly.

Large bodies are decoded, and large answers encoded, on thread pools of their own
(`Pool`); large answers then hold one of the answer slots (`Slots`) until their
last byte is handed over, which bounds the memory that answers nobody reads can pin.
Every slot is taken before the work it bounds (a body's slot before the body is read,
a search's answer slot before the search), and nobody can keep them: one client (a peer
address) holds at most half of a kind (of those a read token can reach), and a holder
that falls behind the minimum transfer rate loses its slot (`exchange.read_body`,
`streaming.SentInChunks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import Unavailable

T = TypeVar("T")


class Shares:
    """`slots` things of one kind, at most `per_peer` of them held by one peer (on the event loop)."""

    def __init__(self, slots: int, per_peer: int | None = None) -> None:
        self.slots = slots
        self.per_peer = per_peer if per_peer is not None else max(1, slots // 2)
        self.held: Counter[str] = Counter()
        self.taken = 0

    def free_for(self, peer: str) -> bool:
        return self.taken < self.slots and self.held[peer] < self.per_peer

    def take(self, peer: str) -> None:
        self.taken += 1
        self.held[peer] += 1

    def give(self, peer: str) -> None:
        self.taken -= 1
        self.held[peer] -= 1
        if self.held[peer] <= 0:
            del self.held[peer]


class Pool:
    """A thread pool of its own for one kind of work, bounded: `workers` threads and at most
    `slots` jobs admitted at once (running, queued or reading their body), `per_peer` of them
    for one peer (half unless said); past that, after a short wait (`Slots`), a 503."""

    def __init__(self, name: str, workers: int, slots: int, per_peer: int | None = None) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"zmem-{name}")
        self.slots = Slots(slots, per_peer, busy=f"too many large requests are {name}; retry shortly")

    @asynccontextmanager
    async def admitted(self, peer: str) -> AsyncIterator[Ticket]:
        """A slot while the block runs; its ticket transfers (a body arriving) until `work()`."""
        ticket = await self.slots.take(peer, working=False)
        try:
            yield ticket
        finally:
            ticket.release()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread (call inside `admitted()`)."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Ticket:
    """One slot held for `peer`, working (its holder computes: a search, a decode, an encode) or
    transferring (its holder waits on a client: a body arriving, an answer being read).
    `release` gives it back once, whatever calls it, from any thread (a ticket dropped
    unreleased is released when it is collected, wherever that happens)."""

    def __init__(self, slots: Slots, peer: str, working: bool) -> None:
        self._slots: Slots | None = slots
        self._loop = asyncio.get_running_loop()  # the slots live on this loop
        self.peer = peer
        self.working = False
        if working:
            self.work()

    def work(self) -> None:
        if self._slots is not None and not self.working:
            self.working = True
            self._slots.working += 1

    def transfer(self) -> None:
        if self._slots is not None and self.working:
            self.working = False
            self._slots.working -= 1

    def progressed(self) -> None:
        """The client took more of a transfer (an answer's chunk)."""
        if self._slots is not None:
            self._slots.progress = time.monotonic()

    def release(self) -> None:
        if self._slots is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self._loop:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the slot
                self._loop.call_soon_threadsafe(self.release)
            return
        self.transfer()
        slots, self._slots = self._slots, None
        slots.give(self.peer)

    def __del__(self) -> None:  # a request cut short: the slot comes back
        self.release()


class Slots:
    """At most `slots` things of one kind held at once, `per_peer` of them (half unless said) by
    one peer. A request waits for a slot while the holders get on: as long as one of them is
    working (a search, a decode: it gives its slot back when done), else up to `wait` seconds
    after the later of its arrival and the last sign of progress (a slot given back, a chunk
    of an answer taken by its client); `max_wait` seconds in all, with at most `4 × slots`
    requests waiting; then a 503 (`busy`). Slots held by transfers that don't move (answers
    nobody reads, bodies that stall) are not waited for long."""

    WAIT = 0.25
    MAX_WAIT = 5.0

    def __init__(
        self,
        slots: int,
        per_peer: int | None = None,
        *,
        wait: float = WAIT,
        max_wait: float = MAX_WAIT,
        busy: str = "too many large answers are being sent; retry shortly",
    ) -> None:
        self.shares = Shares(slots, per_peer)
        self.wait = wait
        self.max_wait = max_wait
        self.busy = busy
        self.working = 0  # tickets held by work in progress
        self.progress = float("-inf")  # monotonic time of the last slot given back or chunk taken
        self._waiters: list[asyncio.Future[None]] = []

    async def take(self, peer: str, *, working: bool = True) -> Ticket:
        """A slot for `peer`, its ticket `working` or (False) transferring."""
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        while not self.shares.free_for(peer):
            now = time.monotonic()
            until = start + self.max_wait
            if not self.working:
                until = min(until, max(start, self.progress) + self.wait)
            left = until - now
            if left <= 0 or len(self._waiters) >= 4 * self.shares.slots:
                raise Unavailable(self.busy)
            woken: asyncio.Future[None] = loop.create_future()
            self._waiters.append(woken)
            try:
                await asyncio.wait_for(woken, min(left, self.wait))  # then look at progress again
            except TimeoutError:
                pass
            finally:
                self._waiters.remove(woken)
        return self.force(peer, working=working)

    def force(self, peer: str, *, working: bool = True) -> Ticket:
        """A slot even past the bound: for an answer already computed, which is never thrown away
        (its size was estimated before the search, and the memory grew meanwhile)."""
        self.shares.take(peer)
        return Ticket(self, peer, working)

    def give(self, peer: str) -> None:
        self.shares.give(peer)
        self.progress = time.monotonic()
        for woken in self._waiters:  # each looks again; those still over a bound wait on
            if not woken.done():
                woken.set_result(None)


@dataclass
class Codecs:
    """The service's pools for bodies (decode: reads; decode_writes: episodes) and answers
    (encode, and the answer slots); on `app.state.codecs`. Writes decode in a pool of their
    own, so requests that a read token may send can't take every slot and hold the workers'
    episodes off."""

    decode: Pool
    decode_writes: Pool
    encode: Pool
    answers: Slots

    @classmethod
    def create(cls) -> Codecs:
        # 2 threads each: JSON work holds the GIL, so more threads would only queue on it.
        # 8 slots per decode pool bound the large bodies held in memory at once
        # (16 × max_body_bytes in all).
        # Writes need the write token: their pool is not shared out per peer (one host often
        # runs every training worker); reads are, as a read token may be anyone's.
        return cls(
            decode=Pool("being decoded", 2, 8),
            decode_writes=Pool("being written", 2, 8, per_peer=8),
            encode=Pool("being encoded", 2, 8),
            answers=Slots(8),  # 8 × max_response_bytes of large answers at most
        )

    def close(self) -> None:
        self.decode.close()
        self.decode_writes.close()
        self.encode.close()
