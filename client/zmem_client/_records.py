"""The replica's query records (risk, Σw, n_eff per query row), posted to `POST …/queries`.

The risk path only queues its detached `d2`, gathered risk targets and sigma (with a CUDA
event on a GPU: nothing waits for the device there); a daemon thread computes the
statistics on host copies, in float64 as the service's kernel does, and posts them in
batches. `flush(timeout)` waits for what is queued; when the service is away, or the queue
is past its bound, records are dropped and counted: diagnostics are worth less than bounded
memory.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import httpx
import numpy as np
import torch

from zmem_core import wire
from zmem_core.kernel import kernel_stats
from zmem_core.limits import MAX_BATCH
from zmem_core.wire import SAFETENSORS

from ._backoff import backoff
from ._http import read_error

log = logging.getLogger("zmem_client")


def record_event(device: torch.device) -> Any:
    """A CUDA event recorded now on `device`'s current stream."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class QueryPoster:
    """Posts the replica's query records to `POST …/queries`, batched, from a daemon thread.

    The risk path only appends its detached `d2`, gathered risk targets and sigma;
    the statistics are computed here (float64, as the service's kernel does). The
    queue holds at most `max_pending` rows; past that, and whenever a post fails,
    records are dropped and counted: diagnostics are worth less than bounded memory.
    """

    def __init__(
        self,
        http: httpx.Client,
        prefix: str,
        memory: str,
        max_pending: int,
        interval: float = 0.5,
        worker: str | None = None,
    ) -> None:
        """`worker`: named with every record (`risk.png?worker=`)."""
        self._http = http
        self._meta = {} if worker is None else {"worker": worker}
        self._memory = memory
        self._interval = interval
        self._flushing = 0
        self._prefix = prefix
        self._max_pending = max_pending
        self._queue: collections.deque[tuple[torch.Tensor, torch.Tensor, float, Any]] = collections.deque()
        self._rows = 0
        self._busy = False
        self._cond = threading.Condition()
        self._closed = False
        self.sent = 0
        self.dropped = 0
        self._thread: threading.Thread | None = None

    def put(self, d2: torch.Tensor, rt: torch.Tensor, sigma: float) -> None:
        b = int(d2.shape[0])
        event = record_event(d2.device) if d2.device.type == "cuda" else None
        with self._cond:
            if self._closed:
                return
            if self._rows + b > self._max_pending:
                self.dropped += b
                return
            self._queue.append((d2, rt, sigma, event))
            self._rows += b
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zmem-replica-records", daemon=True)
                self._thread.start()
            # Wake the thread only when it waits for a first record or a batch is full: while it
            # gathers, a wake-up per training step would cost the step a thread switch.
            if len(self._queue) == 1 or self._rows >= MAX_BATCH:
                self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._queue or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self.dropped += self._rows
            self._queue.clear()
            self._rows = 0
            self._cond.notify_all()
        self._http.close()

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                # Gather for a while: one request per interval, not one per training step.
                deadline = time.monotonic() + self._interval
                while not self._closed and not self._flushing and self._rows < MAX_BATCH:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return
                batch, rows = [], 0
                while self._queue and rows + int(self._queue[0][0].shape[0]) <= MAX_BATCH:
                    item = self._queue.popleft()
                    batch.append(item)
                    rows += int(item[0].shape[0])
                if not batch:  # one query larger than a request: split it
                    d2, rt, sigma, event = self._queue.popleft()
                    batch = [(d2[:MAX_BATCH], rt[:MAX_BATCH], sigma, event)]
                    self._queue.appendleft((d2[MAX_BATCH:], rt[MAX_BATCH:], sigma, event))
                    rows = MAX_BATCH
                self._rows -= rows
                self._busy = True
            try:
                self._post(query_stats(batch))
                self.sent += rows
                failures = 0
            except Exception as e:  # the service is away or refuses: drop, count, back off
                self.dropped += rows
                failures += 1
                if failures == 1:  # once per outage; `dropped` counts every record
                    log.warning("query records dropped: posting them failed (%s); they are diagnostics", e)
                time.sleep(backoff(failures, 0.1, 2.0))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _post(self, stats: dict[str, np.ndarray]) -> None:
        deadline = time.monotonic() + (self._http.timeout.read or 60.0)
        with self._http.stream(
            "POST",
            self._prefix + "queries",
            content=wire.encode(stats, self._meta),
            headers={"content-type": SAFETENSORS, "accept-encoding": "identity"},
        ) as r:
            if r.status_code >= 400:
                raise read_error(r, deadline, self._memory)


def query_stats(batch: list[tuple[torch.Tensor, torch.Tensor, float, Any]]) -> dict[str, np.ndarray]:
    """(risk, wsum = Σw unnormalised, n_eff = 1/Σw_norm²) float64 per query row: the service's
    numbers for the same neighbours (`zmem_core.kernel.kernel_stats`, on the host copies)."""
    out: dict[str, list[np.ndarray]] = {"risk": [], "wsum": [], "n_eff": []}
    for *_, event in batch:
        if event is not None:
            while not event.query():  # poll: a host wait would count as a synchronisation
                time.sleep(0.0005)
    runs: list[list[tuple[torch.Tensor, torch.Tensor, float, Any]]] = []
    for item in batch:  # consecutive queries with the same k and sigma are computed together
        if runs and runs[-1][0][2] == item[2] and runs[-1][0][0].shape[1] == item[0].shape[1]:
            runs[-1].append(item)
        else:
            runs.append([item])
    for run in runs:
        sigma = run[0][2]
        d2h = _to_host(torch.cat([item[0] for item in run]))
        rth = _to_host(torch.cat([item[1] for item in run]))
        for key, part in zip(("risk", "wsum", "n_eff"), kernel_stats(d2h, rth, sigma), strict=True):
            out[key].append(part)
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _to_host(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = record_event(t.device)
    while not done.query():
        time.sleep(0.0005)
    return host.numpy()
