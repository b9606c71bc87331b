"""The HTTP server: uvicorn's httptools protocol with the limits a shared cluster needs.

uvicorn's httptools protocol buffers a request's head (request line and headers)
without bound and never times out a client that stops half-way; middleware only
runs after the head is parsed, too late to help. `GuardedProtocol` adds, per
connection and before the application sees anything:

- a head over `max_header_bytes` → 431 problem+json and the connection closed
  (tokens are checked later, so this holds with or without them);
- a head not complete `header_timeout` s after the connection opened or the
  request's first bytes arrived → 408 and closed (a silent new connection included);
- a request body that sends nothing for `body_timeout` s while the server is
  ready to read it → closed;
- past `max_connections` open connections a new one gets 503 (`Retry-After`) and
  is closed at once, so slow clients can't use up the process's file descriptors.

Idle keep-alive connections close after `keep_alive_timeout` s (uvicorn's own timer).
A response's head waits for its first body bytes and leaves with them in one write
(`OneWrite`): a small answer is one segment and one system call, not two.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..errors import PROBLEM, problem
from ..settings import ServiceSettings

log = logging.getLogger("zmem")
# File descriptors kept for the store, the render process, logs and the listening socket.
RESERVED_FDS = 64


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Limits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_connections=connection_cap(settings.max_connections),
        )


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what the process's open-file limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - RESERVED_FDS >= wanted:
        return wanted
    cap = max(1, soft - RESERVED_FDS)
    log.warning("open-file limit is %d: accepting at most %d connections (not %d)", soft, cap, wanted)
    return cap


def problem_bytes(status: int, title: str, detail: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response carrying problem+json, closing the connection."""
    body = json.dumps(problem(status, title, detail)).encode()
    head = [
        STATUS_LINE[status],
        b"content-type: %s\r\n" % PROBLEM.encode(),
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d\r\n" % retry_after)
    return b"".join([*head, b"\r\n", body])


class OneWrite:
    """A transport that holds a response's head back until the response's first body bytes,
    then writes both at once; anything else passes through (an interim `100 Continue` too).
    One per request/response cycle."""

    __slots__ = ("_head", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if not self._started and not data.startswith(b"HTTP/1.1 100 "):
            self._started = True
            self._head = data
            return
        if self._head is not None:
            data, self._head = b"".join((self._head, data)), None  # data may be any bytes-like
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:  # a head whose body never came: sent as it is
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Arrivals:
    """How many requests are received whose task hasn't started yet: counted up as uvicorn
    creates a request's task, down as the task starts the application. The index thread
    reads it (`IndexThread.arrivals`): a query that starts while no other request waits to
    start has no query to be batched with, and is searched without waiting."""

    def __init__(self) -> None:
        self.waiting = 0

    def __call__(self) -> int:
        return self.waiting

    def counted(self, app: Any) -> Any:
        """`app`, counted in: the count goes up now and down as the application starts."""
        self.waiting += 1

        async def started(scope: Any, receive: Any, send: Any) -> None:
            self.waiting -= 1
            await app(scope, receive, send)

        return started


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with bounded heads, timeouts for slow requests and a connection cap.

    Bytes of a head are counted twice: as they arrive (`_head_bytes`, which bounds
    what the parser buffers while a head is incomplete) and through the parser's
    callbacks (`_head_size`: URL and headers, exact once the head is complete).
    """

    limits: ClassVar[Limits]
    arrivals: ClassVar[Arrivals]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport  # connection_lost closes it
            transport.write(
                problem_bytes(503, "Too many connections", "the server's connection limit is reached", 1)
            )
            transport.close()
            return
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, with a 431 instead of a 400 for a head over the limit.
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        else:
            self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._too_large:
                self._refuse_head()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head:
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()
            elif self._head_bytes and self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)
        elif self._body_timer is None and self.cycle is not None and self.cycle.more_body:
            self._last_data = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_check)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request the parser refuses is text/plain; the contract says
        # every error is problem+json.
        self.transport.write(problem_bytes(400, "Bad request", f"{msg} (the HTTP parser refused it)"))
        self.transport.close()

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if self._head_size > self.limits.max_header_bytes:
            self._too_large = True
            raise ValueError("head too large")  # stops the parser; data_received answers 431
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if self.cycle is not None:  # its task starts later, on the loop: before any write
            self.cycle.transport = OneWrite(self.transport)  # type: ignore[assignment]

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        super()._start_asgi_task(cycle, self.arrivals.counted(app))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # Limits
    def _refuse_head(self) -> None:
        limit = self.limits.max_header_bytes
        detail = f"the request line and headers exceed {limit} bytes (--max-header-bytes)"
        self.transport.write(problem_bytes(431, "Request header fields too large", detail))
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is None or self.cycle.response_complete:
            timeout = self.limits.header_timeout
            detail = f"the request's headers did not arrive within {timeout:g} s"
            self.transport.write(problem_bytes(408, "Request timeout", detail))
        self.transport.close()

    def _body_check(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or self._in_head or cycle is None or not cycle.more_body:
            return
        idle = self.loop.time() - self._last_data
        if self.flow.read_paused or idle < self.limits.body_timeout:
            # The application hasn't read what it has, or bytes came lately: look again later.
            wait = max(self.limits.body_timeout - idle, 0.1)
            self._body_timer = self.loop.call_later(wait, self._body_check)
            return
        self.logger.info("closing a connection whose request body stalled for %.0f s", idle)
        self.transport.close()


def protocol_for(limits: Limits, arrivals: Arrivals | None = None) -> type[GuardedProtocol]:
    """A GuardedProtocol class bound to `limits` and counting into `arrivals` (uvicorn
    instantiates it per connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits, "arrivals": arrivals or Arrivals()})


class ExitingServer(uvicorn.Server):
    """uvicorn's server, calling `on_exit` as soon as a signal asks it to stop: before it waits
    for open requests to finish (a long poll would otherwise hold shutdown for its whole wait)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_exit is not None:
            self._on_exit()
        super().handle_exit(sig, frame)


def serve(
    app: Any, settings: ServiceSettings, log_level: str, on_exit: Callable[[], None] | None = None
) -> None:
    """Run `app` in this process until SIGINT/SIGTERM (one worker: the rings are process state);
    `on_exit` runs when a signal arrives, from the signal handler."""
    arrivals = Arrivals()
    app.state.zmem.index_thread.arrivals = arrivals  # lone queries are searched without waiting
    # uvicorn's access log would print query strings (a dashboard's ?token=); the app's
    # own access log (zmem.access) doesn't. JSON logs: uvicorn's own lines go to the root
    # logger's handler too, not to the text handler its default config gives them.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        workers=1,
        http=protocol_for(Limits.from_settings(settings), arrivals),
        timeout_keep_alive=settings.keep_alive_timeout,
        timeout_graceful_shutdown=30,
        access_log=False,
    )
    ExitingServer(config, on_exit).run()
