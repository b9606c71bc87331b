"""A local replica of one memory: follows the service's changes feed, answers `risk()` in-process.

A daemon thread long-polls `GET …/changes` and mirrors the memory into tensors on
a chosen device with the service's FIFO semantics; `risk()` and `neighbors()` then
search those tensors with the same exact kNN (`_knn.exact_knn`, ties by the lower
seq) and the same kernel (`_risk.kernel_risk`) as the service path, so for the same
buffer they give the same answer. After the first sync nothing in `risk()` touches
the network: while the service is away the replica answers from its last state and
reports how far behind it may be (`lag()`).

The rows live in a window `[start, start + size)` of buffers longer than the memory
(`capacity` plus a quarter): new rows are written past the window's end, where no
published snapshot reads, and the window slides; only when it reaches the end are
the surviving rows copied into a fresh buffer. So a snapshot is never written to
once published, the risk path reads one consistent state without a lock, and each
row costs O(1) copies. Sizes, k, sigma and activity are host numbers kept by the
feed thread, so on CUDA the risk path never waits for the device.

The replica's query records (risk, Σw, n_eff) go to `POST …/queries` from another
daemon thread, batched; when the service is away they are dropped and counted.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import random
import struct
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
import safetensors.numpy
import torch

from ._exceptions import HTTPError, RequestRejected, ServerError, Timeout, TransportError, ZMemError
from ._knn import exact_knn
from ._risk import kernel_dtype, kernel_risk

SAFETENSORS = "application/x-safetensors"
MAX_K = 1024  # the service's limit on k
MAX_QUERY_ROWS = 10_000  # rows per POST …/queries (the service's per-request limit)
PAGE_ROWS = 10_000  # rows per feed page
POLL_WAIT = 10.0  # seconds a caught-up replica long-polls for news (the service allows 30)
POLL_SLACK = 1.0  # seconds past its wait by which a long poll's answer is late
MIN_INTERVAL = 0.05
"""Seconds between the starts of two feed requests while rows keep coming: each request
costs the service about as much as a write, so a busy memory is followed in pages of
many rows rather than one page per write (it bounds the lag this adds)."""


class ReplicaError(ZMemError):
    """The replica cannot answer: too stale (`strict=True`), over its memory cap, or refused."""


class ReplicaLagWarning(UserWarning):
    """The replica has not known itself caught up for longer than `max_lag` seconds."""


@dataclass(frozen=True)
class Lag:
    """How far behind the replica may be.

    `seconds`: since it last knew it was caught up (0 while a long poll from a
    caught-up state is waiting for news); `seqs`: the memory's `next_seq` as last
    seen minus the replica's.
    """

    seconds: float
    seqs: int


@dataclass(frozen=True)
class _State:
    """One published, immutable view of the memory. Tensors are never written inside
    `[start, start + size)` once published; host numbers describe them."""

    generation: str | None
    settings: dict[str, Any] | None  # the feed's settings object (None: unknown memory)
    z: torch.Tensor  # float32 [L, d] on the replica's device
    risk_target: torch.Tensor  # float32 [L]
    seq: torch.Tensor  # int64 [L]
    sqnorm: torch.Tensor  # float32 [L]: ‖z‖² per row, kept for the kNN's candidate step
    host_seq: np.ndarray  # int64 [L], the same seqs on the host (for the feed thread)
    start: int
    size: int
    sigma_auto: float | None
    next_seq: int  # the seq the replica expects next (the feed's `after` is next_seq - 1)
    ready: Any = None  # a CUDA event recorded after the state's writes (None on CPU)

    @property
    def capacity(self) -> int:
        return int(self.settings["capacity"]) if self.settings else 0

    @property
    def z_dim(self) -> int | None:
        return self.settings.get("z_dim") if self.settings else None

    @property
    def active(self) -> bool:
        return self.settings is not None and self.size > 0 and self.size >= int(self.settings["min_size"])

    @property
    def nbytes(self) -> int:
        tensors = (self.z, self.risk_target, self.seq, self.sqnorm)
        return sum(int(t.nbytes) for t in tensors) + int(self.host_seq.nbytes)

    def window(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [size, d], risk_target [size], seq [size], sqnorm [size]: views, oldest first."""
        lo, hi = self.start, self.start + self.size
        return self.z[lo:hi], self.risk_target[lo:hi], self.seq[lo:hi], self.sqnorm[lo:hi]


