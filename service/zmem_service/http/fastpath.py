"""The hot path, without FastAPI's routing: `POST …/neighbors` and `POST …/risk`.

A training step calls `risk()` once per step, so these two routes carry nearly all
the traffic, and FastAPI's route matching and dependency solving cost more than
the search itself on a small memory. This pure-ASGI layer answers them directly
with the same functions the routes use (auth, body checks, decoding, the search,
encoding, problem+json errors); every other request goes on to FastAPI. The
routes stay declared in FastAPI for the OpenAPI schema and behave identically.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ZMemError
from ..registry import DEFAULT
from ..service import ZMem
from .auth import authorize
from .routes.memory import neighbors_answer, risk_answer
from .wire import check_body_type

log = logging.getLogger("zmem")
PATH = re.compile(r"^(?:/memories/(?P<name>[^/]+))?/(?P<route>neighbors|risk)$")
Answer = Callable[[Request, str, ZMem], Awaitable[Response]]
ANSWERS: dict[str, Answer] = {"neighbors": neighbors_answer, "risk": risk_answer}


@dataclass(frozen=True)
class Route:
    """What the metrics middleware reads of a matched route (its `path` template)."""

    path: str


ROUTES = {
    (named, route): Route(f"/memories/{{name}}/{route}" if named else f"/{route}")
    for named in (False, True)
    for route in ANSWERS
}


class FastPath:
    """`problem` turns a ZMemError into its problem+json answer (the app's one handler)."""

    def __init__(self, app: ASGIApp, problem: Callable[[ZMemError], Response]) -> None:
        self.app = app
        self.problem = problem

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        name, route = match["name"], match["route"]
        scope["route"] = ROUTES[(name is not None, route)]
        request = Request(scope, receive)
        try:
            await authorize(request)
            await check_body_type(request)
            zmem: ZMem = request.app.state.zmem
            response = await ANSWERS[route](request, name or DEFAULT, zmem)
        except ZMemError as e:
            response = self.problem(e)
        except Exception as e:
            log.exception("unexpected error on POST %s", scope["path"], exc_info=e)
            response = self.problem(ZMemError(f"unexpected {type(e).__name__}; see the server log"))
        await response(scope, receive, send)
