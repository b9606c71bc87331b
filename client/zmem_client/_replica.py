"""A local replica of one memory: follows the service's changes feed, answers `risk()` in-process.

A daemon thread long-polls `GET …/changes` and mirrors the memory into tensors on
a chosen device with the service's FIFO semantics; `risk()` and `neighbors()` then
search those tensors with the same exact kNN (`zmem_core.knn_torch`, ties by the lower
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
import torch

from zmem_core import params, wire
from zmem_core.kernel import kernel_stats
from zmem_core.knn_torch import exact_knn
from zmem_core.limits import MAX_BATCH, MAX_CAPACITY, MAX_K, MAX_SIGMA, MAX_Z_DIM, MIN_SIGMA
from zmem_core.wire import SAFETENSORS

from ._exceptions import HTTPError, RequestRejected, ServerError, Timeout, TransportError, ZMemError
from ._risk import kernel_dtype, kernel_risk

PAGE_ROWS = 10_000  # rows per feed page, at most
PAGE_BYTES = 16 * 2**20
"""Bytes of rows per feed page the replica asks for, at most: wide rows come in fewer per page
(the service refuses answers over its `max_response_bytes`, 64 MiB by default)."""
HEADER_BYTES = 2**20  # a page's safetensors header (metadata and tensor table): far more than it needs
ERROR_BYTES = 64 * 2**10  # of an error answer's body, the most that is read
AUTO_RETRY = 1.0
"""Seconds during which, after asking the service for the value of sigma "auto" failed, the
risk path raises again without asking (the feed thread keeps asking): an outage costs each
call one failed request per second at most, not a timeout each."""
FEED_HEADERS = {"accept": SAFETENSORS, "accept-encoding": "identity"}  # compressed bodies have no byte cap
POLL_WAIT = 10.0  # seconds a caught-up replica long-polls for news (the service allows 30)
POLL_SLACK = 1.0  # seconds past its wait by which a long poll's answer is late
MIN_INTERVAL = 0.05
"""Seconds between the starts of two feed requests while rows keep coming: each request
costs the service about as much as a write, so a busy memory is followed in pages of
many rows rather than one page per write (it bounds the lag this adds)."""


class ReplicaError(ZMemError):
    """The replica cannot answer: too stale (`strict=True`), over its memory cap, refused by
    the service, without a complete state in time while the service sends pages it refuses,
    or asked for `sigma: "auto"` before the service could tell it the value."""


class _RefusedPage(ReplicaError):
    """A feed answer the replica refuses: malformed, inconsistent with its own settings or
    with the mirror, or past its byte cap. Nothing of it is applied; the feed thread counts
    it (`feed_errors`, `last_feed_error`) and asks again after a backoff, so the replica keeps
    its last good state and the lag (`max_lag`, `strict`) says it is falling behind."""


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
        self._auto_failure: tuple[float, ZMemError] | None = None  # when asking for it last failed, and why
        # On CPU, FAISS (when installed) finds the candidates faster than torch; same answer.
        self._use_faiss = self.device.type == "cpu" and importlib.util.find_spec("faiss") is not None
        self._caught_up = False  # the last page reached the newest row (feed thread only)
        self.pages = 0
        self.resets = 0
        self.mismatches = 0
        self.feed_errors = 0
        self.last_feed_error: BaseException | None = None
        self._failures = 0  # feed requests failed in a row (feed thread only)
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
        st, kk, resolved = self._query_params(self._snapshot(), rows.shape[-1], k, sigma)
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
        st, kk, resolved = self._query_params(self._snapshot(), rows.shape[1], k, sigma)
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
            message = (
                f"the replica found no complete state of the memory within {self.timeout}s "
                f"({self.feed_errors} failed feed requests)"
            )
            last = self.last_feed_error
            if isinstance(last, _RefusedPage):  # the service answers, but not with usable pages
                raise ReplicaError(f"{message}; the last one was refused: {last}")
            raise Timeout(f"{message}: is the service reachable?")
        if self._error is not None:
            raise self._error
        seconds = self._lag_seconds(time.monotonic())
        if seconds > self.max_lag:
            message = (
                f"the replica has not been caught up with the service for {seconds:.1f}s "
                f"(max_lag={self.max_lag}s, {self.lag().seqs} seqs behind as last seen)"
            )
            if self._failures:
                message += (
                    f"; the last {self._failures} feed requests failed, the last with: {self.last_feed_error}"
                )
            if self.strict:
                raise ReplicaError(message)
            if not self._warned:
                self._warned = True
                warnings.warn(message + "; answering from the last state", ReplicaLagWarning, stacklevel=4)
        return self._state  # one reference read: a consistent snapshot

    def _query_params(
        self, st: _State, d: int, k: int | None, sigma: float | str | None
    ) -> tuple[_State, int, float]:
        """The state to answer from, k clipped to its size (0 while inactive) and the numeric
        sigma, as the service resolves them.

        Invalid queries raise RequestRejected (422), as the service would answer them.
        `sigma: "auto"` on an active memory needs the service's value for the state answered
        from: when the replica does not know it yet, it asks the service (and may answer from
        a newer state), and raises ReplicaError when it cannot get it; it never computes
        with another sigma. While the memory is inactive "auto" is `params.INACTIVE_SIGMA`, as
        on the service.
        """
        raw = sigma if sigma is not None else (st.settings or {}).get("sigma", params.INACTIVE_SIGMA)
        if isinstance(raw, str) and raw != params.AUTO:
            raise _rejected("sigma", f"sigma must be a number or 'auto', got {raw!r}")
        s = params.asked_sigma(raw, params.INACTIVE_SIGMA)
        auto = params.INACTIVE_SIGMA  # "auto" on an inactive memory, as on the service
        if s == params.AUTO and st.active:
            st, auto = (st, st.sigma_auto) if st.sigma_auto is not None else self._with_sigma_auto()
        settings = st.settings or {}
        if st.z_dim is not None and d != st.z_dim:
            raise _rejected("z", f"z has {d} dimensions; the memory has z_dim {st.z_dim}")
        want = params.asked_k(k, int(settings.get("k", 64)))
        if not 1 <= want <= MAX_K:
            raise _rejected("k", f"k must be in 1..{MAX_K}, got {want}")
        if s == params.AUTO:
            resolved = auto
        else:
            resolved = float(s)
            if not MIN_SIGMA <= resolved <= MAX_SIGMA:
                raise _rejected(
                    "sigma", f"sigma must be in [{MIN_SIGMA:g}, {MAX_SIGMA:g}] or 'auto', got {raw!r}"
                )
        return st, params.answered_k(want, st.size, st.active), resolved

    def _with_sigma_auto(self) -> tuple[_State, float]:
        """A state and its value of sigma "auto" (INACTIVE_SIGMA if inactive), asked of the service.

        The feed carries the value only to followers that ask for it (resolving it costs the
        service a search per capacity/10 writes), so from the first "auto" on, the feed
        thread asks on every page. Raises ReplicaError when the service cannot be asked (at
        most one attempt per AUTO_RETRY seconds) or sends no value within the timeout.
        """
        self._want_auto = True
        failed = self._auto_failure
        if failed is not None and time.monotonic() - failed[0] < AUTO_RETRY:
            cause = failed[1]
        else:
            try:
                st = self._fetch_sigma_auto()
                self._auto_failure = None
                return st
            except ZMemError as e:
                self._auto_failure = (time.monotonic(), e)
                cause = e
        raise ReplicaError(
            'sigma "auto" has no known value for this memory yet: the replica learns it from the '
            f"service, which could not be asked ({cause}); it answers with no other sigma, so this "
            "call fails until the service can be reached"
        ) from cause

    def _fetch_sigma_auto(self) -> tuple[_State, float]:
        """Syncs until the state held is inactive or knows "auto"; Timeout after the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f'the service sent no value of sigma "auto" within {self.timeout}s')
            # A sync's page at the newest row carries the value for exactly the state it waits for.
            self.sync(left)
            st = self._state
            if not st.active:
                return st, params.INACTIVE_SIGMA
            if st.sigma_auto is not None:
                return st, st.sigma_auto
            time.sleep(0.01)  # writes moved the head meanwhile: the feed thread asks for it too

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
        client's) seconds, TransportError when the service cannot be reached,
        HTTPError when it answers with an error, ReplicaError when its answer is
        refused (`_read_page`) or the replica has failed.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        st = self._state
        params: dict[str, Any] = {"after": st.next_seq - 1, "limit": 1, "wait": 0}
        if st.generation is not None:
            params["generation"] = st.generation
        if self._want_auto:
            params["auto"] = "true"
        meta: dict[str, Any] = {}
        with httpx.Client(
            base_url=self._http.base_url,
            headers=self._http.headers,
            timeout=timeout,
            transport=self._transport,
        ) as http:
            page = self._get_page(http, params, timeout)
        if page is None:
            target: tuple[str | None, int] = (None, 1)
        else:
            meta = page[1]
            target = (meta["generation"], meta["next_seq"])
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
        while not self._stop.is_set():
            base = self._building or self._state  # the state the next page builds on
            wait = self._poll_wait if self._caught_up and base.settings is not None else 0.0
            params: dict[str, Any] = {
                "after": base.next_seq - 1,
                "limit": _page_limit(base.z_dim),
                "wait": wait,
            }
            if base.generation is not None:
                params["generation"] = base.generation
            if self._want_auto:
                params["auto"] = "true"
            sent = time.monotonic()
            if wait:
                self._polling_since = sent
            try:
                page = self._get_page(self._http, params, self.timeout + wait)
                if page is None:
                    self._apply_missing(sent)
                    self._failures = 0
                    self._stop.wait(min(1.0, self._poll_wait))  # nothing to long-poll on yet
                    continue
                self._apply_page(*page)
                self._failures = 0
                if len(page[0]["seq"]) and page[1]["complete"]:
                    self._stop.wait(self._min_interval - (time.monotonic() - sent))
            except _RefusedPage as e:  # the service may mend (a proxy's glitch): keep the last state
                self._feed_failed(e)
            except ReplicaError as e:
                self._fail(e)
                return
            except RequestRejected as e:  # 401, 403, 404 (no feed route), 422: a retry won't help
                self._fail(ReplicaError(f"the service refused the replica's feed request: {e}"))
                return
            except Exception as e:  # unreachable, 5xx: back off and try again
                self._feed_failed(e)
            finally:
                self._polling_since = None

    def _get_page(
        self, http: httpx.Client, params: dict[str, Any], timeout: float
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """One checked feed page (`_read_page`), None when the memory does not exist.

        Raises TransportError (unreachable, or not answered within `timeout`), HTTPError
        (an error answer) or _RefusedPage.
        """
        url = self._prefix + "changes"
        deadline = time.monotonic() + timeout
        try:
            with http.stream("GET", url, params=params, headers=FEED_HEADERS, timeout=timeout) as r:
                if r.status_code >= 400:
                    error = _read_error(r, deadline)
                    if r.status_code == 404 and str(error.problem.get("type", "")).endswith("/not-found"):
                        return None
                    raise error
                return _read_page(r, params["limit"], self.max_bytes, deadline)
        except httpx.HTTPError as e:
            raise TransportError(f"GET {url}: cannot reach the service: {e}") from e

    def _feed_failed(self, error: Exception) -> None:
        """Count a failed feed request and back off."""
        if self._stop.is_set():  # closing cut the request short: not the service's failure
            return
        self.feed_errors += 1
        self.last_feed_error = error
        self._failures += 1
        self._caught_up = False
        self._stop.wait(min(2.0, 0.05 * 2 ** min(self._failures, 6)) * random.uniform(0.5, 1.5))

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
        """Apply one feed page, checked by `_read_page`. A page that starts the mirror over
        (reset, new generation, other capacity or z_dim) builds a private state that is
        published only once it reaches the newest row, so risk() never answers from a
        half-copied memory. A page that does not follow the mirror raises _RefusedPage
        before anything changes."""
        self.pages += 1
        st = self._building or self._state
        settings = meta["settings"]
        generation = meta["generation"]
        starts_over = (
            meta["reset"]
            or generation != st.generation
            or st.settings is None
            or settings["capacity"] != st.settings["capacity"]
            or (st.z_dim is not None and settings.get("z_dim") != st.z_dim)
        )
        seq = arrays["seq"]
        if len(seq) and not starts_over and seq[0] < st.next_seq:
            raise _RefusedPage(
                f"a feed page of generation {generation} starts at seq {seq[0]}; the replica holds "
                f"up to {st.next_seq - 1} and the page is no reset"
            )
        if starts_over:
            if self._state.settings is not None:
                self.resets += 1
            st = _empty_state(self.device, settings, generation)
            self._building = st
        if len(seq):
            st = self._append(st, arrays["z"], arrays["risk_target"], seq, settings)
        st = replace(st, settings=settings, generation=generation)
        if meta.get("sigma_auto") is not None:
            st = replace(st, sigma_auto=float(meta["sigma_auto"]))
        complete = meta["complete"]
        if complete:
            st = replace(st, next_seq=max(st.next_seq, meta["next_seq"]))
            oldest = int(st.host_seq[st.start]) if st.size else None
            if st.size != meta["size"] or (st.size and oldest != meta["oldest_seq"]):
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
            self._feed_next_seq = meta["next_seq"]
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


def _row_bytes(z_dim: int) -> int:
    """Bytes of one row in a page: z (float32 [z_dim]), risk_target (float32), seq (int64)."""
    return 4 * z_dim + 4 + 8


def _page_limit(z_dim: int | None) -> int:
    """Rows to ask for in one page of a memory of `z_dim` (unknown: the widest possible)."""
    return max(1, min(PAGE_ROWS, PAGE_BYTES // _row_bytes(z_dim or MAX_Z_DIM)))


class _Body:
    """A streamed answer's body, read in exact amounts: past `cap` bytes in all, or past
    `deadline`, it stops reading and raises, so a body's size is bounded by what its
    request can legitimately bring back, not by what the other side sends."""

    def __init__(self, r: httpx.Response, cap: int, deadline: float) -> None:
        self._chunks = r.iter_bytes()
        self._pending = memoryview(b"")
        self._cap = cap
        self._deadline = deadline
        self._url = r.request.url
        self.received = 0

    def _next(self) -> bool:
        for chunk in self._chunks:
            self.received += len(chunk)
            if self.received > self._cap:
                raise _RefusedPage(f"GET {self._url}: the answer runs past {self._cap} bytes, its cap")
            if time.monotonic() > self._deadline:
                raise Timeout(f"GET {self._url}: the answer was not complete in time")
            if chunk:
                self._pending = memoryview(chunk)
                return True
        return False

    def read(self, n: int) -> bytearray:
        """Exactly the next `n` bytes; _RefusedPage if the body ends first."""
        out = bytearray(n)
        view, at = memoryview(out), 0
        while at < n:
            if not self._pending and not self._next():
                raise _RefusedPage(f"GET {self._url}: the answer ends after {self.received} bytes")
            take = min(n - at, len(self._pending))
            view[at : at + take] = self._pending[:take]
            self._pending = self._pending[take:]
            at += take
        return out

    def at_end(self) -> bool:
        return not self._pending and not self._next()


_COLUMNS: dict[str, tuple[str, np.dtype[Any], int]] = {  # name: (safetensors dtype, numpy dtype, rank)
    "z": ("F32", np.dtype("<f4"), 2),
    "risk_target": ("F32", np.dtype("<f4"), 1),
    "seq": ("I64", np.dtype("<i8"), 1),
}


def _read_page(
    r: httpx.Response, limit: int, max_bytes: int, deadline: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (`z` float32 [n, z_dim], `risk_target` float32 [n], `seq` int64 [n]) and the
    metadata of a feed page asked for with `limit`, checked (`_check_meta`, `_check_rows`).

    Reads at most what such a page can hold: `limit` rows of the widest z, no more than
    `max_bytes` (a page the mirror could not hold is no use), plus its header; the header's
    tensor table is checked before the rows are read, and nothing past its declared end is
    read. Raises _RefusedPage for anything else, before reading it where the headers tell,
    and ReplicaError for rows past `max_bytes`.
    """
    where = f"GET {r.request.url}"
    kind = r.headers.get("content-type", "")
    if not kind.startswith(SAFETENSORS):
        raise _RefusedPage(f"{where}: the page came as {kind[:80]!r}, not {SAFETENSORS}")
    encoding = r.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _RefusedPage(f"{where}: the page came {encoding[:40]!r}-encoded; the replica asks for identity")
    data_cap = min(limit * _row_bytes(MAX_Z_DIM), max_bytes)
    cap = 8 + HEADER_BYTES + data_cap
    declared = r.headers.get("content-length", "").strip()
    if declared and (not declared.isdigit() or int(declared) > cap):
        raise _RefusedPage(f"{where}: the page declares {declared[:40]} bytes; at most {cap} can be one")
    body = _Body(r, cap, deadline)
    (n,) = struct.unpack("<Q", body.read(8))
    if n > HEADER_BYTES:
        raise _RefusedPage(
            f"{where}: the page's header declares {n} bytes; at most {HEADER_BYTES} can be one"
        )
    try:
        header = json.loads(bytes(body.read(n)))
        raw = header.pop("__metadata__", None) or {}
        meta = {key: json.loads(value) for key, value in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise _RefusedPage(f"{where}: the page's header is not safetensors: {e}") from None
    try:
        _check_meta(meta)
        layout, total = _check_layout(header, meta, limit, max_bytes)
    except _RefusedPage as e:
        raise _RefusedPage(f"{where}: {e}") from None
    data = body.read(total)
    if not body.at_end():
        raise _RefusedPage(f"{where}: the page goes on past the {8 + n + total} bytes its header declares")
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin) in layout.items():
        a = np.frombuffer(data, dtype, int(np.prod(shape)), begin).reshape(shape)
        arrays[name] = a if a.flags.aligned else a.copy()
    try:
        _check_rows(arrays, meta)
    except _RefusedPage as e:
        raise _RefusedPage(f"{where}: {e}") from None
    return arrays, meta


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_sigma(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and MIN_SIGMA <= v <= MAX_SIGMA


def _check_meta(meta: dict[str, Any]) -> None:
    """A page's metadata as the service sends it (SPEC §2), or _RefusedPage naming what is not:
    anything the replica mirrors or answers with must be of its type and range."""
    settings = meta.get("settings")
    wrong: list[str] = []
    if not isinstance(meta.get("generation"), str) or not 0 < len(meta["generation"]) <= 128:
        wrong.append("generation")
    wrong += [key for key in ("reset", "complete") if not isinstance(meta.get(key), bool)]
    if not _is_int(meta.get("next_seq"), 1, 2**62):
        wrong.append("next_seq")
    if meta.get("oldest_seq") is not None and not _is_int(meta["oldest_seq"], 1, 2**62):
        wrong.append("oldest_seq")
    if meta.get("sigma_auto") is not None and not _is_sigma(meta["sigma_auto"]):
        wrong.append("sigma_auto")
    if not isinstance(settings, dict):
        wrong.append("settings")
    else:
        if settings.get("z_dim") is not None and not _is_int(settings["z_dim"], 1, MAX_Z_DIM):
            wrong.append("settings.z_dim")
        if not _is_int(settings.get("capacity"), 1, MAX_CAPACITY):
            wrong.append("settings.capacity")
        if not _is_int(settings.get("min_size"), 0, MAX_CAPACITY):
            wrong.append("settings.min_size")
        if not _is_int(settings.get("k"), 1, MAX_K):
            wrong.append("settings.k")
        if settings.get("sigma") != "auto" and not _is_sigma(settings.get("sigma")):
            wrong.append("settings.sigma")
        capacity = settings["capacity"] if "settings.capacity" not in wrong else 0
        if not _is_int(meta.get("size"), 0, capacity):
            wrong.append("size")
    if wrong:
        shown = {key: meta.get(key) for key in wrong if "." not in key}
        raise _RefusedPage(f"the page's metadata is invalid ({', '.join(wrong)}): {str(shown)[:300]}")


def _check_layout(
    header: Any, meta: dict[str, Any], limit: int, max_bytes: int
) -> tuple[dict[str, tuple[np.dtype[Any], tuple[int, ...], int]], int]:
    """The page's tensor table checked against its settings: exactly `z` F32 [n, z_dim],
    `risk_target` F32 [n] and `seq` I64 [n] with n ≤ limit and n ≤ capacity, tiling the data
    without gaps → ({name: (dtype, shape, offset)}, data bytes). Rows past `max_bytes` raise
    ReplicaError: the mirror could never hold them."""
    if not isinstance(header, dict) or set(header) != set(_COLUMNS):
        names = sorted(map(str, header)) if isinstance(header, dict) else type(header).__name__
        raise _RefusedPage(f"the page holds tensors {names}; a page is exactly {sorted(_COLUMNS)}")
    layout: dict[str, tuple[np.dtype[Any], tuple[int, ...], int]] = {}
    spans = []
    for name, (dtype, numpy_dtype, rank) in _COLUMNS.items():
        info = header[name] if isinstance(header[name], dict) else {}
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (
            info.get("dtype") != dtype
            or not isinstance(shape, list)
            or len(shape) != rank
            or not all(_is_int(x, 0, 2**40) for x in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(x, 0, 2**62) for x in offsets)
        ):
            shown = str(header[name])[:200]
            raise _RefusedPage(f"the page's {name} is {shown}; it must be {dtype} of rank {rank}")
        size = int(np.prod(shape)) * numpy_dtype.itemsize
        if offsets[1] - offsets[0] != size:
            raise _RefusedPage(f"the page's {name} {shape} {dtype} spans bytes {offsets}")
        layout[name] = (numpy_dtype, tuple(shape), offsets[0])
        spans.append(offsets)
    total = 0
    for begin, end in sorted(spans):
        if begin != total:
            raise _RefusedPage(f"the page's tensors do not tile its data: {sorted(spans)}")
        total = end
    n, d = layout["z"][1]
    z_dim, capacity = meta["settings"].get("z_dim"), meta["settings"]["capacity"]
    if n and d != z_dim:
        raise _RefusedPage(f"the page's z has {d} columns; its settings say z_dim {z_dim}")
    if layout["risk_target"][1] != (n,) or layout["seq"][1] != (n,):
        lengths = {name: layout[name][1][0] for name in _COLUMNS}
        raise _RefusedPage(f"the page's columns disagree in length: {lengths}")
    if n > min(limit, capacity):
        raise _RefusedPage(f"the page holds {n} rows; {limit} were asked for, capacity {capacity}")
    if total > max_bytes:  # the mirror needs more than the page: following this memory is hopeless
        raise ReplicaError(
            f"the replica needs more than {total} bytes for {n} rows of z_dim {d} (a page of the "
            f"memory, capacity {capacity}), over replica_max_bytes={max_bytes}: raise the limit "
            "or use replica=False"
        )
    return layout, total


def _check_rows(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Rows the mirror can hold: seqs ascending within the page's seq range, finite numbers, z
    whose squared norm fits float32 (as the service admits them), or _RefusedPage."""
    z, rt, seq = arrays["z"], arrays["risk_target"], arrays["seq"]
    if not len(seq):
        return
    oldest = meta["oldest_seq"] if meta["oldest_seq"] is not None else 1
    if seq[0] < oldest or seq[-1] >= meta["next_seq"] or (len(seq) > 1 and (np.diff(seq) <= 0).any()):
        raise _RefusedPage(
            f"the page's seqs {seq[0]}..{seq[-1]} are not ascending within [{oldest}, {meta['next_seq']})"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        sqnorm = np.einsum("ij,ij->i", z, z)
    if not np.isfinite(sqnorm).all() or not np.isfinite(rt).all():
        raise _RefusedPage("the page holds a non-finite number, or a z whose squared norm overflows float32")


def _read_error(r: httpx.Response, deadline: float) -> HTTPError:
    """The client's error for an error answer, from at most ERROR_BYTES of its body."""
    body, chunks = bytearray(), r.iter_bytes()
    for chunk in chunks:
        body += chunk[: ERROR_BYTES - len(body)]
        if len(body) >= ERROR_BYTES or time.monotonic() > deadline:
            break
    try:
        problem = json.loads(bytes(body))
        if not isinstance(problem, dict):
            raise ValueError("not an object")
    except ValueError:
        problem = {"title": r.reason_phrase, "detail": body[:500].decode("utf-8", "replace")}
    cls = RequestRejected if r.status_code < 500 else ServerError
    return cls(r.status_code, problem, f"{r.request.method} {r.request.url}")


def _rejected(field: str, message: str) -> RequestRejected:
    """The 422 the service answers a query it refuses (`ValidationFailed.at`), raised by the replica."""
    problem = {
        "type": "https://zmem.dev/problems/validation",
        "title": "Validation failed",
        "status": 422,
        "detail": f"{field}: {message}",
        "errors": [{"loc": [field], "msg": message}],
    }
    return RequestRejected(422, problem, "the replica")


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
            except Exception:  # the service is away or refuses: drop, count, back off
                self.dropped += rows
                failures += 1
                time.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _post(self, stats: dict[str, np.ndarray]) -> None:
        deadline = time.monotonic() + (self._http.timeout.read or 60.0)
        with self._http.stream(
            "POST",
            self._prefix + "queries",
            content=wire.encode(stats, {}),
            headers={"content-type": SAFETENSORS, "accept-encoding": "identity"},
        ) as r:
            if r.status_code >= 400:
                raise _read_error(r, deadline)


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
    done = _record_event(t.device)
    while not done.query():
        time.sleep(0.0005)
    return host.numpy()