def _empty_state(device: torch.device, settings: dict[str, Any] | None, generation: str | None) -> _State:
    d = int(settings.get("z_dim") or 0) if settings else 0
    return _State(
        generation=generation,
        settings=settings,
        z=torch.zeros((0, d), dtype=torch.float32, device=device),
        risk_target=torch.zeros(0, dtype=torch.float32, device=device),
        seq=torch.zeros(0, dtype=torch.int64, device=device),
        sqnorm=torch.zeros(0, dtype=torch.float32, device=device),
        host_seq=np.zeros(0, np.int64),
        start=0,
        size=0,
        sigma_auto=None,
        next_seq=1,
    )


class Replica:
    """Mirror of one memory on `device`, kept current by a background thread.

    `prefix` is the memory's route prefix ("/" or "/memories/NAME/"); `headers`
    (auth) and `transport` (tests) are as for the client. The replica opens its own
    connections: one for the feed, one for the query records. Thread-safe: `risk`,
    `neighbors` and `lag` may be called from any thread.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        device: str | torch.device | None = None,
        timeout: float = 10.0,
        max_lag: float = 30.0,
        strict: bool = False,
        max_bytes: int = 2**31,
        max_pending_records: int = 100_000,
        poll_wait: float = POLL_WAIT,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        if not max_lag > 0:
            raise ValueError(f"max_lag must be > 0 seconds, got {max_lag!r}")
        if max_bytes < 1:
            raise ValueError(f"replica_max_bytes must be >= 1, got {max_bytes!r}")
        if not 0 < poll_wait <= 30:
            raise ValueError(f"poll_wait must be in (0, 30] seconds, got {poll_wait!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout = timeout
        self.max_lag = max_lag
        self.strict = strict
        self.max_bytes = max_bytes
        self._transport = transport
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        records_http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        self._prefix = prefix
        self._poll_wait = poll_wait
        self._min_interval = min_interval
        self._lock = threading.Lock()  # guards the published state and the lag clocks
        self._state = _empty_state(self.device, None, None)
        self._synced = threading.Event()  # set at the first complete page (or 404)
        self._stop = threading.Event()
        self._error: ZMemError | None = None  # a permanent failure the risk path raises
        self._started_at = time.monotonic()
        self._synced_at: float | None = None  # the last moment it knew it was caught up
        self._polling_since: float | None = None  # a long poll from a caught-up state is waiting
        self._feed_next_seq = 1  # the memory's next_seq as last seen
        self._warned = False
        self._building: _State | None = None  # a fresh mirror being filled (feed thread only)
        self._want_auto = False  # a caller asked for sigma "auto": the feed must send its value
        # On CPU, FAISS (when installed) finds the candidates faster than torch; same answer.
        self._use_faiss = self.device.type == "cpu" and importlib.util.find_spec("faiss") is not None
        self._caught_up = False  # the last page reached the newest row (feed thread only)
        self.pages = 0
        self.resets = 0
        self.mismatches = 0
        self.feed_errors = 0
        self.last_feed_error: BaseException | None = None
        self._records = _QueryPoster(records_http, prefix, max_pending_records)
        self._thread = threading.Thread(target=self._follow, name="zmem-replica", daemon=True)
        self._thread.start()

    # -- the risk path ------------------------------------------------------------------

    def risk_and_size(
        self, z: torch.Tensor, *, k: int | None = None, sigma: float | str | None = None, record: bool = True
    ) -> tuple[torch.Tensor, int]:
        """Kernel risk of each row of z ([d] or [B, d]) from the mirrored memory, and its size.

        Same contract as `ZMemClient.risk_and_size`: on z's device and dtype,
        differentiable in z, exactly 0 while the memory is inactive.
        """
        if z.dim() not in (1, 2):
            raise ValueError(f"z must have shape [d] or [B, d], got {list(z.shape)}")
        rows = z if z.dim() == 2 else z.unsqueeze(0)
        if not rows.is_floating_point():
            rows = rows.to(torch.get_default_dtype())
        st = self._snapshot()
        kk, resolved = self._query_params(st, rows.shape[-1], k, sigma)
        if kk == 0:
            risk = torch.zeros(rows.shape[:-1], device=rows.device, dtype=rows.dtype)
            return (risk if z.dim() == 2 else risk[0]), st.size
        d2, nz, rt = self._search(st, rows.detach(), kk)
        work = kernel_dtype(rows.dtype)
        risk = kernel_risk(rows.to(work), nz.to(rows.device, work), rt.to(rows.device, work), resolved)
        risk = risk.to(rows.dtype)
        if record:
            self._records.put(d2, rt, resolved)
        return (risk if z.dim() == 2 else risk[0]), st.size

    def neighbors(
        self, z: np.ndarray, k: int | None = None, sigma: float | str | None = None
    ) -> dict[str, Any]:
        """The service's `neighbors` answer from the replica: numpy `z` [B, k, d], `risk_target`,
        `d2`, `seq` [B, k] (a 1-D z drops the B axis), `size`, `active`, `k`, `sigma`."""
        q = np.asarray(z, dtype=np.float32)
        rows = q if q.ndim == 2 else q.reshape(1, -1)
        if rows.ndim != 2:
            raise ValueError(f"z must have shape [d] or [B, d], got {list(q.shape)}")
        st = self._snapshot()
        kk, resolved = self._query_params(st, rows.shape[1], k, sigma)
        b, d = rows.shape
        if kk == 0:
            out: dict[str, Any] = {
                "z": np.zeros((b, 0, d), np.float32),
                "risk_target": np.zeros((b, 0), np.float32),
                "d2": np.zeros((b, 0), np.float32),
                "seq": np.zeros((b, 0), np.int64),
            }
        else:
            d2, nz, rt, seq = self._search(st, torch.from_numpy(rows), kk, with_seq=True)
            out = {"z": nz.cpu().numpy(), "risk_target": rt.cpu().numpy(), "d2": d2.cpu().numpy()}
            out["seq"] = seq.cpu().numpy()
        if q.ndim == 1:
            out = {key: value[0] for key, value in out.items()}
        return {**out, "size": st.size, "active": st.active, "k": kk, "sigma": resolved}

    def _snapshot(self) -> _State:
        """The current state; waits for the first sync, enforces the lag limit."""
        if not self._synced.is_set() and not self._synced.wait(self.timeout):
            if self._error is not None:
                raise self._error
            raise Timeout(
                f"the replica found no complete state of the memory within {self.timeout}s "
                f"({self.feed_errors} failed feed requests): is the service reachable?"
            )
        if self._error is not None:
            raise self._error
        seconds = self._lag_seconds(time.monotonic())
        if seconds > self.max_lag:
            message = (
                f"the replica has not been caught up with the service for {seconds:.1f}s "
                f"(max_lag={self.max_lag}s, {self.lag().seqs} seqs behind as last seen)"
            )
            if self.strict:
                raise ReplicaError(message)
            if not self._warned:
                self._warned = True
                warnings.warn(message + "; answering from the last state", ReplicaLagWarning, stacklevel=4)
        return self._state  # one reference read: a consistent snapshot

    def _query_params(
        self, st: _State, d: int, k: int | None, sigma: float | str | None
    ) -> tuple[int, float]:
        """k clipped to the size (0 while inactive) and the numeric sigma, as the service resolves them."""
        if st.z_dim is not None and d != st.z_dim:
            raise ValueError(f"z has {d} dimensions; the memory has z_dim {st.z_dim}")
        settings = st.settings or {}
        want = int(settings.get("k", 64)) if k is None else k
        if not 1 <= want <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K}, got {want}")
        s = settings.get("sigma", 1.0) if sigma is None else sigma
        if s == "auto" and st.active and st.sigma_auto is None and not self._want_auto:
            # The feed sends "auto"'s value only to followers that ask (it costs the service a
            # search per capacity/10 writes): ask from now on, once over the network.
            self._want_auto = True
            self.sync()
            st = replace(st, sigma_auto=self._state.sigma_auto)
        if s == "auto":
            resolved = st.sigma_auto if st.active and st.sigma_auto is not None else 1.0
        elif isinstance(s, str):
            raise ValueError(f"sigma must be a number or 'auto', got {s!r}")
        else:
            resolved = float(s)
            if not 1e-12 <= resolved <= 1e12:
                raise ValueError(f"sigma must be in [1e-12, 1e12] or 'auto', got {s!r}")
        return (min(want, st.size) if st.active else 0), resolved

    def _search(self, st: _State, rows: torch.Tensor, kk: int, with_seq: bool = False) -> Any:
        if st.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(st.ready)  # the feed thread's writes come first; no host wait
            for t in (st.z, st.risk_target, st.seq, st.sqnorm):
                t.record_stream(stream)  # keep the buffers from reuse while this stream reads them
        base, targets, seqs, sqnorm = st.window()
        q = rows.to(self.device, torch.float32, non_blocking=True)
        d2, idx = exact_knn(base, seqs, q, kk, base_sqnorm=sqnorm, faiss_candidates=self._use_faiss)
        nz, rt = base[idx], targets[idx]
        return (d2, nz, rt, seqs[idx]) if with_seq else (d2, nz, rt)

    # -- lag ----------------------------------------------------------------------------

    def lag(self) -> Lag:
        with self._lock:
            seqs = max(0, self._feed_next_seq - self._state.next_seq)
        return Lag(self._lag_seconds(time.monotonic()), seqs)

    def _lag_seconds(self, now: float) -> float:
        # A long poll from a caught-up state means "nothing new yet" until the service should
        # have answered it (its wait plus POLL_SLACK); past that, the service is stuck or away.
        polling, synced = self._polling_since, self._synced_at
        if polling is not None and now - polling < self._poll_wait + POLL_SLACK:
            return 0.0
        return now - (synced if synced is not None else self._started_at)

    def sync(self, timeout: float | None = None) -> None:
        """Return once the replica holds everything the service held when this was called.

        Asks the service for its newest seq (one small request), then waits for the
        feed thread to get there. Raises Timeout after `timeout` (default: the
        client's) seconds, TransportError when the service cannot be reached.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        st = self._state
        params: dict[str, Any] = {"after": st.next_seq - 1, "limit": 1, "wait": 0}
        if st.generation is not None:
            params["generation"] = st.generation
        if self._want_auto:
            params["auto"] = "true"
        url = self._prefix + "changes"
        meta: dict[str, Any] = {}
        try:
            with httpx.Client(
                base_url=self._http.base_url,
                headers=self._http.headers,
                timeout=timeout,
                transport=self._transport,
            ) as http:
                r = http.get(url, params=params, headers={"accept": SAFETENSORS})
        except httpx.HTTPError as e:
            raise TransportError(f"GET {url}: cannot reach the service: {e}") from e
        if r.status_code == 404 and _problem_type(r).endswith("/not-found"):
            target: tuple[str | None, int] = (None, 1)
        elif r.status_code >= 400:
            raise _http_error(r)
        else:
            meta = _decode_page(r)[1]
            target = (meta["generation"], int(meta["next_seq"]))
        while True:
            if self._error is not None:
                raise self._error
            st = self._state
            if self._synced.is_set() and st.generation == target[0] and st.next_seq >= target[1]:
                auto = meta.get("sigma_auto")
                if auto is not None:
                    with self._lock:  # the value for exactly the state now held
                        now = self._state
                        if now.generation == target[0] and now.next_seq == target[1]:
                            self._state = replace(now, sigma_auto=float(auto))
                return
            if time.monotonic() > deadline:
                raise Timeout(
                    f"the replica did not catch up within {timeout}s (it holds generation "
                    f"{st.generation} up to seq {st.next_seq - 1}; the service {target[0]} "
                    f"up to {target[1] - 1})"
                )
            time.sleep(0.005)

    @property
    def state(self) -> _State:
        return self._state

    def export(self) -> dict[str, np.ndarray]:
        """The mirrored rows in seq order (host copies): `z`, `risk_target`, `seq`."""
        z, rt, seq, _ = self._state.window()
        return {"z": z.cpu().numpy(), "risk_target": rt.cpu().numpy(), "seq": seq.cpu().numpy()}

    @property
    def records_dropped(self) -> int:
        """Query records dropped: queue full, or the service away or refusing them."""
        return self._records.dropped

    @property
    def records_sent(self) -> int:
        return self._records.sent

    def flush_records(self, timeout: float) -> bool:
        """Wait until the query records queued so far were posted (or dropped); False on timeout."""
        return self._records.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads (query records still queued get up to `timeout` seconds)."""
        self._stop.set()
        self._records.close(timeout)
        # The feed thread closes its own connection: closing it from here would leave the
        # socket of a long poll in flight unclosed. One still polling exits when the poll returns.
        self._thread.join(min(timeout, 0.1))

    # -- the feed thread ----------------------------------------------------------------

    def _follow(self) -> None:
        try:
            self._follow_feed()
        finally:
            self._http.close()

    def _follow_feed(self) -> None:
        failures = 0
        while not self._stop.is_set():
            base = self._building or self._state  # the state the next page builds on
            wait = self._poll_wait if self._caught_up and base.settings is not None else 0.0
            params: dict[str, Any] = {"after": base.next_seq - 1, "limit": PAGE_ROWS, "wait": wait}
            if base.generation is not None:
                params["generation"] = base.generation
            if self._want_auto:
                params["auto"] = "true"
            sent = time.monotonic()
            if wait:
                self._polling_since = sent
            try:
                r = self._http.get(
                    self._prefix + "changes",
                    params=params,
                    headers={"accept": SAFETENSORS},
                    timeout=self.timeout + wait,
                )
                if r.status_code == 404 and _problem_type(r).endswith("/not-found"):
                    self._apply_missing(sent)
                    failures = 0
                    self._stop.wait(min(1.0, self._poll_wait))  # nothing to long-poll on yet
                    continue
                if r.status_code >= 400:
                    raise _http_error(r)
                arrays, meta = _decode_page(r)
                self._apply_page(arrays, meta)
                failures = 0
                if len(arrays["seq"]) and meta.get("complete"):
                    self._stop.wait(self._min_interval - (time.monotonic() - sent))
            except ReplicaError as e:
                self._fail(e)
                return
            except RequestRejected as e:  # 401, 403, 404 (no feed route), 422: a retry won't help
                self._fail(ReplicaError(f"the service refused the replica's feed request: {e}"))
                return
            except Exception as e:  # unreachable, 5xx, a broken page: back off and try again
                if self._stop.is_set():
                    return
                self.feed_errors += 1
                self.last_feed_error = e
                failures += 1
                self._caught_up = False
                self._stop.wait(min(2.0, 0.05 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.5))
            finally:
                self._polling_since = None

    def _fail(self, error: ZMemError) -> None:
        self._error = error
        self._synced.set()  # a waiting first risk() raises the error instead of timing out

    def _apply_missing(self, sent: float) -> None:
        """404: the memory does not exist; the replica is empty and inactive."""
        with self._lock:
            if self._state.settings is not None:
                self.resets += 1
            self._state = _empty_state(self.device, None, None)
            self._building = None
            self._feed_next_seq = 1
            self._synced_at = sent
        self._caught_up = True
        self._synced.set()

    def _apply_page(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Apply one feed page. A page that starts the mirror over (reset, new generation)
        builds a private state that is published only once it reaches the newest row,
        so risk() never answers from a half-copied memory."""
        self.pages += 1
        st = self._building or self._state
        settings = meta["settings"]
        generation = meta["generation"]
        if (
            meta.get("reset")
            or generation != st.generation
            or st.settings is None
            or settings["capacity"] != st.settings["capacity"]
            or (st.z_dim is not None and settings.get("z_dim") not in (None, st.z_dim))
        ):
            if self._state.settings is not None:
                self.resets += 1
            st = _empty_state(self.device, settings, generation)
            self._building = st
        seq = np.asarray(arrays["seq"], np.int64)
        if len(seq):
            if (np.diff(seq) <= 0).any() or seq[0] < st.next_seq:
                raise ValueError(f"feed page out of order after seq {st.next_seq - 1}")
            st = self._append(st, arrays["z"], arrays["risk_target"], seq, settings)
        st = replace(st, settings=settings, generation=generation)
        if meta.get("sigma_auto") is not None:
            st = replace(st, sigma_auto=float(meta["sigma_auto"]))
        complete = bool(meta.get("complete"))
        if complete:
            st = replace(st, next_seq=max(st.next_seq, int(meta["next_seq"])))
            oldest = int(st.host_seq[st.start]) if st.size else None
            if st.size != int(meta["size"]) or (st.size and oldest != meta["oldest_seq"]):
                # The mirror disagrees with the service (it should not): start over, keep answering.
                self._building = _empty_state(self.device, None, None)
                self._caught_up = False
                self.mismatches += 1
                return
        if self.device.type == "cuda":
            st = replace(st, ready=_record_event(self.device))
        self._caught_up = complete
        if self._building is not None and not complete:
            self._building = st
            return
        with self._lock:
            self._state = st
            self._building = None
            self._feed_next_seq = int(meta["next_seq"])
            if complete:
                self._synced_at = time.monotonic()
                if self._warned and self._lag_seconds(self._synced_at) <= self.max_lag:
                    self._warned = False  # the next outage warns again
        if complete:
            self._synced.set()

    def _append(
        self, st: _State, z: np.ndarray, rt: np.ndarray, seq: np.ndarray, settings: dict[str, Any]
    ) -> _State:
        """The state after appending rows (ascending seqs), FIFO at `capacity`.

        Writes only past the published window's end; a fresh buffer when it runs out.
        """
        cap = int(settings["capacity"])
        n = len(seq)
        d = z.shape[1]
        if n > cap:
            z, rt, seq, n = z[-cap:], rt[-cap:], seq[-cap:], cap
        new_size = min(cap, st.size + n)
        kept = new_size - n  # old rows that survive
        end = st.start + st.size
        if st.size and st.z.shape[1] != d:
            raise ValueError(f"feed rows have {d} dimensions; the mirror has {st.z.shape[1]}")
        if end + n <= st.z.shape[0]:
            buf_z, buf_rt, buf_seq, buf_sq, host_seq = st.z, st.risk_target, st.seq, st.sqnorm, st.host_seq
            at, start = end, end + n - new_size
        else:
            length = (
                cap + max(1, cap // 4)
                if new_size == cap
                else min(cap + max(1, cap // 4), max(64, 2 * new_size))
            )
            need = length * (4 * d + 4 + 8 + 4 + 8)
            if need > self.max_bytes:
                raise ReplicaError(
                    f"the replica needs {need} bytes for {length} rows of z_dim {d} (the memory holds "
                    f"{new_size}, capacity {cap}), over replica_max_bytes={self.max_bytes}: raise the "
                    "limit or use replica=False"
                )
            buf_z = torch.empty((length, d), dtype=torch.float32, device=self.device)
            buf_rt = torch.empty(length, dtype=torch.float32, device=self.device)
            buf_seq = torch.empty(length, dtype=torch.int64, device=self.device)
            buf_sq = torch.empty(length, dtype=torch.float32, device=self.device)
            host_seq = np.zeros(length, np.int64)
            if kept:
                lo = end - kept
                buf_z[:kept] = st.z[lo:end]
                buf_rt[:kept] = st.risk_target[lo:end]
                buf_seq[:kept] = st.seq[lo:end]
                buf_sq[:kept] = st.sqnorm[lo:end]
                host_seq[:kept] = st.host_seq[lo:end]
            at, start = kept, 0
        new_z = self._upload(np.ascontiguousarray(z, np.float32))
        buf_z[at : at + n] = new_z
        buf_sq[at : at + n] = (new_z * new_z).sum(dim=1)
        buf_rt[at : at + n] = self._upload(np.ascontiguousarray(rt, np.float32))
        buf_seq[at : at + n] = self._upload(np.ascontiguousarray(seq, np.int64))
        host_seq[at : at + n] = seq
        return replace(
            st,
            z=buf_z,
            risk_target=buf_rt,
            seq=buf_seq,
            sqnorm=buf_sq,
            host_seq=host_seq,
            start=start,
            size=new_size,
            next_seq=int(seq[-1]) + 1,
            ready=None,
        )

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            # Pinned and asynchronous: a pageable copy would synchronise (and fail under sync debug mode).
            return t.pin_memory().to(self.device, non_blocking=True)
        return t


def _record_event(device: torch.device) -> Any:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _decode_page(r: httpx.Response) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if r.headers.get("content-type", "").startswith(SAFETENSORS):
        body = r.content
        (n,) = struct.unpack("<Q", body[:8])
        meta = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
        return safetensors.numpy.load(body), {k: json.loads(v) for k, v in meta.items()}
    data = r.json()
    d = (data.get("settings") or {}).get("z_dim") or 0
    arrays: dict[str, np.ndarray] = {
        "z": np.asarray(data.pop("z"), np.float32).reshape(-1, d) if d else np.zeros((0, 0), np.float32),
        "risk_target": np.asarray(data.pop("risk_target"), np.float32),
        "seq": np.asarray(data.pop("seq"), np.int64),
    }
    return arrays, data


def _problem_type(r: httpx.Response) -> str:
    try:
        return str(r.json().get("type", ""))
    except ValueError:
        return ""


def _http_error(r: httpx.Response) -> HTTPError:
    try:
        problem = r.json()
    except ValueError:
        problem = {"title": r.reason_phrase, "detail": r.text[:500]}
    cls = RequestRejected if r.status_code < 500 else ServerError
    return cls(r.status_code, problem, f"GET {r.request.url}")


class _QueryPoster:
    """Posts the replica's query records to `POST …/queries`, batched, from a daemon thread.

    The risk path only appends its detached `d2`, gathered risk targets and sigma;
    the statistics are computed here (float64, as the service's kernel does). The
    queue holds at most `max_pending` rows; past that, and whenever a post fails,
    records are dropped and counted: diagnostics are worth less than bounded memory.
    """

    def __init__(self, http: httpx.Client, prefix: str, max_pending: int, interval: float = 0.5) -> None:
        self._http = http
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
        event = _record_event(d2.device) if d2.device.type == "cuda" else None
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
                while not self._closed and not self._flushing and self._rows < MAX_QUERY_ROWS:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return
                batch, rows = [], 0
                while self._queue and rows + int(self._queue[0][0].shape[0]) <= MAX_QUERY_ROWS:
                    item = self._queue.popleft()
                    batch.append(item)
                    rows += int(item[0].shape[0])
                if not batch:  # one query larger than a request: split it
                    d2, rt, sigma, event = self._queue.popleft()
                    batch = [(d2[:MAX_QUERY_ROWS], rt[:MAX_QUERY_ROWS], sigma, event)]
                    self._queue.appendleft((d2[MAX_QUERY_ROWS:], rt[MAX_QUERY_ROWS:], sigma, event))
                    rows = MAX_QUERY_ROWS
                self._rows -= rows
                self._busy = True
            try:
                self._post(query_stats(batch))
                self.sent += rows
                failures = 0
            except Exception:  # the service is away or refuses: drop, count, back off
                self.dropped += rows
                failures += 1
                time.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _post(self, stats: dict[str, np.ndarray]) -> None:
        r = self._http.post(
            self._prefix + "queries",
            content=safetensors.numpy.save(stats),
            headers={"content-type": SAFETENSORS},
        )
        if r.status_code >= 400:
            raise _http_error(r)


def query_stats(batch: list[tuple[torch.Tensor, torch.Tensor, float, Any]]) -> dict[str, np.ndarray]:
    """(risk, wsum = Σw unnormalised, n_eff = 1/Σw_norm²) float64 per query row, as the service records."""
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
        d2h = _to_host(torch.cat([item[0] for item in run])).astype(np.float64)
        rth = _to_host(torch.cat([item[1] for item in run])).astype(np.float64)
        w = np.exp(-d2h / (2.0 * sigma**2))
        wsum = w.sum(axis=-1)
        out["risk"].append((w * rth).sum(axis=-1) / (wsum + 1e-8))
        out["wsum"].append(wsum)
        # n_eff = (Σw)² / Σw² (≤ k), 0 where every weight underflowed: the service's definition
        # (`kernel.kernel_stats`); the guard must not enter it, or underflow reads as 1e140.
        w2 = (w * w).sum(axis=-1)
        out["n_eff"].append(np.divide(wsum * wsum, w2, out=np.zeros_like(wsum), where=w2 > 0))
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _to_host(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = _record_event(t.device)
    while not done.query():
        time.sleep(0.0005)
    return host.numpy()
