"""Answers as ASGI responses: `Answer` for the common case, `SentInChunks` for a large one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from starlette.responses import Response

from ..errors import PROBLEM, ZMemError

log = logging.getLogger("zmem")
GRACE = 2.0
"""Seconds a transfer may lag behind the minimum rate (a connection's first round trips, a pause)."""


class Answer(Response):
    """A whole body with its media type: the headers built once, nothing else per response."""

    def __init__(
        self, body: bytes, media_type: str, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.body = body
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", media_type.encode()),
        ]
        if headers:
            self.raw_headers += [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            ]


def problem_answer(document: dict[str, Any], headers: Mapping[str, str] | None = None) -> Answer:
    """A problem+json answer of `document` (`errors.problem`), with its status."""
    body = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Answer(body, PROBLEM, document["status"], headers)


def error_answer(error: ZMemError) -> Answer:
    """The answer to a ZMemError: its problem document and headers (Retry-After on a 503)."""
    return problem_answer(error.problem(), error.headers)


class SentInChunks(Response):
    """A whole answer sent a chunk at a time: each chunk waits for the connection to drain
    (uvicorn's flow control). The answer and its connection are dropped when the client reads
    nothing for `stall` seconds, or falls more than GRACE seconds behind `rate` bytes/s since
    the first byte. `progressed` runs after each chunk handed over; `done` runs once, when the
    answer is handed over or dropped."""

    CHUNK = 256 * 1024

    def __init__(
        self,
        body: bytes,
        media_type: str,
        *,
        done: Callable[[], None],
        stall: float,
        rate: float,
        progressed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(body, media_type=media_type)
        self._done: Callable[[], None] | None = done
        self._progressed = progressed
        self._stall = stall
        self._rate = rate

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            view = memoryview(self.body)
            for offset in range(0, len(view), self.CHUNK):
                chunk = bytes(view[offset : offset + self.CHUNK])
                due = start + GRACE + (offset + len(chunk)) / self._rate  # by the minimum rate
                left = min(self._stall, due - loop.time())
                if left <= 0:
                    raise TimeoutError
                message = {
                    "type": "http.response.body",
                    "body": chunk,
                    "more_body": offset + self.CHUNK < len(view),
                }
                await asyncio.wait_for(send(message), left)
                if self._progressed is not None:
                    self._progressed()
        except TimeoutError:
            log.info(
                "dropped an answer whose client read too slowly (nothing for %g s, or under %g bytes/s)",
                self._stall,
                self._rate,
            )
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._done is not None:
            done, self._done = self._done, None
            done()

    def __del__(self) -> None:  # never sent (the request ended first): the slot comes back
        self._finish()
