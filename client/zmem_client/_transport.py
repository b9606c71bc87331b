"""A lean httpx transport for plain-HTTP services: one keep-alive socket, answers parsed by
httptools (llhttp, the parser uvicorn serves with).

httpx's default transport (httpcore + h11) costs a training step about 0.15 ms per call
more; the standard library's `http.client` sends a request's head and body in two
segments (two wake-ups of the server per call) and parses the answer's head through
`email.parser`. This transport writes each request in one `sendall` and parses the answer
in C; it keeps httpx's API (timeouts, errors, MockTransport in tests) and swaps only the
wire. `exchange` is the same call without httpx's request and response objects, for the
client's hot path (`RemoteSource`). One connection, used by one caller at a time (a lock);
a connection the server closed while idle is reopened and the request sent again once,
which is safe for zmem's requests (queries are reads, episodes carry idempotency ids).

The timeout is a deadline for the whole call, connecting, sending and reading included:
each socket operation gets only the time left, so a server or proxy that dribbles a
byte at a time can't stretch a call past it (a per-read timeout would be reset by
every byte).

Behind a proxy (`HTTP_PROXY`, `ALL_PROXY`, unless `NO_PROXY` names the host) the client takes
httpx's own transport instead, which honours them as httpx always does.

A training step's query may wait for its answer polling the socket for a few milliseconds
rather than sleeping on it, while its core is free (`zmem_core.busy`). The client's
background threads (the sender, the replica's feed) never poll: their polling would take
the interpreter from the training thread.

A 503 with `Retry-After` (the service is briefly full: no answer slot, a decode pool
busy) is sent again after the delay it names, as long as the call's deadline leaves
time for it; otherwise the 503 is the answer.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from dataclasses import dataclass

import httptools
import httpx

from zmem_core.busy import BusyWait

from ._backoff import MAX_RETRY_AFTER, retry_after_seconds

READ_SIZE = 256 * 2**10
RETRYABLE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _Closed(ConnectionError):
    """The server closed the connection; `early`: before any byte of the answer."""

    def __init__(self, early: bool) -> None:
        super().__init__(
            "the server closed the connection" + (" before answering" if early else " mid-answer")
        )
        self.early = early


@dataclass
class Answer:
    """An HTTP answer read whole: status, headers as sent (raw bytes), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class _Reading:
    """httptools' callbacks for one answer (a 1xx interim answer is read past).

    `keep`: whether the connection stays open after it, read in `on_message_complete`: once
    the message is complete llhttp forgets its framing, and `should_keep_alive()` then says
    False for every answer (a new connection per call)."""

    __slots__ = ("body", "done", "head_done", "headers", "keep", "parser")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head_done = self.done = self.keep = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self.headers, self.body, self.head_done, self.done = [], [], False, False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.done = True
        self.keep = self.parser is not None and self.parser.should_keep_alive()


