"""Where `ZMemClient` gets neighbours: one interface, two sources chosen at construction.

- `RemoteSource`: the service over HTTP (`POST …/neighbors`, safetensors both ways),
  straight to the lean transport's `exchange` with the request's head made once: a
  training step's call skips httpx's per-request work (URL merging, cookies, auth and
  redirect handling, the request and response objects: ~0.1 ms a call). An error
  answer, and any other transport, go through httpx as every other call does.
- `Replica` (`_replica.py`): a copy of the memory in tensors on the worker's device,
  following `GET …/changes`, searched with the same core.

A source answers `find(rows, k, sigma)` with the neighbours (`Found`) as the service
resolves them: k clipped to the memory's size (0 while it is below min_size), the numeric
sigma, the memory's size. It raises the same errors for the same causes (a refused query
is a `RequestRejected` 422 naming the field; a memory nobody wrote to is `NoSuchMemory`);
the client computes the kernel. `flush` and `close` cover what a source sends on its own
(the replica's query records).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from zmem_core import wire
from zmem_core.busy import BusyWait

from ._http import checked, mapped
from ._transport import HTTPClientTransport, request_head

POLLED_ROWS = 32
"""Queries of at most this many rows poll for their answer (`busy_wait`); a larger one's answer
takes long enough that polling would only burn the core, and it would compete with the
service's own threads for a multi-threaded search."""


@dataclass(frozen=True)
class Lag:
    """How far behind the service a replica may be.

    `seconds`: since it last knew it was caught up (0 while a long poll from a
    caught-up state is waiting for news); `seqs`: the memory's `next_seq` as last
    seen minus the replica's.
    """

    seconds: float
    seqs: int


@dataclass(frozen=True)
class Found:
    """The k nearest stored episodes of B query rows, on the source's device."""

    d2: torch.Tensor  # float32 [B, k]
    z: torch.Tensor  # float32 [B, k, d]
    risk_target: torch.Tensor  # float32 [B, k]
    seq: torch.Tensor | None  # int64 [B, k] when asked for
    size: int  # the memory's size when it answered
    active: bool
    k: int
    sigma: float


class NeighborSource(abc.ABC):
    @abc.abstractmethod
    def find(
        self, rows: torch.Tensor, k: int | None, sigma: float | str | None, *, record: bool, with_seq: bool
    ) -> Found:
        """Neighbours of rows (detached float [B, d]); `record`: the query's risk counts in the
        memory's diagnostics."""

    def lag(self) -> Lag | None:
        """How far behind the service the answers may be (None: they are the service's own)."""
        return None

    def flush(self, timeout: float) -> bool:
        """Send what the source queued of its own (False when `timeout` ran out first)."""
        return True

    def close(self, timeout: float = 5.0) -> None:  # noqa: B027 (nothing to close by default)
        """Stop; what is queued gets up to `timeout` seconds."""


class RemoteSource(NeighborSource):
    """Neighbours from the service (see the module docstring)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        memory: str,
        http: httpx.Client,
        transport: httpx.BaseTransport | None,
        worker: str | None = None,
        busy_wait: BusyWait | None = None,
    ) -> None:
        """`http`: the client's connection (its headers; closed with the client); `transport`: its
        transport, which this source calls directly (None: through `http`, e.g. to a proxy);
        `worker`: named with each recorded query; `busy_wait`: how long the lean transport
        polls for an answer (None: never)."""
        self.memory = memory
        self.worker = worker
        self.busy_wait = busy_wait
        self.timeout = float(http.timeout.read or 0.0)
        self._http = http
        self._where = f"POST {url}{prefix}neighbors"
        self._url = httpx.URL(f"{url}{prefix}neighbors")
        self._headers = httpx.Headers(
            {**http.headers, "content-type": wire.SAFETENSORS, "accept": wire.SAFETENSORS}
        )
        self._timeouts = http.timeout.as_dict()
        self._lean = transport if isinstance(transport, HTTPClientTransport) else None
        # The request's head as httpx would send it, but for its Content-Length (added last) and
        # Accept-Encoding (the answer is read here as it comes: it must not be compressed).
        template = httpx.Request("POST", self._url, headers=self._headers, content=b"")
        skip = (b"content-length", b"accept-encoding")
        kept = [(k, v) for k, v in template.headers.raw if k.lower() not in skip]
        self._head = request_head("POST", self._url.raw_path.decode("ascii"), kept)[:-2]

    def find(
        self, rows: torch.Tensor, k: int | None, sigma: float | str | None, *, record: bool, with_seq: bool
    ) -> Found:
        meta: dict[str, object] = {"record": record}
        if record and self.worker is not None:
            meta["worker"] = self.worker
        if k is not None:
            meta["k"] = k
        if sigma is not None:
            meta["sigma"] = sigma
        # allow_nan: a NaN sigma is the service's to refuse (a 422, as the replica answers it).
        body = wire.encode({"z": rows.to("cpu", torch.float32).numpy()}, meta, allow_nan=True)
        with mapped(self._where, self.timeout, lambda: self._http.is_closed):
            if self._lean is not None:
                request = b"%scontent-length: %d\r\n\r\n%s" % (self._head, len(body), body)
                busy = self.busy_wait if len(rows) <= POLLED_ROWS else None
                answer = self._lean.exchange("POST", request, self.timeout, busy)
                content = answer.content
                if answer.status != 200:
                    r = httpx.Response(answer.status, headers=answer.headers, content=content)
                    checked(r, self._where, self.memory)
                    raise httpx.RemoteProtocolError(f"an answer {answer.status} to a query")
            else:
                sent = httpx.Request(
                    "POST",
                    self._url,
                    headers=self._headers,
                    content=body,
                    extensions={"timeout": self._timeouts},
                )
                content = checked(self._http.send(sent), self._where, self.memory).content
        arrays, info = wire.decode(content)
        return Found(
            d2=torch.from_numpy(np.asarray(arrays["d2"])),
            z=torch.from_numpy(arrays["z"]),
            risk_target=torch.from_numpy(arrays["risk_target"]),
            seq=torch.from_numpy(arrays["seq"]) if with_seq else None,
            size=int(info["size"]),
            active=bool(info["active"]),
            k=int(info["k"]),
            sigma=float(info["sigma"]),
        )
