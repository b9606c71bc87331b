"""The background sender behind `record`: batches, retries, never blocks a step, and drops
only what the service refuses for good, counting each.

Episodes wait in a bounded queue. One daemon thread takes up to `batch_size` at a
time (consecutive ones of one z dimension: until the service has accepted one, a
client may hold several) and posts them. The answer decides what happens next:

- stored: done;
- no answer (no connection, a timeout), 408, 429, any 5xx (507 included: room comes
  back as the FIFO evicts or the budget is raised): the same episodes are posted again
  after an exponential backoff with jitter, or the answer's `Retry-After` when that is
  longer (cut to MAX_RETRY_AFTER s), for as long as the client lives. Episodes carry idempotency ids,
  so a retry of a batch the service did store stores nothing twice;
- 413, or a 422 that names no episode (a batch over the service's `max_batch`): the
  batch is split in halves, sent one after the other, down to single episodes;
- a 422 that names episodes (`errors[].loc` = `["episodes", i, field]`): those are
  dropped and the rest posted again (the service names at most 20 in one answer);
- anything else (400, 401, 403, 404, ...), and a single episode still refused with 413
  or an unnamed 422: the episodes are dropped.

Episodes are stored in the order they were recorded, less those dropped. Every
dropped episode is counted (`dropped`, since the start), and the next `put` or
`flush` raises `EpisodesDropped` once with how many were dropped since the last
report and the first reasons. A bug in the sending path drops its batch the same way
rather than leave `flush` waiting forever.

Its lifecycle is its own (reverb's `TrajectoryWriter` is the model): the client makes it
with a connection of its own (`http`; a lean one: its timeout is a deadline for each whole
post), `flush(timeout)`s it, and `release`s it when the client closes. A released sender
goes on sending what is queued; at interpreter exit every sender still holding episodes
gets up to its `exit_timeout` once more (`_flush_at_exit`), and what it cannot deliver, or
what the service refused for good, is said on stderr.
"""

from __future__ import annotations

import atexit
import collections
import logging
import sys
import threading
import time
import weakref
from typing import Any

import httpx
import numpy as np

from zmem_core import wire

from ._backoff import MAX_RETRY_AFTER, backoff
from ._exceptions import (
    ClientClosed,
    EpisodesDropped,
    FlushTimeout,
    HTTPError,
    QueueFull,
    SendFailed,
    TransportError,
    ZMemError,
)
from ._http import checked, mapped

FIELDS = ("soft_bind", "cone_vol", "lambda_bind", "E_T", "lambda_T", "Hr")
MAX_REASONS = 5  # reasons an EpisodesDropped lists; the count covers the rest
__all__ = ["MAX_RETRY_AFTER", "Sender", "columns", "named_episodes"]
log = logging.getLogger("zmem_client")


