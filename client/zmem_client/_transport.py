"""A lean httpx transport for plain-HTTP services: one keep-alive `http.client` connection.

httpx's default transport (httpcore + h11) costs a training step about 0.15 ms per call
more than the standard library's `http.client`; a step calls `risk()` once, so that is
a real share of it. This transport keeps httpx's API (timeouts, errors, MockTransport in
tests) and swaps only the wire. One connection, used by one caller at a time (a lock);
a connection the server closed while idle is reopened and the request sent again once,
which is safe for zmem's requests (queries are reads, episodes carry idempotency ids).
"""

from __future__ import annotations

import http.client
import threading

import httpx

RETRYABLE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class HTTPClientTransport(httpx.BaseTransport):
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        target = request.url.raw_path.decode("ascii")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        timeout = request.extensions.get("timeout", {}).get("read") or self.timeout
        with self._lock:
            if self._closed:
                raise RuntimeError("the transport is closed")
            for attempt in (0, 1):
                fresh = self._conn is None
                conn = self._conn or http.client.HTTPConnection(self.host, self.port, timeout=timeout)
                self._conn = conn
                try:
                    if conn.sock is not None:
                        conn.sock.settimeout(timeout)
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

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


def lean_transport(url: str, timeout: float) -> httpx.BaseTransport | None:
    """The lean transport for an http:// URL (None for https: httpx's own handles TLS)."""
    parsed = httpx.URL(url)
    if parsed.scheme != "http" or not parsed.host:
        return None
    return HTTPClientTransport(parsed.host, parsed.port or 80, timeout)
