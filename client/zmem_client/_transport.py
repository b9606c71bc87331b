"""A lean httpx transport for plain-HTTP services: one keep-alive `http.client` connection.

httpx's default transport (httpcore + h11) costs a training step about 0.15 ms per call
more than the standard library's `http.client`; a step calls `risk()` once, so that is
a real share of it. This transport keeps httpx's API (timeouts, errors, MockTransport in
tests) and swaps only the wire. One connection, used by one caller at a time (a lock);
a connection the server closed while idle is reopened and the request sent again once,
which is safe for zmem's requests (queries are reads, episodes carry idempotency ids).

The timeout is a deadline for the whole call, connecting, sending and reading included:
each socket operation gets only the time left, so a server or proxy that dribbles a
byte at a time can't stretch a call past it (a per-read timeout would be reset by
every byte).

Behind a proxy (`HTTP_PROXY`, `ALL_PROXY`, unless `NO_PROXY` names the host) the client takes
httpx's own transport instead, which honours them as httpx always does.

A 503 with `Retry-After` (the service is briefly full: no answer slot, a decode pool
busy) is sent again after the delay it names, as long as the call's deadline leaves
time for it; otherwise the 503 is the answer.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import threading
import time
import urllib.request
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

MAX_RETRY_AFTER = 60.0
"""A longer Retry-After is not waited for: the 503 is the answer."""
RETRYABLE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each given only the time left until `conn.deadline` (monotonic)."""

    def __init__(self, sock: socket.socket, conn: _Connection) -> None:
        self._sock, self._conn = sock, conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._conn.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Response(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, conn: _Connection, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain reader (it holds a reference that keeps the socket open)
        self.fp = io.BufferedReader(_DeadlineReader(sock, conn))


class _Connection(http.client.HTTPConnection):
    """An HTTPConnection whose response is read against `deadline` (see the module)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.deadline = float("inf")
        self.response_class = functools.partial(_Response, conn=self)  # type: ignore[assignment]

    def start(self, deadline: float) -> None:
        """The next request must be answered by `deadline`; connecting and sending included."""
        self.deadline = deadline
        left = max(deadline - time.monotonic(), 1e-3)
        self.timeout = left  # used when connecting
        if self.sock is not None:
            self.sock.settimeout(left)  # sendall: a total for the whole send


class HTTPClientTransport(httpx.BaseTransport):
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        target = request.url.raw_path.decode("ascii")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        timeout = request.extensions.get("timeout", {}).get("read") or self.timeout
        deadline = time.monotonic() + timeout  # waiting for another thread's call counts too
        while True:
            response = self._exchange(request, body, target, headers, timeout, deadline)
            delay = retry_after(response) if response.status_code == 503 else None
            if delay is None or time.monotonic() + delay >= deadline:
                return response
            time.sleep(delay)  # the connection is free meanwhile

    def _exchange(
        self,
        request: httpx.Request,
        body: bytes,
        target: str,
        headers: list[tuple[str, str]],
        timeout: float,
        deadline: float,
    ) -> httpx.Response:
        """One request and its response, on the kept connection (or a new one)."""
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise httpx.PoolTimeout(f"the connection stayed busy for {timeout}s", request=request)
        try:
            if self._closed:
                raise RuntimeError("the transport is closed")
            for attempt in (0, 1):
                fresh = self._conn is None
                conn = self._conn or _Connection(self.host, self.port)
                self._conn = conn
                try:
                    conn.start(deadline)
                    conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
                    for name, value in headers:
                        conn.putheader(name, value)
                    conn.endheaders(body or None)
                    response = conn.getresponse()
                    content = response.read()
                except RETRYABLE as e:
                    self._drop()
                    if fresh or attempt:
                        raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from e
                    continue  # the server closed an idle connection: once more on a new one
                except TimeoutError as e:
                    self._drop()
                    raise httpx.ReadTimeout(str(e) or "timed out", request=request) from e
                except (OSError, http.client.HTTPException) as e:
                    self._drop()
                    raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from e
                if response.will_close:
                    self._drop()
                return httpx.Response(
                    response.status, headers=response.getheaders(), content=content, request=request
                )
            raise AssertionError("unreachable")
        finally:
            self._lock.release()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a response's `Retry-After` asks to wait (delta-seconds or an HTTP date); None
    when it has none, or one that can't be read or is longer than MAX_RETRY_AFTER."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not 0 <= seconds <= MAX_RETRY_AFTER:
        return None if seconds > MAX_RETRY_AFTER else 0.0
    return seconds


def lean_transport(url: str, timeout: float) -> httpx.BaseTransport | None:
    """The lean transport for an http:// URL; None for https (httpx's own handles TLS) and for
    a URL that the environment sends through a proxy (`HTTP_PROXY`/`ALL_PROXY` not bypassed by
    `NO_PROXY`, the variables httpx reads): httpx's default transport then honours them."""
    parsed = httpx.URL(url)
    if parsed.scheme != "http" or not parsed.host or proxied(parsed.host):
        return None
    return HTTPClientTransport(parsed.host, parsed.port or 80, timeout)


def proxied(host: str) -> bool:
    """Whether the environment's proxy variables send plain-HTTP requests for `host` to a proxy."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get("http") or proxies.get("all")):
        return False
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # stdlib, untyped
    return not bypass(host, proxies)
