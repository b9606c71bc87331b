"""`ZMemClient`: record episodes, query neighbours, and get a differentiable risk."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import torch

from zmem_core.busy import BusyWait
from zmem_core.limits import (
    MAX_BATCH,
    MAX_ID_CHARS,
    MAX_SQNORM,
    MAX_WORKER_CHARS,
    rows_too_large,
    text_problem,
)
from zmem_core.names import check_name

from ._exceptions import ClientClosed, FlushTimeout, NoSuchMemory, SendFailed, ZMemWarning
from ._http import checked, mapped
from ._risk import kernel_dtype, kernel_risk
from ._sender import Sender
from ._sources import Lag, NeighborSource, RemoteSource
from ._transport import lean_transport

if TYPE_CHECKING:
    from ._replica import Replica

ArrayLike = torch.Tensor | np.ndarray | list[float]
EXIT_TIMEOUT_ON_ERROR = 2.0  # leaving a `with` block on an exception waits at most this long


class ZMemClient:
    """A connection to one memory of a zmem service.

    `record` returns at once (a background thread sends); `risk`, `neighbors` and
    the other calls block for at most `timeout` seconds and raise a `ZMemError`
    subclass on failure. Pickling keeps only the constructor arguments, so each
    worker process that unpickles a client opens its own connection.

    Leaving a `with` block flushes for at most `exit_timeout` seconds (at most
    2 s when the block raised; that exception propagates unchanged), then warns
    (`ZMemWarning`) with the number of episodes not yet delivered: they stay with
    the background sender, which keeps trying until the process exits; at exit it
    waits up to `exit_timeout` once more and says how many were lost, and how many the
    service refused for good (`dropped`). `close(timeout)` instead raises `FlushTimeout`
    and leaves the client open. Any call on a closed client raises `ClientClosed`.

    `busy_wait`: seconds a query (`risk`, `neighbors`) waits for the service's answer
    polling its socket before it sleeps, while its core is free (`zmem_core.busy`: waking
    a sleeping process cost a small query about a sixth of its time on a virtual
    machine); 0: never poll.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        memory: str = "default",
        token: str | None = None,
        timeout: float = 10.0,
        exit_timeout: float = 30.0,
        queue_size: int = 100_000,
        batch_size: int = 1024,
        worker: str | None = None,
        transport: httpx.BaseTransport | None = None,
        replica: bool = False,
        device: str | torch.device | None = None,
        max_lag: float = 30.0,
        strict: bool = False,
        replica_max_bytes: int = 2**31,
        busy_wait: float = 0.002,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        check_name(memory)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not exit_timeout >= 0:
            raise ValueError(f"exit_timeout must be >= 0 seconds, got {exit_timeout!r}")
        if queue_size < 1 or not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(
                f"queue_size must be >= 1 and batch_size in 1..{MAX_BATCH}, got {queue_size}, {batch_size}"
            )
        busy = BusyWait(busy_wait)  # a bad value raises here, replica or not
        self.url = url.rstrip("/")
        self.memory = memory
        self.timeout = timeout
        self.exit_timeout = exit_timeout
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._args = {
            "url": url,
            "memory": memory,
            "token": token,
            "timeout": timeout,
            "exit_timeout": exit_timeout,
            "queue_size": queue_size,
            "batch_size": batch_size,
            "worker": worker,
        }
        self._prefix = "/" if memory == "default" else f"/memories/{memory}/"
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # Separate connections: the sender's retries never queue up behind a training step's
        # query. `transport` (e.g. httpx.MockTransport) is for tests; it is not pickled. Both
        # take the lean http.client transport: its timeout is a deadline for each whole call.
        # None (https, or a proxy in the environment): httpx's default, which honours the proxy.
        query_transport = transport or lean_transport(self.url, timeout)
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=query_transport
        )
        send_http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=transport or lean_transport(self.url, timeout),
        )
        self._sender = Sender(
            send_http,
            self._prefix + "episodes",
            memory=memory,
            where=self._where,
            queue_size=queue_size,
            batch_size=batch_size,
            exit_timeout=exit_timeout,
        )
        self._ids = f"{uuid.uuid4().hex[:16]}-"
        self._next_id = 0
        self._record_lock = threading.Lock()  # ids are taken in order
        self._closed = False
        self._args.update(
            replica=replica,
            device=None if device is None else str(device),
            max_lag=max_lag,
            strict=strict,
            replica_max_bytes=replica_max_bytes,
            busy_wait=busy_wait,
        )
        # Where neighbours come from: the service, or a replica following its changes feed
        # (which starts with the first query: a client made only to be pickled never follows).
        self._source: NeighborSource
        if replica:
            from ._replica import Replica

            self._source = Replica(
                self.url,
                self._prefix,
                memory=memory,
                worker=self._query_worker,
                headers=headers,
                transport=transport,
                device=device,
                timeout=timeout,
                max_lag=max_lag,
                strict=strict,
                max_bytes=replica_max_bytes,
            )
        else:
            self._source = RemoteSource(
                self.url,
                self._prefix,
                memory,
                self._http,
                query_transport,
                self._query_worker,
                busy,
            )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._args,))

    def __repr__(self) -> str:
        return f"ZMemClient({self.url!r}, memory={self.memory!r})"

    @property
    def _query_worker(self) -> str | None:
        """The worker a recorded query names (`risk.png?worker=`): this client's, where the
        service takes it (a default built from a long host name may not be)."""
        return self.worker if text_problem(self.worker, MAX_WORKER_CHARS, allow_empty=False) is None else None

    @property
    def _where(self) -> str:
        return f"{self.url} (memory {self.memory!r})"

    @property
    def replica(self) -> Replica | None:
        """The replica answering `risk()` and `neighbors()` (`replica=True`), else None."""
        from ._replica import Replica

        return self._source if isinstance(self._source, Replica) else None

    # -- recording --------------------------------------------------------------------

    def record(
        self,
        z: ArrayLike,
        *,
        soft_bind: float,
        cone_vol: float,
        lambda_bind: float,
        E_T: float = 0.0,
        lambda_T: float = 0.0,
        Hr: float = 0.0,
        id: str | None = None,
        worker: str | None = None,
    ) -> str:
        """Queue one episode (z of shape [d] or [1, d]) and return its idempotency id.

        Raises ValueError for invalid values (here, not later in the background; `cone_vol`
        must be > 0, `soft_bind` in [0, 1], z of the dimension the service accepted before),
        QueueFull when the queue is full, ClientClosed after close, and EpisodesDropped (a
        SendFailed) once after earlier episodes were dropped: this one is queued all the same.
        """
        if self._closed:
            raise ClientClosed(f"record() on a closed client: {self!r} is closed")
        arr = _as_numpy(z)
        if arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[0] != 1) or arr.size == 0:
            raise ValueError(f"z must have shape [d] or [1, d], got {list(arr.shape)}")
        vec = arr.astype(np.float32).reshape(-1)
        if not np.isfinite(vec).all():
            raise ValueError("z must be finite (no NaN or inf)")
        if rows_too_large(vec[None]).size:
            raise ValueError(
                f"z is too large: its squared norm must be at most float32 max / 4 ({MAX_SQNORM:.3g})"
            )
        values = {
            "soft_bind": soft_bind,
            "cone_vol": cone_vol,
            "lambda_bind": lambda_bind,
            "E_T": E_T,
            "lambda_T": lambda_T,
            "Hr": Hr,
        }
        for name, value in values.items():
            value = float(value)
            if not np.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            values[name] = value
        if not 0.0 <= values["soft_bind"] <= 1.0:
            raise ValueError(f"soft_bind must be in [0, 1], got {values['soft_bind']}")
        if not values["cone_vol"] > 0:  # the risk target takes its log
            raise ValueError(f"cone_vol must be > 0, got {values['cone_vol']}")
        if not values["lambda_bind"] >= 0:
            raise ValueError(f"lambda_bind must be >= 0, got {values['lambda_bind']}")
        # Empty is refused for both: the service takes an empty worker, but here it would
        # silently become this client's default worker.
        for name, text, limit in (("id", id, MAX_ID_CHARS), ("worker", worker, MAX_WORKER_CHARS)):
            problem = text_problem(text, limit, allow_empty=False)
            if problem:
                raise ValueError(f"{name} {problem}, got {text!r}")
        with self._record_lock:
            accepted = self._sender.accepted_z_dim
            if accepted is not None and vec.shape[0] != accepted:
                raise ValueError(
                    f"z has {vec.shape[0]} dimensions; memory {self.memory!r} accepted {accepted} "
                    "from this client"
                )
            if id is None:
                id = f"{self._ids}{self._next_id}"
                self._next_id += 1
            self._sender.put({"z": vec, "id": id, "worker": worker or self.worker, **values})
        return id

    def flush(self, timeout: float | None = None) -> None:
        """Return once every recorded episode is acknowledged (stored durably) or dropped, and
        a replica's query records are posted (or dropped: they are diagnostics).

        Raises FlushTimeout when `timeout` runs out (the queue is kept), and EpisodesDropped
        (a SendFailed) once when episodes were dropped since the last report: the service
        refused them for good (see `dropped`).
        """
        if self._closed:
            raise ClientClosed(f"flush() on a closed client: {self!r} is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._sender.flush(timeout)
        left = self.timeout if deadline is None else max(0.0, deadline - time.monotonic())
        self._source.flush(left)

    @property
    def pending(self) -> int:
        """Episodes recorded but not yet acknowledged."""
        return self._sender.pending

    @property
    def dropped(self) -> int:
        """Recorded episodes dropped since this client started: the service refused them for
        good (a 422 naming them, say). Each drop is also raised once (EpisodesDropped)."""
        return self._sender.dropped

    def close(self, timeout: float | None = None) -> None:
        """Flush (waiting at most `timeout` seconds), then close the connections.

        When the flush times out or fails, it raises and the client stays open with
        its queue, so a later `close()` or `flush()` can finish the job. Closing a
        closed client does nothing.
        """
        if self._closed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self._sender.close(timeout)
        self._shut(self.timeout if deadline is None else max(0.0, deadline - time.monotonic()))

    def _shut(self, timeout: float) -> None:
        """Closed: the source stops (its queued records get `timeout`), the connections close;
        episodes still pending stay with the released sender (see `_sender`)."""
        self._closed = True
        self._source.close(timeout)
        self._http.close()
        self._sender.release()

    def __enter__(self) -> ZMemClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Flush for a bounded time; never hang, never mask the block's own exception."""
        if self._closed:
            return
        failed = exc_type is not None
        timeout = min(self.exit_timeout, EXIT_TIMEOUT_ON_ERROR) if failed else self.exit_timeout
        started = time.monotonic()
        try:
            self._sender.close(timeout)
        except FlushTimeout:
            self._shut(0.0)
            warnings.warn(
                f"zmem: {self._sender.pending} recorded episodes not yet delivered to {self.url} "
                f"(memory {self.memory!r}) after {timeout:g}s; the background sender keeps them and "
                "keeps trying until the process exits",
                ZMemWarning,
                stacklevel=2,
            )
            return
        except SendFailed as e:
            self._shut(0.0)
            if not failed:
                raise
            warnings.warn(f"zmem: while leaving on an error: {e}", ZMemWarning, stacklevel=2)
            return
        self._shut(max(0.0, timeout - (time.monotonic() - started)))

    # -- queries ----------------------------------------------------------------------

    def risk(
        self,
        z: ArrayLike,
        *,
        k: int | None = None,
        sigma: float | str | None = None,
        squeeze: bool = True,
        record: bool = True,
    ) -> torch.Tensor:
        """The seed's `memory_risk`: kernel risk of z's neighbourhood, differentiable in z.

        z [d] or [1, d] → 0-dim tensor (the seed's shape); [B, d] → [B]; with
        `squeeze=False` the shape is always z.shape[:-1] (a [1, d] query gives [1]).
        Exactly 0 while the memory holds fewer than min_size episodes, and on a memory
        nobody has written to yet (`NoSuchMemory`); any other error raises, a service that
        is down included (`TransportError`). On z's device and dtype; z may also be a
        numpy array or a list (made a tensor by `torch.as_tensor`: the risk then carries no
        gradient to anything of yours). `record=True` lets the service keep the value for
        its diagnostics.
        """
        z = _as_tensor(z)
        risk, _ = self.risk_and_size(z, k=k, sigma=sigma, record=record)
        if squeeze and z.dim() == 2 and z.shape[0] == 1:
            return risk[0]
        return risk

    def risk_and_size(
        self, z: ArrayLike, *, k: int | None = None, sigma: float | str | None = None, record: bool = True
    ) -> tuple[torch.Tensor, int]:
        """risk(z, squeeze=False) and the memory's size when it answered (0: no such memory yet)."""
        z = _as_tensor(z)
        if z.dim() not in (1, 2):
            raise ValueError(f"z must have shape [d] or [B, d], got {list(z.shape)}")
        rows = z if z.dim() == 2 else z.unsqueeze(0)
        if not rows.is_floating_point():
            rows = rows.to(torch.get_default_dtype())
        self._check_open()
        try:
            found = self._source.find(rows.detach(), k, sigma, record=record, with_seq=False)
        except NoSuchMemory:
            # A memory nobody wrote to yet is empty: below min_size, the risk is 0 (the seed's rule).
            # Only this 404: one from a wrong URL prefix or a proxy must not switch the term off.
            found = None
        work = kernel_dtype(rows.dtype)
        if found is None or found.k == 0:
            # The kernel over no neighbours: exactly 0, and still a function of z, so that
            # `risk.backward()` works (with a zero gradient) before min_size as after it.
            none = torch.zeros((*rows.shape[:-1], 0, rows.shape[-1]), device=rows.device, dtype=work)
            risk = kernel_risk(rows.to(work), none, none[..., 0], 1.0).to(rows.dtype)
        else:
            nz = found.z.to(rows.device, work)
            rt = found.risk_target.to(rows.device, work)
            risk = kernel_risk(rows.to(work), nz, rt, found.sigma).to(rows.dtype)
        return (risk if z.dim() == 2 else risk[0]), (found.size if found is not None else 0)

    def neighbors(
        self, z: ArrayLike, k: int | None = None, sigma: float | str | None = None
    ) -> dict[str, Any]:
        """The k nearest stored episodes: numpy `z` [B, k, d], `risk_target`, `d2` [B, k],
        `seq` [B, k] (a 1-D z drops the B axis), and `size`, `active`, `k`, `sigma`.
        NoSuchMemory before the memory's first write."""
        q = _as_numpy(z).astype(np.float32)
        if q.ndim not in (1, 2):
            raise ValueError(f"z must have shape [d] or [B, d], got {list(q.shape)}")
        self._check_open()
        found = self._source.find(
            torch.from_numpy(q if q.ndim == 2 else q.reshape(1, -1)), k, sigma, record=False, with_seq=True
        )
        assert found.seq is not None
        out: dict[str, Any] = {
            "z": found.z.cpu().numpy(),
            "risk_target": found.risk_target.cpu().numpy(),
            "d2": found.d2.cpu().numpy(),
            "seq": found.seq.cpu().numpy(),
        }
        if q.ndim == 1:
            out = {key: value[0] for key, value in out.items()}
        return {**out, "size": found.size, "active": found.active, "k": found.k, "sigma": found.sigma}

    @property
    def replica_lag(self) -> Lag | None:
        """With `replica=True`: seconds since the replica last knew it was caught up, and
        seqs behind as last seen; None without a replica."""
        return self._source.lag()

    # Reads of a memory nobody has written to (or configured) yet raise NoSuchMemory.

    def stats(self) -> dict[str, Any]:
        """The memory's size, settings, seq range and writers; NoSuchMemory before its first write."""
        stats: dict[str, Any] = self._query("GET", "stats").json()
        return stats

    def export(self) -> dict[str, np.ndarray]:
        """The whole buffer in arrival order, as the service's export file holds it."""
        import io

        r = self._query("GET", "export")
        with np.load(io.BytesIO(r.content), allow_pickle=False) as f:
            return {key: f[key] for key in f.files}

    def extract(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The seed's `extract_memory`: (zs [N, d], soft_bind, cone_vol, lambda_bind)."""
        data = self.export()
        return data["z"], data["soft_bind"], data["cone_vol"], data["lambda_bind"]

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Create this memory with settings (z_dim, capacity, min_size, k, sigma, risk).

        It only creates: settings equal to the stored ones answer 200, different ones raise
        RequestRejected (409, with `.problem["conflicts"]`); nothing is ever changed.
        """
        path = f"/memories/{self.memory}"
        result: dict[str, Any] = self._query("PUT", path, json=settings).json()
        return result

    def map_png(self, **params: Any) -> bytes:
        """The seed's 2×2 PCA map as PNG bytes; NoSuchMemory before the memory's first write."""
        return self._query("GET", "map.png", params=params).content

    def trail_png(self, **params: Any) -> bytes:
        """The last z's over the buffer's density (PNG); NoSuchMemory before the first write."""
        return self._query("GET", "trail.png", params=params).content

    def risk_png(self, **params: Any) -> bytes:
        """The recorded risk of recent queries (PNG); NoSuchMemory before the first write."""
        return self._query("GET", "risk.png", params=params).content

    def diagnostics(self) -> dict[str, Any]:
        """The seed's acceptance criteria; NoSuchMemory before the memory's first write."""
        result: dict[str, Any] = self._query("GET", "diagnostics").json()
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"{self!r} is closed; make a new client")

    def _query(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._check_open()
        return self._request(self._http, method, path, **kwargs)

    def _request(self, http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = path if path.startswith("/") else self._prefix + path
        where = f"{method} {self.url}{url}"
        with mapped(where, self.timeout, lambda: http.is_closed):
            r = http.request(method, url, **kwargs)
        return checked(r, where, self.memory)


def _as_numpy(z: ArrayLike) -> np.ndarray:
    if isinstance(z, torch.Tensor):
        return z.detach().to("cpu").numpy()
    return np.asarray(z)


def _as_tensor(z: ArrayLike) -> torch.Tensor:
    return z if isinstance(z, torch.Tensor) else torch.as_tensor(z)


def _rebuild(args: dict[str, Any]) -> ZMemClient:
    return ZMemClient(**args)
