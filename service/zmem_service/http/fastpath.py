"""The hot path: the routes whose declarations name a fast handler, in front of FastAPI.

A training step calls `risk()` once per step, so `POST …/neighbors` and `…/risk` carry
nearly all the traffic, and FastAPI's middleware stack, route matching, dependency
solving and request objects cost more than the search itself on a small memory. The
app (`app.ZMemApp`) hands every request to `FastPath.match` first: a route whose
declaration (`edge.declare(fast=…)`) names a handler is matched here by its own path
pattern and method, checked by the same `edge.admit` under the same declaration,
answered by that handler (which reads its head from the scope and its body from
`receive()`), and counted and logged as the middleware counts the others. Every other
request goes on to FastAPI; the routes stay declared there (for the schema, and
identical answers).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

from ..errors import ZMemError
from ..registry import DEFAULT
from .edge import Call, Edge, Head, admit, declared_routes
from .streaming import error_answer

log = logging.getLogger("zmem")


@dataclass(frozen=True)
class Route:
    """What the metrics read of a matched route (its `path` template)."""

    path: str


@dataclass(frozen=True)
class Match:
    route: Route
    edge: Edge
    name: str  # the memory's


class FastPath:
    """`routes`: the app's route list (read when the first request comes, once all are included)."""

    def __init__(self, routes: Sequence[Any]) -> None:
        self._routes = routes
        self._table: list[tuple[re.Pattern[str], Route, Edge]] | None = None

    def table(self) -> list[tuple[re.Pattern[str], Route, Edge]]:
        """(path pattern, route, declaration) of each POST route with a fast handler, in the
        app's order (the first match wins, as in the app's own routing)."""
        if self._table is None:
            self._table = [
                (compile_path(d.path)[0], Route(d.path), d.edge)
                for d in declared_routes(self._routes)
                if "POST" in d.methods and d.edge.fast is not None
            ]
        return self._table

    def match(self, scope: Scope) -> Match | None:
        """The fast route `scope` asks for; None for any other request."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path = scope["path"]
        for pattern, route, edge in self.table():
            found = pattern.match(path)
            if found is not None:
                return Match(route, edge, found.groupdict().get("name", DEFAULT))
        return None

    async def serve(self, match: Match, state: Any, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a matched request (any error as problem+json), counted and logged."""
        start = time.perf_counter()
        scope["route"] = match.route
        status = 500  # unless the answer is sent
        with state.busy:  # once answered, the loop polls for the next query (`busy.py`)
            try:
                response = await self._answer(match, state, scope, receive)
                await response(scope, receive, send)
                status = response.status_code
            except Exception:  # sending failed: uvicorn answers 500 if nothing was sent yet
                log.exception("unexpected error sending the answer to POST %s", scope["path"])
                raise
            finally:
                state.metrics.request_log.add(
                    match.route.path, "POST", scope["path"], status, time.perf_counter() - start
                )

    async def _answer(self, match: Match, state: Any, scope: Scope, receive: Receive) -> Response:
        """The route's answer, or its error's problem+json."""
        edge = match.edge
        try:
            head = Head(scope)
            admit(edge, head, state.tokens)
            assert edge.fast is not None
            return await edge.fast(Call(head, receive), match.name, state.zmem)
        except ZMemError as e:
            return error_answer(e)
        except Exception as e:
            log.exception("unexpected error on POST %s", scope["path"], exc_info=e)
            return error_answer(ZMemError(f"unexpected {type(e).__name__}; see the server log"))