class _Connection:
    """One keep-alive socket; `ask` sends a request and reads its answer by a deadline."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.used = False  # it answered a request before: a close may be an idle close

    def ask(
        self, method: bytes, request: bytes, deadline: float, busy: BusyWait | None = None
    ) -> tuple[Answer, bool]:
        """The answer to `request` (head and body), and whether the connection stays open; for
        the time `busy` allows, the socket is polled rather than slept on."""
        sock = self.sock
        if sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
        sock.settimeout(_left(deadline))  # sendall: a total for the whole send
        sock.sendall(request)
        spell = _Spell(busy, deadline)
        reading = _Reading()
        parser = reading.parser = httptools.HttpResponseParser(reading)
        received = False
        while True:
            data = spell.poll(sock)
            if data is None:
                sock.settimeout(_left(deadline))
                data = sock.recv(READ_SIZE)
            if not data:
                if reading.head_done and _until_close(reading.headers):
                    break  # a body delimited by the close (HTTP/1.0 style)
                raise _Closed(early=not received)
            received = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as e:
                raise httpx.RemoteProtocolError(f"a malformed answer: {e}") from None
            if method == b"HEAD" and reading.head_done:
                reading.done = True
            if reading.done and parser.get_status_code() >= 200:
                break
            if reading.done:  # an interim 1xx answer: the real one follows
                reading.done = False
        spell.end()
        self.used = True
        keep = reading.done and reading.keep
        return Answer(parser.get_status_code(), reading.headers, b"".join(reading.body)), keep

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Spell:
    """One answer's spell of polling: reads poll the socket without sleeping until the time
    `busy` allows runs out (or the deadline); then, or when the answer is read, the spell
    reports its wall and CPU time to `busy`."""

    __slots__ = ("busy", "cpu", "start", "until")

    def __init__(self, busy: BusyWait | None, deadline: float) -> None:
        limit = busy.limit() if busy is not None else 0.0
        self.busy = busy if limit else None
        self.start, self.cpu = (time.monotonic(), time.thread_time()) if limit else (0.0, 0.0)
        self.until = min(self.start + limit, deadline)

    def poll(self, sock: socket.socket) -> bytes | None:
        """What the socket has, polled; None when the spell is over (read by blocking then)."""
        if self.busy is None:
            return None
        sock.settimeout(0.0)
        while True:
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                if time.monotonic() >= self.until:
                    self.end()
                    return None

    def end(self) -> None:
        if self.busy is not None:
            self.busy.spell(time.monotonic() - self.start, time.thread_time() - self.cpu)
            self.busy = None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the call's deadline passed")
    return left


def _until_close(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {name.lower() for name, _ in headers}
    return b"content-length" not in names and b"transfer-encoding" not in names


def request_head(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request head (`headers` as httpx keeps them: Host and Content-Length included)."""
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), target.encode("ascii"))]
    lines += [b"%s: %s" % (name, value) for name, value in headers]
    return b"\r\n".join([*lines, b"", b""])


class HTTPClientTransport(httpx.BaseTransport):
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        head = request_head(request.method, request.url.raw_path.decode("ascii"), request.headers.raw)
        timeout = request.extensions.get("timeout", {}).get("read") or self.timeout
        try:
            answer = self.exchange(request.method, head + body, timeout)
        except httpx.TransportError as e:
            e.request = request
            raise
        return httpx.Response(answer.status, headers=answer.headers, content=answer.content, request=request)

    def exchange(self, method: str, request: bytes, timeout: float, busy: BusyWait | None = None) -> Answer:
        """The answer to one whole request (head and body, as bytes), within `timeout` seconds;
        a 503 with a Retry-After the deadline leaves room for is asked again. `busy`: how long
        the answer is polled for rather than slept on (`zmem_core.busy`). Failures are httpx's
        (ConnectError, ReadTimeout, PoolTimeout, RemoteProtocolError)."""
        deadline = time.monotonic() + timeout  # waiting for another thread's call counts too
        verb = method.encode("ascii")
        while True:
            answer = self._once(verb, request, timeout, deadline, busy)
            delay = retry_after_seconds(answer.header(b"retry-after")) if answer.status == 503 else None
            if delay is None or delay > MAX_RETRY_AFTER or time.monotonic() + delay >= deadline:
                return answer
            time.sleep(delay)  # the connection is free meanwhile

    def _once(
        self, method: bytes, request: bytes, timeout: float, deadline: float, busy: BusyWait | None
    ) -> Answer:
        """One request and its answer, on the kept connection (or a new one)."""
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise httpx.PoolTimeout(f"the connection stayed busy for {timeout}s")
        try:
            if self._closed:
                raise RuntimeError("the transport is closed")
            for attempt in (0, 1):
                conn = self._conn or _Connection(self.host, self.port)
                self._conn = conn
                reused = conn.used
                try:
                    answer, keep = conn.ask(method, request, deadline, busy)
                except (_Closed, *RETRYABLE) as e:
                    self._drop()
                    idle_close = isinstance(e, RETRYABLE) or e.early
                    if not reused or attempt or not idle_close:
                        raise httpx.ConnectError(str(e) or type(e).__name__) from e
                    continue  # the server closed an idle connection: once more on a new one
                except TimeoutError as e:
                    self._drop()
                    raise httpx.ReadTimeout(str(e) or "timed out") from e
                except OSError as e:
                    self._drop()
                    raise httpx.ConnectError(str(e) or type(e).__name__) from e
                except BaseException:
                    self._drop()
                    raise
                if not keep:
                    self._drop()
                return answer
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


def lean_transport(url: str, timeout: float) -> HTTPClientTransport | None:
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
