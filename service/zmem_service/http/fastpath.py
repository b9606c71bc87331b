"""The hot path: the routes whose declarations name a fast handler, without FastAPI's routing.

A training step calls `risk()` once per step, so `POST …/neighbors` and `…/risk` carry
nearly all the traffic, and FastAPI's route matching, dependency solving and request
objects cost more than the search itself on a small memory. This pure-ASGI layer is
built from the app's own routes: a route whose declaration (`edge.declare(fast=…)`)
names a handler is matched here by its own path pattern and method, checked by the
same `edge.admit` under the same declaration, and answered by that handler, which
reads its head from the scope and its body from `receive()`. Every other request goes
on to FastAPI; the routes stay declared there (for the schema, and identical answers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ZMemError
from ..registry import DEFAULT
from .edge import Call, Edge, Head, admit, declared_routes
from .streaming import error_answer

log = logging.getLogger("zmem")


@dataclass(frozen=True)
class Route:
    """What the metrics middleware reads of a matched route (its `path` template)."""

    path: str


class FastPath:
    """`routes`: the app's route list (read when the first request comes, once all are included)."""

    def __init__(self, app: ASGIApp, routes: Sequence[Any]) -> None:
        self.app = app
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        for pattern, route, edge in self.table():  # noqa: B007 (used after the break)
            match = pattern.match(path)
            if match is not None:
                break
        else:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # what the metrics read (its path template)
        head = Head(scope)
        state = scope["app"].state
        response: Response
        with state.busy:  # once answered, the loop polls for the next query (`busy.py`)
            try:
                admit(edge, head, state.tokens)
                assert edge.fast is not None
                response = await edge.fast(
                    Call(head, receive), match.groupdict().get("name", DEFAULT), state.zmem
                )
            except ZMemError as e:
                response = error_answer(e)
            except Exception as e:
                log.exception("unexpected error on POST %s", path, exc_info=e)
                response = error_answer(ZMemError(f"unexpected {type(e).__name__}; see the server log"))
            await response(scope, receive, send)
