"""The client's errors and warning.

ZMemError
├── TransportError          the service could not be reached, or did not answer in time
│   └── Timeout             the call's timeout ran out
├── HTTPError               the service answered with an error; `.problem` holds its body,
│   │                       `.retry_after` its Retry-After in seconds (or None)
│   ├── RequestRejected     4xx: this request is wrong and won't succeed on a retry
│   │   └── NoSuchMemory    404 "not found": nobody has written to (or configured) the memory yet
│   └── ServerError         5xx: overloaded (503), out of budget (507), or a bug
├── QueueFull               `record` while the send queue is full (the service is down)
├── SendFailed              recorded episodes were lost; `.cause` says why
│   └── EpisodesDropped     the service refused recorded episodes for good (or sending broke):
│                           how many since the last report, in all, and the first reasons
├── FlushTimeout            `flush(timeout)` ran out; nothing was dropped
├── ClientClosed            a call on a client after `close()` or its `with` block
└── ReplicaError            the replica cannot answer: too stale (`strict=True`), over its
                            memory cap, refused by the service, or without the value of
                            sigma "auto" (see `ZMemClient(replica=True)`)

ZMemWarning (a UserWarning): leaving a `with` block before every recorded episode was
delivered; the background sender keeps them and keeps trying until the process exits.
ReplicaLagWarning (a UserWarning): the replica has not known itself caught up for longer
than `max_lag` seconds, and answers from its last state.

Every error pickles with its message and attributes (a worker pool passes a worker's
error to the parent process): those whose constructor takes more than the message
say, in `__reduce__`, how to build them again.
"""

from __future__ import annotations

import pickle
from typing import Any


class ZMemError(Exception):
    """Base of every error the client raises."""


class TransportError(ZMemError):
    pass


class Timeout(TransportError):
    pass


class HTTPError(ZMemError):
    def __init__(
        self, status: int, problem: dict[str, Any], url: str, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.problem = problem
        self.url = url
        self.retry_after = retry_after
        detail = problem.get("detail") or problem.get("title") or ""
        super().__init__(f"{status} from {url}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status, self.problem, self.url, self.retry_after), self.__dict__


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

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status, self.problem, self.url, self.memory), self.__dict__


class ServerError(HTTPError):
    pass


class QueueFull(ZMemError):
    pass


class SendFailed(ZMemError):
    def __init__(self, message: str, cause: BaseException | None) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), _picklable(self.cause)), _state(self)


class EpisodesDropped(SendFailed):
    """Recorded episodes that were dropped: the service refused them for good (a 422 naming
    them, a single episode still too large, a 401/403/404...), or a bug broke the sending.

    `count`: dropped since the last report; `total`: since the client started;
    `reasons`: (episode id, why) for the first few; `cause`: the first error among them.
    """

    def __init__(
        self, count: int, total: int, reasons: list[tuple[str, str]], cause: BaseException | None
    ) -> None:
        self.count = count
        self.total = total
        self.reasons = reasons
        listed = "; ".join(f"{id_}: {why}" for id_, why in reasons)
        more = f" (and {count - len(reasons)} more)" if count > len(reasons) else ""
        super().__init__(
            f"{count} recorded episodes were dropped ({total} since this client started): {listed}{more}",
            cause,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.count, self.total, self.reasons, _picklable(self.cause))
        return type(self), args, _state(self)


class FlushTimeout(ZMemError):
    pass


class ClientClosed(ZMemError):
    pass


class ZMemWarning(UserWarning):
    pass


class ReplicaError(ZMemError):
    """The replica cannot answer: too stale (`strict=True`), over its memory cap, refused by
    the service, without a complete state in time while the service sends pages it refuses,
    or asked for `sigma: "auto"` before the service could tell it the value."""


class ReplicaLagWarning(UserWarning):
    """The replica has not known itself caught up for longer than `max_lag` seconds."""


def _state(error: SendFailed) -> dict[str, Any]:
    """What pickles besides the constructor's arguments (notes, say); `cause` goes through them."""
    return {key: value for key, value in error.__dict__.items() if key != "cause"}


def _picklable(error: BaseException | None) -> BaseException | None:
    """`error`, or a ZMemError with its text when it doesn't survive pickling (a bug's exception,
    or one whose constructor takes more than a message, may not)."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return ZMemError(f"{type(error).__name__}: {error}")
    return error
