"""The client's errors.

ZMemError
├── TransportError          the service could not be reached, or did not answer in time
│   └── Timeout             the call's timeout ran out
├── HTTPError               the service answered with an error; `.problem` holds its body
│   ├── RequestRejected     4xx: this request is wrong and won't succeed on a retry
│   └── ServerError         5xx: overloaded (503), out of budget (507), or a bug
├── QueueFull               `record` while the send queue is full (the service is down)
├── SendFailed              a recorded batch was rejected for good (or sending broke); `.cause` says why
└── FlushTimeout            `flush(timeout)` ran out; nothing was dropped
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
