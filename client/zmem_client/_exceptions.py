"""The client's errors and warning.

ZMemError
├── TransportError          the service could not be reached, or did not answer in time
│   └── Timeout             the call's timeout ran out
├── HTTPError               the service answered with an error; `.problem` holds its body
│   ├── RequestRejected     4xx: this request is wrong and won't succeed on a retry
│   │   └── NoSuchMemory    404 "not found": nobody has written to (or configured) the memory yet
│   └── ServerError         5xx: overloaded (503), out of budget (507), or a bug
├── QueueFull               `record` while the send queue is full (the service is down)
├── SendFailed              a recorded batch was rejected for good (or sending broke); `.cause` says why
├── FlushTimeout            `flush(timeout)` ran out; nothing was dropped
└── ClientClosed            a call on a client after `close()` or its `with` block

ZMemWarning (a UserWarning): leaving a `with` block before every recorded episode was
delivered; the background sender keeps them and keeps trying until the process exits.
"""

from __future__ import annotations

from typing import Any


class ZMemError(Exception):
    """Base of every error the client raises."""


class TransportError(ZMemError):
    pass


class Timeout(TransportError):
    pass


class HTTPError(ZMemError):
    def __init__(self, status: int, problem: dict[str, Any], url: str) -> None:
        self.status = status
        self.problem = problem
        self.url = url
        detail = problem.get("detail") or problem.get("title") or ""
        super().__init__(f"{status} from {url}: {detail}")


class RequestRejected(HTTPError):
    pass


NOT_FOUND = "https://zmem.dev/problems/not-found"


class NoSuchMemory(RequestRejected):
    """The service has no memory by that name yet (its 404 problem of type `NOT_FOUND`).

    A memory comes into being with its first recorded episode or `configure()`; until
    then reads of it raise this, and `risk()` is 0 (an empty memory is below min_size).
    Any other 404 (a wrong URL prefix, a proxy's page) is a plain `RequestRejected`.
    """

    def __init__(self, status: int, problem: dict[str, Any], url: str, memory: str) -> None:
        super().__init__(status, problem, url)
        self.memory = memory
        self.args = (
            f"no such memory yet: {memory!r} has no episodes and was never configured "
            f"(it appears with its first recorded episode or configure()); {status} from {url}",
        )


class ServerError(HTTPError):
    pass


class QueueFull(ZMemError):
    pass


class SendFailed(ZMemError):
    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


class FlushTimeout(ZMemError):
    pass


class ClientClosed(ZMemError):
    pass


class ZMemWarning(UserWarning):
    pass
