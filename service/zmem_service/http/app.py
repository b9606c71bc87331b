"""`create_app(settings)`: the FastAPI application, its lifespan and its error handling."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from zmem_core.busy import BusyWait

from .. import __version__
from ..errors import MAX_ERRORS, ZMemError, problem
from ..metrics import Metrics, MetricsMiddleware, log_summaries
from ..pictures.cache import PictureCache
from ..service import ZMem
from ..settings import ServiceSettings
from .auth import CookieMiddleware, Tokens
from .busy import BusyPoll
from .edge import declared_routes, guard
from .fastpath import FastPath
from .openapi import install as install_openapi
from .pools import Codecs
from .routes import admin, memory, pictures, queries
from .streaming import error_answer, problem_answer

log = logging.getLogger("zmem")


async def on_zmem_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ZMemError)
    return error_answer(exc)


async def on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Only loc and msg: pydantic's `input` would echo the request back.
    errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()[:MAX_ERRORS]]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
    detail = f"{where}: {first['msg']}"
    return problem_answer(problem(status, "Validation failed", detail, slug="validation", errors=errors))


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = f"{request.method} {request.url.path}: {exc.detail}"
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 503:
        headers.setdefault("Retry-After", "1")
    return problem_answer(problem(exc.status_code, str(exc.detail), detail, slug=""), headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_answer(ZMemError(f"unexpected {type(exc).__name__}; see the server log"))


class ZMemApp(FastAPI):
    """FastAPI with the hot path in front of its middleware stack: a request for a fast route
    (`fastpath.FastPath`) is answered without entering it."""

    fast: FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None if self.fast is None else self.fast.match(scope)
        if match is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        assert self.fast is not None
        await self.fast.serve(match, self.state, scope, receive, send)


def create_app(settings: ServiceSettings | None = None, *, fast_path: bool = True) -> ZMemApp:
    """The zmem application. Memories load in the background: /readyz says when they're in.

    Every route declares its access and bodies (`edge.declare`); a route that doesn't is
    refused here. `fast_path=False` leaves the hot routes to FastAPI too (tests compare)."""
    settings = settings or ServiceSettings()
    tokens = Tokens.from_settings(settings)
    metrics = Metrics()
    zmem = ZMem(settings, metrics)
    metrics.watch(zmem.memories, zmem.index_thread)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        zmem.signal.bind(asyncio.get_running_loop())
        loading = asyncio.create_task(asyncio.to_thread(zmem.load))
        loading.add_done_callback(_report_load_failure)
        # Its render process starts with the first picture (about a second of imports).
        app.state.pictures = PictureCache()
        every = settings.log_summary_seconds
        summaries = asyncio.create_task(log_summaries(metrics, every)) if every > 0 else None
        yield
        if summaries is not None:
            summaries.cancel()
        zmem.signal.close()  # long polls of the changes feed answer now
        await asyncio.wait([loading])
        await asyncio.to_thread(app.state.pictures.close)
        await asyncio.to_thread(app.state.codecs.close)
        await asyncio.to_thread(zmem.close)
        metrics.access.flush()

    app = ZMemApp(
        title="zmem",
        version=__version__,
        lifespan=lifespan,
        # The service counts and times requests itself (/metrics); FastAPI's own OpenTelemetry
        # hooks would only add work to every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        dependencies=[Depends(guard)],
        openapi_url=None,  # served by routes/admin.py, behind the tokens
        docs_url=None,
        redoc_url=None,
    )
    app.state.zmem = zmem
    app.state.codecs = Codecs.create()
    app.state.tokens = tokens
    app.state.metrics = metrics
    app.state.busy = BusyPoll(BusyWait(settings.busy_poll, "busy_poll"), lambda: zmem.index_thread.idle)
    metrics.state.busy = app.state.busy
    if fast_path:
        app.fast = FastPath(app.router.routes)  # counted and logged as the middleware does
    app.add_middleware(CookieMiddleware)
    app.add_middleware(MetricsMiddleware, log=metrics.request_log)
    app.add_exception_handler(ZMemError, on_zmem_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.include_router(admin.router)
    app.include_router(memory.router)
    app.include_router(memory.router, prefix="/memories/{name}")
    app.include_router(queries.router)
    app.include_router(queries.router, prefix="/memories/{name}")
    app.include_router(pictures.router)
    app.include_router(pictures.router, prefix="/memories/{name}")
    app.include_router(pictures.dashboard_router)
    for _ in declared_routes(app.routes):  # raises for a route that declares nothing
        pass
    install_openapi(app)
    return app


def _report_load_failure(task: asyncio.Task[None]) -> None:
    """A store that can't be loaded stops the process (exit 3): clients would otherwise
    retry a service that answers 503 "loading" forever."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    log.critical("zmem serve: loading the store failed, exiting: %s", error, exc_info=error)
    print(f"zmem serve: loading the store failed: {error}", file=sys.stderr, flush=True)
    os._exit(3)