class Sender:
    """Posts recorded episodes to `POST {path}` on `http` (see the module docstring); `where`
    names the service and memory in what it says at exit."""

    def __init__(
        self,
        http: httpx.Client,
        path: str,
        *,
        memory: str,
        where: str,
        queue_size: int,
        batch_size: int,
        exit_timeout: float = 30.0,
        first_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self._http = http
        self._path = path
        self._memory = memory
        self.where = where
        self.exit_timeout = exit_timeout
        # The z dimension the service has accepted from this sender: the client refuses records
        # of another at the call. One it rejected (a 422) is not remembered, so a fix goes through.
        self.accepted_z_dim: int | None = None
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        # Drops since the last report: how many, the first reasons, the first error.
        self._unreported = 0
        self._reasons: list[tuple[str, str]] = []
        self._cause: BaseException | None = None
        self.sent = 0
        self.retries = 0
        self.dropped = 0
        _open.add(self)

    def put(self, episode: dict[str, Any]) -> None:
        """Queue `episode`; then raise EpisodesDropped if earlier ones were dropped since the
        last report (this one stays queued: the report is about others)."""
        with self._cond:
            if self._closed:
                raise ClientClosed("record() after close(): this client is closed")
            if len(self._queue) + self._in_flight >= self._queue_size:
                raise QueueFull(
                    f"{len(self._queue) + self._in_flight} episodes are waiting to be sent (queue_size="
                    f"{self._queue_size}): the service has been unreachable for a while; "
                    "nothing was dropped"
                )
            self._queue.append(episode)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zmem-sender", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            self._report()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued episode is stored or dropped; then raise EpisodesDropped
        if any were dropped since the last report. FlushTimeout keeps the queue."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise FlushTimeout(
                        f"{len(self._queue) + self._in_flight} episodes still "
                        f"unacknowledged after {timeout}s; they stay queued"
                    )
                self._cond.wait(left)
            self._report()

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the thread; a flush that times out or fails leaves it running."""
        self.flush(timeout)
        self.stop()

    def stop(self) -> None:
        """No more `put`s; the thread sends what is queued, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def release(self) -> None:
        """The client closed: no more `put`s. With nothing pending the connection closes now (its
        drops are said again at exit: an EpisodesDropped may have been caught); else the thread
        goes on, and the exit flush waits for it."""
        self.stop()
        if not self.pending:
            self._http.close()
            _open.discard(self)
            if self.dropped:
                _dropped[self.where] += self.dropped

    def _post(self, batch: list[dict[str, Any]]) -> None:
        arrays, meta = columns(batch)
        where = f"POST {str(self._http.base_url).rstrip('/')}{self._path}"
        with mapped(where, float(self._http.timeout.read or 0.0), lambda: self._http.is_closed):
            r = self._http.post(self._path, content=wire.encode(arrays, meta), headers=_HEADERS)
        checked(r, where, self._memory)
        self.accepted_z_dim = int(arrays["z"].shape[1])

    def _report(self) -> None:
        """Raise the drops since the last report, once (lock held)."""
        if self._unreported:
            error = EpisodesDropped(self._unreported, self.dropped, self._reasons, self._cause)
            self._unreported, self._reasons, self._cause = 0, [], None
            raise error

    def _drop(self, episodes: list[dict[str, Any]], reasons: list[str], cause: BaseException) -> None:
        """Count `episodes` as dropped, `reasons[i]` saying why of the i-th (lock not held)."""
        log.warning(
            "%d recorded episodes for %s dropped: the service refused them for good (%s)",
            len(episodes),
            self.where,
            reasons[0] if reasons else cause,
        )
        with self._cond:
            self.dropped += len(episodes)
            self._unreported += len(episodes)
            for episode, why in zip(episodes, reasons, strict=True):
                if len(self._reasons) == MAX_REASONS:
                    break
                self._reasons.append((episode["id"], why))
            if self._cause is None:
                self._cause = cause
            self._in_flight -= len(episodes)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                d = len(self._queue[0]["z"])
                batch: list[dict[str, Any]] = []
                while self._queue and len(batch) < self._batch_size and len(self._queue[0]["z"]) == d:
                    batch.append(self._queue.popleft())
                batch = first_of_each_id(batch)
                self._in_flight = len(batch)
            try:
                self._send(batch)
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        """Deliver `batch`, first episodes first: store, split or drop each part (module docstring)."""
        todo = [batch]  # a stack: the first half of a split goes first
        while todo:
            part = todo.pop()
            try:
                todo.extend(reversed(self._send_part(part)))
            except Exception as e:  # a bug here must surface, not leave flush() waiting forever
                left = [episode for p in (part, *reversed(todo)) for episode in p]
                self._drop(left, [f"sending broke: {e!r}"] * len(left), e)
                return

    def _send_part(self, part: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Post `part` until it is stored (→ []), or split or partly dropped (→ the parts left)."""
        attempt = 0
        while True:
            cause: ZMemError
            try:
                self._post(part)
            except TransportError as e:
                wait, cause = None, e
            except HTTPError as e:
                if e.status in (408, 429) or e.status >= 500:
                    wait, cause = e.retry_after, e
                else:
                    return self._refused(part, e)
            else:
                with self._cond:
                    self.sent += len(part)
                    self._in_flight -= len(part)
                return []
            attempt += 1
            self.retries += 1
            pause = backoff(attempt, self._first_backoff, self._max_backoff, wait)
            log.info(
                "%d episodes for %s not stored (%s); retry %d in %.2fs",
                len(part),
                self.where,
                cause,
                attempt,
                pause,
            )
            time.sleep(pause)

    def _refused(self, part: list[dict[str, Any]], e: HTTPError) -> list[list[dict[str, Any]]]:
        """What is left to send of `part` after a 4xx other than 408/429."""
        named = named_episodes(e.problem, len(part)) if e.status == 422 else {}
        if named:
            bad = sorted(named)
            self._drop([part[i] for i in bad], [f"{named[i]} ({e.status})" for i in bad], e)
            rest = [episode for i, episode in enumerate(part) if i not in named]
            return [rest] if rest else []
        if e.status in (413, 422) and len(part) > 1:
            half = len(part) // 2
            return [part[:half], part[half:]]
        self._drop(part, [str(e)] * len(part), e)
        return []


def named_episodes(problem: Any, n: int) -> dict[int, str]:
    """The episodes of an n-episode request that a 422 problem names: index → why.

    The service names an episode as `{"loc": ["episodes", i, field], "msg": ...}` in
    `errors`; other entries (`["episodes"]`: too many in one request) name none.
    """
    errors = problem.get("errors") if isinstance(problem, dict) else None
    named: dict[int, list[str]] = {}
    for error in errors if isinstance(errors, list) else []:
        loc = error.get("loc") if isinstance(error, dict) else None
        if not isinstance(loc, list) or len(loc) < 2 or loc[0] != "episodes":
            continue
        i = loc[1]
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n:
            field = ".".join(str(part) for part in loc[2:])
            msg = str(error.get("msg", ""))
            named.setdefault(i, []).append(f"{field}: {msg}" if field else msg)
    return {i: "; ".join(whys) for i, whys in named.items()}


def first_of_each_id(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch without later repeats of an id (the service keeps the first write of an id)."""
    seen: set[str] = set()
    out = []
    for episode in batch:
        if episode["id"] not in seen:
            seen.add(episode["id"])
            out.append(episode)
    return out


def columns(batch: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A batch of queued episodes as safetensors arrays and metadata."""
    arrays = {"z": np.stack([e["z"] for e in batch])}
    for f in FIELDS:
        arrays[f] = np.array([e[f] for e in batch], np.float32)
    meta = {"id": [e["id"] for e in batch], "worker": [e["worker"] for e in batch]}
    return arrays, meta


_HEADERS = {"content-type": wire.SAFETENSORS}
_open: weakref.WeakSet[Sender] = weakref.WeakSet()
# Episodes dropped by senders released before exit, by service and memory: the exit says so.
_dropped: collections.Counter[str] = collections.Counter()


@atexit.register
def _flush_at_exit() -> None:
    # Episodes recorded just before the interpreter exits still reach the service; what
    # cannot be delivered in time is lost with the process, and we say so.
    start = time.monotonic()
    dropped = collections.Counter(_dropped)
    for sender in list(_open):
        left = max(0.0, sender.exit_timeout - (time.monotonic() - start))
        try:
            sender.close(left)
        except FlushTimeout:
            # Printed as well as logged: a library's log may go nowhere, and losing episodes
            # must never be silent.
            lost = (
                f"{sender.pending} recorded episodes were never delivered to {sender.where} "
                f"and are LOST: the service did not take them within {sender.exit_timeout:g}s and "
                "the process is ending"
            )
            log.error(lost)
            print(f"zmem: {lost}", file=sys.stderr)
        except SendFailed as e:
            print(f"zmem: {sender.where}: {e}", file=sys.stderr)
        except Exception as e:  # at exit there is no one left to raise to
            print(f"zmem: {sender.where}: could not flush at exit: {e}", file=sys.stderr)
        dropped[sender.where] += sender.dropped
    for where, n in dropped.items():
        if n:
            print(
                f"zmem: {n} episodes recorded for {where} were dropped in all: the service refused "
                "them for good",
                file=sys.stderr,
            )
