"""The one place the client turns HTTP into its own answers and errors.

Every request of the client goes through here, whoever makes it (a query, a read, the
sender's posts, the replica's feed and its query records):

- `mapped(...)`: httpx's failures as the client's (`Timeout`, `TransportError`, or
  `ClientClosed` when the connection was closed under the call);
- `error_for(...)`: an error answer as the client's `HTTPError`: `NoSuchMemory` for the
  service's 404 "not found" problem, `RequestRejected` for another 4xx, `ServerError`
  for a 5xx, its problem+json (or the text of a proxy's page) kept on the error;
- `checked(r, ...)` for an answer read whole, `read_error(r, ...)` for a streamed one
  (at most ERROR_BYTES of its body are read, within the call's deadline).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from ._backoff import retry_after_seconds
from ._exceptions import (
    NOT_FOUND,
    ClientClosed,
    HTTPError,
    NoSuchMemory,
    RequestRejected,
    ServerError,
    Timeout,
    TransportError,
)

ERROR_BYTES = 64 * 2**10
"""Of a streamed error answer's body, the most that is read."""
VALIDATION = "https://zmem.dev/problems/validation"


@contextlib.contextmanager
def mapped(where: str, timeout: float, closed: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """httpx's errors raised inside as the client's own; `where` is "METHOD URL", `closed` says
    whether the connection was closed by another thread (a call racing `close()`)."""
    try:
        yield
    except RuntimeError as e:
        if closed():
            raise ClientClosed(f"{where}: the client is closed; make a new client") from e
        raise
    except httpx.TimeoutException as e:
        raise Timeout(f"{where}: no answer within {timeout}s") from e
    except httpx.HTTPError as e:
        raise TransportError(f"{where}: cannot reach the service: {e}") from e


def retry_after(r: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (`retry_after_seconds`)."""
    return retry_after_seconds(r.headers.get("retry-after"))


def problem_of(reason: str, body: bytes) -> dict[str, Any]:
    """An error answer's problem+json, or a stand-in holding its text (a proxy's page, say)."""
    try:
        problem = json.loads(body)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        return {"title": reason, "detail": body[:500].decode("utf-8", "replace")}
    return problem


def error_for(
    status: int, problem: dict[str, Any], where: str, memory: str, wait: float | None = None
) -> HTTPError:
    """The client's error for an error answer (see the module docstring)."""
    if status == 404 and problem.get("type") == NOT_FOUND:
        return NoSuchMemory(status, problem, where, memory)
    cls = RequestRejected if status < 500 else ServerError
    return cls(status, problem, where, wait)


def checked(r: httpx.Response, where: str, memory: str) -> httpx.Response:
    """`r` (read whole), or the error its answer describes."""
    if r.status_code >= 400:
        raise error_for(r.status_code, problem_of(r.reason_phrase, r.content), where, memory, retry_after(r))
    return r


def read_error(r: httpx.Response, deadline: float, memory: str) -> HTTPError:
    """The client's error for a streamed error answer, from at most ERROR_BYTES of its body."""
    body = bytearray()
    for chunk in r.iter_bytes():
        body += chunk[: ERROR_BYTES - len(body)]
        if len(body) >= ERROR_BYTES or time.monotonic() > deadline:
            break
    where = f"{r.request.method} {r.request.url}"
    return error_for(r.status_code, problem_of(r.reason_phrase, bytes(body)), where, memory, retry_after(r))


def rejected(field: str, message: str, where: str = "the replica") -> RequestRejected:
    """The 422 the service answers a query it refuses, for a check made on the client's side."""
    problem = {
        "type": VALIDATION,
        "title": "Validation failed",
        "status": 422,
        "detail": f"{field}: {message}",
        "errors": [{"loc": [field], "msg": message}],
    }
    return RequestRejected(422, problem, where)


def missing(memory: str, where: str) -> NoSuchMemory:
    """The service's 404 for a memory nobody wrote to yet, as a replica that saw it says it."""
    problem = {"type": NOT_FOUND, "title": "Not found", "status": 404, "detail": f"no memory {memory!r}"}
    return NoSuchMemory(404, problem, where, memory)
