"""The background sender behind `record`: batches, retries, never drops, never blocks a step.

Episodes wait in a bounded queue. One daemon thread takes up to `batch_size` at a
time (consecutive ones of one z dimension: until the service has accepted one, a
client may hold several) and posts them; a transient failure (no connection, timeout, 502/503/504) is
retried with exponential backoff and jitter for as long as the client lives — the
episodes carry idempotency ids, so a retry of a batch the service did store stores
nothing twice. A 4xx (or 507) rejects the batch for good: it is dropped and the
error surfaces on the next `record`/`flush`.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._exceptions import (
    ClientClosed,
    FlushTimeout,
    HTTPError,
    QueueFull,
    SendFailed,
    ServerError,
    TransportError,
)

TRANSIENT_STATUS = {502, 503, 504}
FIELDS = ("soft_bind", "cone_vol", "lambda_bind", "E_T", "lambda_T", "Hr")


class Sender:
    def __init__(
        self,
        post: Callable[[list[dict[str, Any]]], None],
        *,
        queue_size: int,
        batch_size: int,
        max_backoff: float = 5.0,
    ) -> None:
        self._post = post
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._max_backoff = max_backoff
        self._cond = threading.Condition()
        self._in_flight = 0
        self._error: SendFailed | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.retries = 0

    def put(self, episode: dict[str, Any]) -> None:
        with self._cond:
            self._raise_error()
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

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    def flush(self, timeout: float | None = None) -> None:
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
            self._raise_error()

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the thread; a flush that times out or fails leaves it running."""
        self.flush(timeout)
        self.stop()

    def stop(self) -> None:
        """No more `put`s; the thread sends what is queued, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

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
                n = len(batch)
                self._in_flight = n
            try:
                self._send(first_of_each_id(batch))
            except Exception as e:  # a bug here must surface, not leave flush() waiting forever
                with self._cond:
                    self._error = SendFailed(f"sending {n} recorded episodes failed: {e!r}", e)
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        attempt = 0
        while True:
            try:
                self._post(batch)
                self.sent += len(batch)
                return
            except ServerError as e:
                if e.status not in TRANSIENT_STATUS:
                    return self._reject(batch, e)
            except TransportError:
                pass
            except HTTPError as e:
                return self._reject(batch, e)
            attempt += 1
            self.retries += 1
            delay = min(self._max_backoff, 0.05 * 2 ** min(attempt, 10))
            time.sleep(delay * random.uniform(0.5, 1.5))

    def _reject(self, batch: list[dict[str, Any]], e: HTTPError) -> None:
        with self._cond:
            self._error = SendFailed(f"the service rejected {len(batch)} recorded episodes for good: {e}", e)


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
