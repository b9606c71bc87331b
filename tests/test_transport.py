"""The client's lean http.client transport against a real server: keep-alive reuse, a
connection the server closed while idle, and a service that is gone."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from zmem_client import TransportError, ZMemClient
from zmem_client._transport import HTTPClientTransport, lean_transport
from zmem_core.busy import BusyWait

from .server import Server


def test_only_plain_http_gets_the_lean_transport() -> None:
    assert isinstance(lean_transport("http://127.0.0.1:8000", 5), HTTPClientTransport)
    assert lean_transport("https://zmem.example", 5) is None


@pytest.mark.e2e
def test_queries_survive_an_idle_close_and_fail_clearly_when_the_service_is_gone(tmp_path) -> None:
    srv = Server(tmp_path / "data", "--min-size", "1", "--keep-alive-timeout", "1").start()
    mem = ZMemClient(srv.url, timeout=5)
    try:
        for i in range(5):
            mem.record(np.full(4, float(i), np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.1)
        mem.flush(timeout=30)
        z = torch.zeros(1, 4, requires_grad=True)
        first = mem.risk(z)
        first.backward()
        assert z.grad is not None
        time.sleep(2.5)  # past the server's keep-alive timeout: it has closed our idle connection
        assert torch.equal(mem.risk(torch.zeros(1, 4)), first.detach())
        assert mem.stats()["size"] == 5
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            mem.risk(torch.zeros(1, 4))
        assert time.monotonic() - t0 < 5
    finally:
        mem.close(timeout=1)  # nothing is queued: returns at once, service or not
        srv.stop()


def test_a_timeout_is_a_read_timeout() -> None:
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    port = listener.getsockname()[1]
    with (
        httpx.Client(transport=HTTPClientTransport("127.0.0.1", port, 0.3)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.get(f"http://127.0.0.1:{port}/healthz", timeout=0.3)
    listener.close()
    for conn in accepted:
        conn.close()


class Dribbler:
    """A listener that reads each request, sends `head` at once, then `body` one byte per `every` s."""

    def __init__(self, head: bytes, body: bytes, every: float = 0.3) -> None:
        import socket
        import threading

        self.head, self.body, self.every = head, body, every
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:  # type: ignore[no-untyped-def]
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.head)
                for byte in self.body:
                    if self.stopped.wait(self.every):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_server_that_dribbles_cannot_stretch_a_call_past_its_timeout(where: str) -> None:
    from zmem_client import Timeout

    body = b'{"size": 0}' * 20
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    # Every byte comes well within the timeout, so a per-read timeout never fires.
    dribbler = Dribbler(b"", head + body) if where == "head" else Dribbler(head, body)
    mem = ZMemClient(f"http://127.0.0.1:{dribbler.port}", timeout=1.5)
    try:
        for call in (mem.stats, lambda: mem.risk(torch.zeros(1, 4))):
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                call()
            assert time.monotonic() - t0 < 2.5
    finally:
        mem.close(timeout=1)
        dribbler.close()


class Busy:
    """A keep-alive HTTP server that answers the first `busy` requests 503 with `retry_after`,
    then 200; it counts the requests."""

    def __init__(self, busy: int, retry_after: str) -> None:
        import http.server
        import threading

        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.requests += 1
                refuse = outer.requests <= busy
                body = b'{"status": 503}' if refuse else b'{"ok": true}'
                self.send_response(503 if refuse else 200)
                self.send_header("content-type", "application/problem+json" if refuse else "application/json")
                self.send_header("content-length", str(len(body)))
                if refuse:
                    self.send_header("retry-after", retry_after)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_503_with_retry_after_is_sent_again_within_the_deadline() -> None:
    busy = Busy(2, "0")
    try:
        with httpx.Client(transport=HTTPClientTransport("127.0.0.1", busy.port, 5)) as http:
            r = http.post(f"http://127.0.0.1:{busy.port}/neighbors", content=b"{}")
        assert r.status_code == 200 and busy.requests == 3
    finally:
        busy.close()


def test_a_503_whose_retry_after_outlasts_the_deadline_is_the_answer() -> None:
    for retry_after in ("5", "soon", ""):
        busy = Busy(1, retry_after)
        try:
            with httpx.Client(transport=HTTPClientTransport("127.0.0.1", busy.port, 1)) as http:
                t0 = time.monotonic()
                r = http.post(f"http://127.0.0.1:{busy.port}/neighbors", content=b"{}")
            assert r.status_code == 503 and busy.requests == 1, retry_after
            assert time.monotonic() - t0 < 0.5
        finally:
            busy.close()


class Canned:
    """A listener that answers each connection's first request with `answer` (then closes, or
    keeps the connection for a second request when `keep`), keeping what each `recv` got."""

    def __init__(self, answer: bytes, keep: bool = False, delay: float = 0.0) -> None:
        import socket
        import threading

        self.answer, self.keep, self.delay = answer, keep, delay
        self.received: list[bytes] = []
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                for _ in range(2 if self.keep else 1):
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.received.append(data)
                    time.sleep(self.delay)
                    conn.sendall(self.answer)

    def close(self) -> None:
        self.listener.close()


def test_a_request_goes_in_one_segment_and_a_kept_connection_is_reused() -> None:
    body = b'{"ok": true}'
    canned = Canned(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body), keep=True)
    try:
        with httpx.Client(transport=HTTPClientTransport("127.0.0.1", canned.port, 5)) as http:
            for _ in range(2):
                r = http.post(f"http://127.0.0.1:{canned.port}/neighbors", content=b"x" * 1000)
                assert r.status_code == 200 and r.json() == {"ok": True}
        # Each request arrived whole in one read: head and body were written at once; both on one connection.
        assert len(canned.received) == 2 and canned.connections == 1
        assert all(data.endswith(b"\r\n\r\n" + b"x" * 1000) for data in canned.received)
    finally:
        canned.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nhello world",  # delimited by the close
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
    ],
    ids=["chunked", "until-close", "interim-100"],
)
def test_answers_framed_every_way_are_read_whole(answer: bytes) -> None:
    canned = Canned(answer)
    try:
        with httpx.Client(transport=HTTPClientTransport("127.0.0.1", canned.port, 5)) as http:
            r = http.get(f"http://127.0.0.1:{canned.port}/stats")
        assert r.status_code == 200 and r.content == b"hello world"
    finally:
        canned.close()


@pytest.mark.parametrize(
    "answer", [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\ncut short"]
)
def test_a_malformed_or_cut_answer_is_a_transport_error(answer: bytes) -> None:
    canned = Canned(answer)
    mem = ZMemClient(f"http://127.0.0.1:{canned.port}", timeout=5)
    try:
        for call in (mem.stats, lambda: mem.risk(torch.zeros(1, 4))):
            with pytest.raises(TransportError):
                call()
    finally:
        mem.close(timeout=1)
        canned.close()


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_an_answer_polled_for_is_read_whole_whether_it_comes_while_polling_or_after(delay: float) -> None:
    body = b"x" * 100_000  # more than one read
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    canned = Canned(answer, keep=True, delay=delay)
    try:
        transport = HTTPClientTransport("127.0.0.1", canned.port, 5)
        for _ in range(2):
            answer = transport.exchange("GET", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 5, busy=BusyWait(0.01))
            assert answer.status == 200 and answer.content == body
        assert canned.connections == 1
        transport.close()
    finally:
        canned.close()


def test_polling_for_an_answer_keeps_the_call_s_deadline() -> None:
    canned = Canned(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", delay=5)
    try:
        transport = HTTPClientTransport("127.0.0.1", canned.port, 5)
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            transport.exchange("GET", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 0.3, busy=BusyWait(1.0))
        assert time.monotonic() - t0 < 2
        transport.close()
    finally:
        canned.close()


def test_a_query_s_polling_is_measured_and_a_bad_busy_wait_is_refused() -> None:
    body = b"x" * 100
    canned = Canned(
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body), keep=True, delay=0.002
    )
    try:
        busy = BusyWait(0.05)
        transport = HTTPClientTransport("127.0.0.1", canned.port, 5)
        for _ in range(3):
            assert (
                transport.exchange("GET", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 5, busy=busy).content == body
            )
        assert busy.spells == 3  # each answer's wait (~2 ms) was one spell, measured
        transport.close()
    finally:
        canned.close()
    for bad in (-0.1, 2.0, float("nan")):
        with pytest.raises(ValueError, match="busy_wait"):
            ZMemClient("http://127.0.0.1:9", busy_wait=bad)
