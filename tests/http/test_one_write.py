"""The guarded server writes a response's head with its first body bytes: one write, not two."""

from __future__ import annotations

from typing import Any

from zmem_service.http.server import OneWrite


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_the_head_waits_for_the_first_body_bytes() -> None:
    raw = Recorder()
    t: Any = OneWrite(raw)  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # interim answers pass at once
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    t.write(memoryview(b"body"))
    t.write(b"more")
    assert raw.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody", b"more"]
    assert not t.is_closing()  # anything else goes to the transport


def test_a_head_without_a_body_is_sent_when_the_connection_closes() -> None:
    raw = Recorder()
    t = OneWrite(raw)  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    t.close()
    assert raw.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and raw.closed
