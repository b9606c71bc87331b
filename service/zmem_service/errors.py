"""The service's errors, each carrying its HTTP status, title and problem type.

    ZMemError (500)
    ├── BadRequest (400)          unparseable body
    ├── Unauthorized (401)        missing or wrong token
    ├── Forbidden (403)           a read token on a write route
    ├── NotFound (404)            unknown memory on a read
    ├── RequestTimeout (408)      a body that arrives too slowly
    ├── Conflict (409)            settings differ, import into a non-empty memory
    ├── PayloadTooLarge (413)     body over the limit
    ├── UnsupportedMediaType (415) a body that is neither JSON nor safetensors (nor an npz import)
    ├── ValidationFailed (422)    invalid content; `errors` name the field and episode
    ├── Unavailable (503)         loading, overloaded or shutting down; carries Retry-After
    └── InsufficientStorage (507) the memory budget would be exceeded

The domain raises these; the edge maps them onto `application/problem+json`
(RFC 9457), with the error's `headers`. `problem` builds every problem document the
service sends, these errors' and the HTTP layer's own (unknown routes, parser and
connection refusals). A request that raises changes nothing. What a problem echoes
is capped (`clip`): a 10 MB request never gets a large answer.
"""

from __future__ import annotations

from typing import Any, ClassVar

MAX_DETAIL_CHARS = 1000
MAX_MSG_CHARS = 300
MAX_LOC_CHARS = 100
MAX_ERRORS = 20


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_ERRORS `{loc, msg}` entries, every string in them clipped."""
    return [
        {
            **e,
            "loc": [clip(p, MAX_LOC_CHARS) if isinstance(p, str) else p for p in e.get("loc", [])][:8],
            "msg": clip(str(e.get("msg", "")), MAX_MSG_CHARS),
        }
        for e in errors[:MAX_ERRORS]
    ]


PROBLEM = "application/problem+json"
PROBLEM_TYPES = "https://zmem.dev/problems/"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A problem+json document: `type` from `slug` (the title's words when None; "about:blank"
    for ""), `detail` and `errors` clipped, `extra` members added as given."""
    if slug is None:
        slug = title.lower().replace(" ", "-")
    body: dict[str, Any] = {
        "type": PROBLEM_TYPES + slug if slug else "about:blank",
        "title": clip(title, MAX_DETAIL_CHARS),
        "status": status,
        "detail": clip(detail, MAX_DETAIL_CHARS),
    }
    if errors is not None:
        body["errors"] = clip_errors(errors)
    body.update(extra)
    return body


class ZMemError(Exception):
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    slug: ClassVar[str] = "internal"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        return problem(self.status, self.title, self.detail, slug=self.slug, errors=self.errors, **self.extra)


class BadRequest(ZMemError):
    status, title, slug = 400, "Bad request", "bad-request"


class Unauthorized(ZMemError):
    status, title, slug = 401, "Unauthorized", "unauthorized"


class Forbidden(ZMemError):
    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(ZMemError):
    status, title, slug = 404, "Not found", "not-found"


class RequestTimeout(ZMemError):
    status, title, slug = 408, "Request timeout", "request-timeout"


class Conflict(ZMemError):
    status, title, slug = 409, "Conflict", "conflict"


class PayloadTooLarge(ZMemError):
    status, title, slug = 413, "Payload too large", "payload-too-large"


class UnsupportedMediaType(ZMemError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class ValidationFailed(ZMemError):
    status, title, slug = 422, "Validation failed", "validation"

    @classmethod
    def at(cls, loc: list[str | int], msg: str) -> ValidationFailed:
        """One invalid field: `loc` is its path, e.g. `["episodes", 3, "soft_bind"]`."""
        where = ".".join(str(part) for part in loc)
        return cls(f"{where}: {msg}", errors=[{"loc": loc, "msg": msg}])


class Unavailable(ZMemError):
    status, title, slug = 503, "Service unavailable", "unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class InsufficientStorage(ZMemError):
    status, title, slug = 507, "Insufficient storage", "insufficient-storage"
