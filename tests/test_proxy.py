"""Behind a proxy: with `HTTP_PROXY` set the client's calls go through it (httpx's transport, as
httpx honours the variable), and `NO_PROXY` naming the host keeps the lean direct transport."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from zmem_client import TransportError, ZMemClient
from zmem_client._transport import HTTPClientTransport, lean_transport


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    """A stand-in proxy: records each request line and answers 200 with a stats body."""
    seen: list[str] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                seen.append(head.split(b"\r\n", 1)[0].decode())
                body = json.dumps({"size": 7}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    stop.set()
    thread.join(5)
    server.close()


def test_http_proxy_is_honoured(proxy: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, seen = proxy
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert lean_transport("http://zmem.invalid:8000", 5.0) is None
    with ZMemClient("http://zmem.invalid:8000", timeout=5) as mem:
        assert mem.stats() == {"size": 7}
    assert seen == ["GET http://zmem.invalid:8000/stats HTTP/1.1"]


def test_no_proxy_keeps_the_direct_lean_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "zmem.invalid,localhost")
    assert isinstance(lean_transport("http://zmem.invalid:8000", 5.0), HTTPClientTransport)
    monkeypatch.delenv("HTTP_PROXY")
    assert isinstance(lean_transport("http://127.0.0.1:8000", 5.0), HTTPClientTransport)
    with ZMemClient("http://zmem.invalid:8000", timeout=2) as mem, pytest.raises(TransportError):
        mem.stats()  # direct: the name doesn't resolve, and no proxy is asked
