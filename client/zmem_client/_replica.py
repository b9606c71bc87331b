"""The replica source: a local copy of one memory that answers `risk()` in-process.

A daemon thread, started by the first query (or `sync`), long-polls `GET …/changes`
(`_pages`) and mirrors the memory into tensors on a chosen device with the service's FIFO
semantics (`_mirror`: immutable snapshots, the core's search); `find` answers from the
newest snapshot with the same exact kNN (ties by the lower seq) and the client applies the
same kernel, so for the same buffer the answer is the service's. After the first sync
nothing in `risk()` touches the network: while the service is away the replica answers
from its last state and reports how far behind it may be (`lag()`). Its query records go
to the service from their own thread (`_records`).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import torch

from zmem_core import params
from zmem_core.limits import MAX_K, MAX_SIGMA, MIN_SIGMA

from ._backoff import backoff
from ._exceptions import ReplicaError, ReplicaLagWarning, RequestRejected, Timeout, ZMemError
from ._http import missing, rejected
from ._mirror import Mirror, Snapshot
from ._pages import PageRefused, get_page, page_limit
from ._records import QueryPoster, query_stats, record_event
from ._sources import Found, Lag, NeighborSource

__all__ = ["Lag", "Replica", "ReplicaError", "ReplicaLagWarning", "query_stats"]
log = logging.getLogger("zmem_client")

AUTO_RETRY = 1.0
"""Seconds during which, after asking the service for the value of sigma "auto" failed, the
risk path raises again without asking (the feed thread keeps asking): an outage costs each
call one failed request per second at most, not a timeout each."""
POLL_WAIT = 10.0  # seconds a caught-up replica long-polls for news (the service allows 30)
POLL_SLACK = 1.0  # seconds past its wait by which a long poll's answer is late
MIN_INTERVAL = 0.05
"""Seconds between the starts of two feed requests while rows keep coming: each request
costs the service about as much as a write, so a busy memory is followed in pages of
many rows rather than one page per write (it bounds the lag this adds)."""


class Replica(NeighborSource):
    """Mirror of one memory on `device`, kept current by a background thread.

    `prefix` is the memory's route prefix ("/" or "/memories/NAME/"); `headers`
    (auth) and `transport` (tests) are as for the client. The replica opens its own
    connections: one for the feed, one for the query records. Thread-safe: `find`,
    `lag` and `sync` may be called from any thread.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        memory: str = "default",
        worker: str | None = None,
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
        self.memory = memory
        self.timeout = timeout
        self.max_lag = max_lag
        self.strict = strict
        self.max_bytes = max_bytes
        self._transport = transport
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        records_http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        self._prefix = prefix
        self._where = f"the replica of {url}{prefix}"
        self._poll_wait = poll_wait
        self._min_interval = min_interval
        self._mirror = Mirror(self.device, max_bytes)
        self._lock = threading.Lock()  # guards the published state, the lag clocks and the start
        self._state = self._mirror.empty(None, None)
        self._synced = threading.Event()  # set at the first complete page (or 404)
        self._stop = threading.Event()
        self._error: ZMemError | None = None  # a permanent failure the risk path raises
        self._started_at: float | None = None
        self._synced_at: float | None = None  # the last moment it knew it was caught up
        self._polling_since: float | None = None  # a long poll from a caught-up state is waiting
        self._feed_next_seq = 1  # the memory's next_seq as last seen
        self._warned = False
        self._building: Snapshot | None = None  # a fresh mirror being filled (feed thread only)
        self._want_auto = False  # a caller asked for sigma "auto": the feed must send its value
        self._auto_failure: tuple[float, ZMemError] | None = None  # when asking for it last failed, and why
        self._caught_up = False  # the last page reached the newest row (feed thread only)
        self.pages = 0
        self.resets = 0
        self.mismatches = 0
        self.feed_errors = 0
        self.last_feed_error: BaseException | None = None
        self._failures = 0  # feed requests failed in a row (feed thread only)
        self._records = QueryPoster(records_http, prefix, memory, max_pending_records, worker=worker)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start following the feed (the first query or `sync` does; starting twice does nothing).

        A client made only to be pickled into worker processes never follows the feed."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._started_at = time.monotonic()
            self._thread = threading.Thread(target=self._follow, name="zmem-replica", daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    # -- the risk path ------------------------------------------------------------------

    def find(
        self, rows: torch.Tensor, k: int | None, sigma: float | str | None, *, record: bool, with_seq: bool
    ) -> Found:
        """The service's neighbours of rows (detached float [B, d]) from the mirrored memory.

        Tensors on the replica's device. Invalid queries raise RequestRejected (422) as the
        service answers them; a memory the service does not have raises NoSuchMemory.
        """
        if self._thread is None:
            self.start()
        st = self._snapshot()
        if st.settings is None:
            raise missing(self.memory, self._where)
        st, kk, resolved = self._query_params(st, rows.shape[-1], k, sigma)
        if kk == 0:
            b, d = rows.shape
            return Found(
                d2=torch.zeros((b, 0), device=self.device),
                z=torch.zeros((b, 0, d), device=self.device),
                risk_target=torch.zeros((b, 0), device=self.device),
                seq=torch.zeros((b, 0), dtype=torch.int64, device=self.device) if with_seq else None,
                size=st.size,
                active=st.active,
                k=0,
                sigma=resolved,
            )
        d2, z, rt, seq = self._mirror.find(st, rows, kk)
        if record:
            self._records.put(d2, rt, resolved)
        return Found(
            d2=d2,
            z=z,
            risk_target=rt,
            seq=seq if with_seq else None,
            size=st.size,
            active=st.active,
            k=kk,
            sigma=resolved,
        )

    def _snapshot(self) -> Snapshot:
        """The current state; waits for the first sync, enforces the lag limit."""
        if not self._synced.is_set() and not self._synced.wait(self.timeout):
            if self._error is not None:
                raise self._error
            message = (
                f"the replica found no complete state of the memory within {self.timeout}s "
                f"({self.feed_errors} failed feed requests)"
            )
            last = self.last_feed_error
            if isinstance(last, PageRefused):  # the service answers, but not with usable pages
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
        self, st: Snapshot, d: int, k: int | None, sigma: float | str | None
    ) -> tuple[Snapshot, int, float]:
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
            raise rejected("sigma", f"sigma must be a number or 'auto', got {raw!r}")
        s = params.asked_sigma(raw, params.INACTIVE_SIGMA)
        auto = params.INACTIVE_SIGMA  # "auto" on an inactive memory, as on the service
        if s == params.AUTO and st.active:
            st, auto = (st, st.sigma_auto) if st.sigma_auto is not None else self._with_sigma_auto()
        settings = st.settings or {}
        if st.z_dim is not None and d != st.z_dim:
            raise rejected("z", f"z has {d} dimensions; the memory has z_dim {st.z_dim}")
        want = params.asked_k(k, int(settings.get("k", 64)))
        if not 1 <= want <= MAX_K:
            raise rejected("k", f"k must be in 1..{MAX_K}, got {want}")
        if s == params.AUTO:
            resolved = auto
        else:
            resolved = float(s)
            if not MIN_SIGMA <= resolved <= MAX_SIGMA:
                raise rejected(
                    "sigma", f"sigma must be in [{MIN_SIGMA:g}, {MAX_SIGMA:g}] or 'auto', got {raw!r}"
                )
        return st, params.answered_k(want, st.size, st.active), resolved

    def _with_sigma_auto(self) -> tuple[Snapshot, float]:
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

    def _fetch_sigma_auto(self) -> tuple[Snapshot, float]:
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
        if synced is None and self._started_at is None:
            return 0.0  # not following yet: the first query starts it and waits for a sync
        return now - (synced if synced is not None else (self._started_at or now))

    def sync(self, timeout: float | None = None) -> None:
        """Return once the replica holds everything the service held when this was called.

        Asks the service for its newest seq (one small request), then waits for the
        feed thread to get there. Raises Timeout after `timeout` (default: the
        client's) seconds, TransportError when the service cannot be reached,
        HTTPError when it answers with an error, ReplicaError when its answer is
        refused (`_read_page`) or the replica has failed.
        """
        self.start()
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
            # Fresh: a cache between here and the service (a fan-out proxy) must not answer this.
            page = get_page(http, self._prefix, self.memory, params, timeout, self.max_bytes, fresh=True)
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
    def state(self) -> Snapshot:
        return self._state

    @property
    def uncertified(self) -> int:
        """Query rows a GPU replica answered without its search's certificate (see `_mirror`)."""
        return self._mirror.uncertified

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

    def flush(self, timeout: float) -> bool:
        """Wait until the query records queued so far were posted (or dropped); False on timeout."""
        return self._records.flush(timeout)

    flush_records = flush

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads (query records still queued get up to `timeout` seconds)."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        self._records.close(timeout)
        if thread is None:
            self._http.close()
            return
        # The feed thread closes its own connection: closing it from here would leave the
        # socket of a long poll in flight unclosed. One still polling exits when the poll returns.
        thread.join(min(timeout, 0.1))

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
                "limit": page_limit(base.z_dim),
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
                page = get_page(
                    self._http, self._prefix, self.memory, params, self.timeout + wait, self.max_bytes
                )
                if page is None:
                    self._apply_missing(sent)
                    self._failures = 0
                    self._stop.wait(min(1.0, self._poll_wait))  # nothing to long-poll on yet
                    continue
                self._apply_page(*page)
                self._mirror.check()  # uncertified GPU answers are said, never silent
                self._failures = 0
                if page[1]["complete"]:  # paced: a cache may answer a long poll at once
                    self._stop.wait(self._min_interval - (time.monotonic() - sent))
            except PageRefused as e:  # the service may mend (a proxy's glitch): keep the last state
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

    def _feed_failed(self, error: Exception) -> None:
        """Count a failed feed request and back off."""
        if self._stop.is_set():  # closing cut the request short: not the service's failure
            return
        self.feed_errors += 1
        self.last_feed_error = error
        self._failures += 1
        self._caught_up = False
        if self._failures == 1:  # once per outage; `feed_errors` counts every one
            log.warning("%s: a feed request failed (%s); retrying with backoff", self._where, error)
        self._stop.wait(backoff(self._failures, 0.1, 2.0))

    def _fail(self, error: ZMemError) -> None:
        log.error("%s stops following the service: %s", self._where, error)
        self._error = error
        self._synced.set()  # a waiting first risk() raises the error instead of timing out

    def _apply_missing(self, sent: float) -> None:
        """404: the memory does not exist; the replica is empty and inactive."""
        with self._lock:
            if self._state.settings is not None:
                self.resets += 1
            self._state = self._mirror.empty(None, None)
            self._building = None
            self._feed_next_seq = 1
            self._synced_at = sent
        self._caught_up = True
        self._synced.set()

    def _apply_page(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Apply one feed page, checked by `read_page`. A page that starts the mirror over
        (reset, new generation, other capacity or z_dim) builds a private state that is
        published only once it reaches the newest row, so risk() never answers from a
        half-copied memory. A page that does not follow the mirror raises PageRefused
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
            raise PageRefused(
                f"a feed page of generation {generation} starts at seq {seq[0]}; the replica holds "
                f"up to {st.next_seq - 1} and the page is no reset"
            )
        if starts_over:
            if self._state.settings is not None:
                self.resets += 1
            st = self._mirror.empty(settings, generation)
            self._building = st
        if len(seq):
            st = self._mirror.append(st, arrays["z"], arrays["risk_target"], seq, int(settings["capacity"]))
        st = replace(st, settings=settings, generation=generation)
        if meta.get("sigma_auto") is not None:
            st = replace(st, sigma_auto=float(meta["sigma_auto"]))
        complete = meta["complete"]
        if complete:
            st = replace(st, next_seq=max(st.next_seq, meta["next_seq"]))
            oldest = int(st.host_seq[st.start]) if st.size else None
            if st.size != meta["size"] or (st.size and oldest != meta["oldest_seq"]):
                # The mirror disagrees with the service (it should not): start over, keep answering.
                self._building = self._mirror.empty(None, None)
                self._caught_up = False
                self.mismatches += 1
                return
        if self.device.type == "cuda":
            st = replace(st, ready=record_event(self.device))
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
