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
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import MAX_DETAIL_CHARS, MAX_ERRORS, ZMemError, clip, clip_errors
from ..metrics import Metrics, MetricsMiddleware
from ..pictures.cache import PictureCache
from ..service import ZMem
from ..settings import ServiceSettings
from .auth import CookieMiddleware, Tokens, authorize
from .fastpath import FastPath
from .openapi import install as install_openapi
from .routes import admin, memory, pictures, queries
from .wire import Codecs, check_body_type

log = logging.getLogger("zmem")
PROBLEM = "application/problem+json"


def problem_response(error: ZMemError) -> JSONResponse:
    return JSONResponse(error.problem(), status_code=error.status, media_type=PROBLEM, headers=error.headers)


async def on_zmem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ZMemError)
    return problem_response(exc)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only loc and msg, clipped: pydantic's `input` would echo the request back.
    errors = clip_errors([{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()[:MAX_ERRORS]])
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
    body = {
        "type": "https://zmem.dev/problems/validation",
        "title": "Validation failed",
        "status": status,
        "detail": clip(f"{where}: {first['msg']}", MAX_DETAIL_CHARS),
        "errors": errors,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    body = {
        "type": "about:blank",
        "title": clip(str(exc.detail), MAX_DETAIL_CHARS),
        "status": exc.status_code,
        "detail": clip(f"{request.method} {request.url.path}: {exc.detail}", MAX_DETAIL_CHARS),
    }
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 503:
        headers.setdefault("Retry-After", "1")
    return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM, headers=headers)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(ZMemError(f"unexpected {type(exc).__name__}; see the server log"))


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The zmem application. Memories load in the background: /readyz says when they're in."""
    settings = settings or ServiceSettings()
    tokens = Tokens.from_settings(settings)
    metrics = Metrics()
    zmem = ZMem(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        zmem.signal.bind(asyncio.get_running_loop())
        loading = asyncio.create_task(asyncio.to_thread(zmem.load))
        loading.add_done_callback(_report_load_failure)
        # Its render process starts with the first picture (about a second of imports).
        app.state.pictures = PictureCache()
        yield
        zmem.signal.close()  # long polls of the changes feed answer now
        await asyncio.wait([loading])
        await asyncio.to_thread(app.state.pictures.close)
        await asyncio.to_thread(app.state.codecs.close)
        await asyncio.to_thread(zmem.close)

    app = FastAPI(
        title="zmem",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(authorize), Depends(check_body_type)],
        openapi_url=None,  # served by routes/admin.py, behind the tokens
        docs_url=None,
        redoc_url=None,
    )
    app.state.zmem = zmem
    app.state.codecs = Codecs.create()
    app.state.tokens = tokens
    app.state.metrics = metrics
    app.add_middleware(FastPath, problem=problem_response)  # innermost: still counted and logged
    app.add_middleware(CookieMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
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
