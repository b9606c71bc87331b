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
