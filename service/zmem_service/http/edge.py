"""What each route declares at the edge, and the one check that reads it.

A route says, where it is defined, who may call it and which bodies it takes
(`@declare(...)`, read by `edge_of`); nothing else decides auth or body types.
Both ways a request reaches a route go through `admit`: FastAPI's dependency
(`guard`) and the hot path (`fastpath.FastPath`, built from the same declarations).
The OpenAPI schema reads them too (`openapi.py`).

Access levels: "open" (no token ever), "read" (the read token, the dashboard
cookie, or the write token) and "write" (the write token in the Authorization
header: a cookie is sent cross-site, so it only ever reads).

A request's head is read straight from the ASGI scope (`Head`): the checks run
before FastAPI builds a `Request`, and on the hot path it never does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.requests import cookie_parser
from starlette.types import Receive, Scope

from zmem_core.wire import SAFETENSORS

from ..errors import Forbidden, Unauthorized, UnsupportedMediaType
from .auth import COOKIE, Tokens, cookie_value

Access = Literal["open", "read", "write"]
JSON = "application/json"
NPZ = ("application/octet-stream", "application/x-npz", "application/zip")
QUERY_BODIES = (JSON, SAFETENSORS)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Edge:
    """A route's declaration.

    access: who may call it. bodies: the media types its body may have (JSON also as
    any `+json` type); empty for a route that takes none. untyped: a body without a
    content type is taken too (as the first of `bodies`). schema: the JSON body's model
    (OpenAPI only: the route validates it). fast: the handler the hot path calls
    instead of FastAPI's route, `(call, name, zmem) -> Response`.
    """

    access: Access
    bodies: tuple[str, ...] = ()
    untyped: bool = False
    schema: type[BaseModel] | None = None
    fast: Callable[..., Awaitable[Any]] | None = None


ATTRIBUTE = "__zmem_edge__"


def declare(
    access: Access,
    bodies: tuple[str, ...] = (),
    *,
    untyped: bool = False,
    schema: type[BaseModel] | None = None,
    fast: Callable[..., Awaitable[Any]] | None = None,
) -> Callable[[F], F]:
    """Decorator: the route's `Edge` (under `@router.get(...)` and friends)."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, ATTRIBUTE, Edge(access, bodies, untyped, schema, fast))
        return endpoint

    return mark


def edge_of(endpoint: Callable[..., Any]) -> Edge:
    """The declaration of `endpoint`; a route without one is a bug, refused when the app is built."""
    edge = getattr(endpoint, ATTRIBUTE, None)
    if not isinstance(edge, Edge):
        raise TypeError(
            f"route {getattr(endpoint, '__qualname__', endpoint)!r} declares no access (@declare)"
        )
    return edge


@dataclass(frozen=True)
class Declared:
    """One route as mounted: its full path template, methods and declaration."""

    path: str
    methods: frozenset[str]
    edge: Edge


def declared_routes(routes: Sequence[Any]) -> Iterator[Declared]:
    """Every endpoint route of an app (`app.routes`, included routers flattened) with its
    declaration; raises TypeError for one that declares nothing."""
    for context in iter_route_contexts(routes):
        endpoint, path = context.endpoint, context.path_format
        if endpoint is None or path is None or not hasattr(context.original_route, "dependant"):
            continue  # not an endpoint FastAPI serves (a mount, a websocket)
        yield Declared(path, frozenset(context.methods or ()), edge_of(endpoint))


class Head:
    """A request's method, path, query string and headers, read from the ASGI scope once."""

    __slots__ = ("_media_type", "headers", "method", "path", "query_string", "scope")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query_string: bytes = scope.get("query_string", b"")
        # The first of repeated headers wins, as starlette's `Headers.get` has it.
        self.headers: dict[bytes, bytes] = dict(reversed(scope["headers"]))
        self._media_type: str | None = None

    def header(self, name: bytes, default: str = "") -> str:
        value = self.headers.get(name)
        return default if value is None else value.decode("latin-1")

    @property
    def media_type(self) -> str:
        if self._media_type is None:
            self._media_type = self.header(b"content-type").split(";")[0].strip().lower()
        return self._media_type

    @property
    def content_length(self) -> int | None:
        declared = self.header(b"content-length")
        return int(declared) if declared.isdigit() else None

    def wants(self, media: str) -> bool:
        return media in self.header(b"accept")

    def query(self) -> dict[str, str]:
        """The query parameters (the last of repeated ones)."""
        if not self.query_string:
            return {}
        return dict(parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))

    @property
    def peer(self) -> str:
        """The client's address as the server saw it (a proxy's, behind one)."""
        client = self.scope.get("client")
        return str(client[0]) if client else "unknown"

    def bearer(self) -> str | None:
        header = self.header(b"authorization")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def cookie(self, name: str) -> str | None:
        """A cookie's value, parsed as starlette parses them (leniently, as browsers send them)."""
        raw = self.header(b"cookie")
        return cookie_parser(raw).get(name) if raw else None


@dataclass
class Call:
    """What a handler reads of one request: its head, its body stream and the app's state."""

    head: Head
    receive: Receive

    @property
    def state(self) -> Any:
        return self.head.scope["app"].state

    @classmethod
    def of(cls, request: Request) -> Call:
        return cls(Head(request.scope), request.receive)


def admit(edge: Edge, head: Head, tokens: Tokens) -> None:
    """Raise 401/403 unless the token allows the route, 415 unless the body is a declared type."""
    _authorize(edge, head, tokens)
    _check_body_type(edge, head)


def _authorize(edge: Edge, head: Head, tokens: Tokens) -> None:
    if edge.access == "open" or not tokens.enabled:
        return
    level = tokens.level(head.bearer())
    if level is None:
        query_token = head.query().get("token") if head.path == "/" and head.query_string else None
        if query_token is not None and tokens.level(query_token) is not None:
            # `GET /?token=…` sets the dashboard cookie (auth.CookieMiddleware sends it).
            head.scope.setdefault("state", {})["zmem_cookie"] = cookie_value(query_token)
            level = "read"
        elif tokens.cookie_valid(head.cookie(COOKIE)):
            level = "read"
    if level is None:
        raise Unauthorized("a valid bearer token is required (Authorization: Bearer <token>)")
    if level == "read" and edge.access == "write":
        raise Forbidden(
            "writes need the write token in the Authorization header (read tokens and the dashboard "
            "cookie only read)"
        )


def _check_body_type(edge: Edge, head: Head) -> None:
    """A body must be one of the declared types. Types a browser may send cross-site without a
    preflight (text/plain, forms) are never declared, so never parsed."""
    if head.method not in ("POST", "PUT"):
        return
    given = head.media_type
    if given in edge.bodies or (given.endswith("+json") and JSON in edge.bodies):
        return
    if not given and (edge.untyped or head.header(b"content-length", "0") == "0"):
        return  # an untyped import, or no body at all
    wanted = " or ".join(edge.bodies) if edge.bodies else "no body"
    if edge.untyped:
        wanted = f"an npz ({edge.bodies[0]})"
    raise UnsupportedMediaType(f"content-type {given or '(none)'!r} is not accepted here; send {wanted}")


async def guard(request: Request) -> None:
    """FastAPI dependency on every route: `admit` under the matched route's declaration."""
    edge = edge_of(request.scope["route"].endpoint)
    admit(edge, Head(request.scope), request.app.state.tokens)
