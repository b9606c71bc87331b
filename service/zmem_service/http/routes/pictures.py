"""A memory's pictures and diagnostics, and the HTML dashboard.

`router` is mounted like the memory routes: at the root (memory `default`) and under
`/memories/{name}`. `dashboard_router` is mounted once, for `GET /`. Pictures are PNG with
an ETag and `Cache-Control: no-cache`, so a browser revalidates and gets a 304 while the
memory is unchanged; `X-Cache: HIT` says the answer came from the cache, `MISS` that it
was computed for this request (or one it joined). A request whose client hangs up stops
waiting, and a picture nobody waits for any more is not drawn; past the render queue's
bound the answer is 503 with `Retry-After`.

These are read routes (each says so: `edge.declare`) and need no more than a read token
or the dashboard cookie (set by `GET /?token=…`, `auth.CookieMiddleware`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from importlib import resources
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Query as QueryParam  # a query-string parameter, not a kNN query
from fastapi.responses import HTMLResponse, JSONResponse

from ...errors import ValidationFailed
from ...memory import Memory
from ...pictures.cache import Picture, PictureCache, RenderQueueFull, View
from ...pictures.plots import MAP_FIELDS, TRAIL_FIELDS, Limits
from ...service import ZMem
from ..edge import declare
from .deps import NameDep, ZMemDep

T = TypeVar("T")

router = APIRouter()
dashboard_router = APIRouter()


async def get_pictures(request: Request) -> PictureCache:
    """The app's picture cache (made by the lifespan, one per app)."""
    cache: PictureCache = request.app.state.pictures
    return cache


PicturesDep = Annotated[PictureCache, Depends(get_pictures)]
MaxPoints = Annotated[int, QueryParam(ge=1, le=50_000, description="most points drawn")]
Seed = Annotated[int, QueryParam(ge=0, description="seeds the subsample of drawn points")]
Dpi = Annotated[int, QueryParam(ge=10, le=300, description="dots per inch")]
Last = Annotated[int, QueryParam(ge=1, le=100_000, description="how many recent z's")]
Basis = Annotated[
    str | None,
    QueryParam(
        max_length=64,
        description="draw in the PCA basis of this memory's map (same z_dim), so two pictures share axes",
    ),
]
MapClim = Annotated[
    list[str] | None,
    QueryParam(
        description="fixed colour limits FIELD:LO:HI, repeatable; FIELD is one of "
        + ", ".join(MAP_FIELDS)
        + " (e.g. clim=soft_bind:0:1); others keep their 1st–99th percentile",
    ),
]
TrailClim = Annotated[
    list[str] | None,
    QueryParam(description="fixed colour limits density:LO:HI of the background (points per cell, LO > 0)"),
]
Worker = Annotated[str | None, QueryParam(max_length=64, description="draw only this worker's path")]
RiskWorker = Annotated[
    str | None, QueryParam(max_length=64, description="draw only this worker's recorded queries")
]
Projection = Annotated[
    Literal["pca", "risk"], QueryParam(description="pca, or risk: x best predicts the risk target")
]


@router.get("/map.png", response_class=Response)
@declare("read")
async def get_map(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    pictures: PicturesDep,
    max_points: MaxPoints = 5000,
    seed: Seed = 0,
    dpi: Dpi = 100,
    basis: Basis = None,
    clim: MapClim = None,
    projection: Projection = "pca",
) -> Response:
    memory = zmem.memory(name)
    view = View(_basis(zmem, memory, basis), _limits(clim, MAP_FIELDS), projection)
    return await _answer(request, pictures.map(memory, max_points=max_points, seed=seed, dpi=dpi, view=view))


@router.get("/trail.png", response_class=Response)
@declare("read")
async def get_trail(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    pictures: PicturesDep,
    last: Last = 1000,
    max_points: MaxPoints = 5000,
    seed: Seed = 0,
    dpi: Dpi = 100,
    worker: Worker = None,
    basis: Basis = None,
    clim: TrailClim = None,
    projection: Projection = "pca",
) -> Response:
    memory = zmem.memory(name)
    view = View(_basis(zmem, memory, basis), _limits(clim, TRAIL_FIELDS), projection)
    picture = pictures.trail(
        memory, last=last, max_points=max_points, seed=seed, dpi=dpi, worker=worker, view=view
    )
    return await _answer(request, picture)


@router.get("/risk.png", response_class=Response)
@declare("read")
async def get_risk(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    pictures: PicturesDep,
    dpi: Dpi = 100,
    worker: RiskWorker = None,
) -> Response:
    return await _answer(request, pictures.risk(zmem.memory(name), dpi=dpi, worker=worker))


@router.get("/diagnostics")
@declare("read")
async def get_diagnostics(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    pictures: PicturesDep,
    basis: Basis = None,
    projection: Projection = "pca",
) -> Any:
    memory = zmem.memory(name)
    return await _until_gone(
        request, pictures.diagnostics(memory, View(_basis(zmem, memory, basis), projection=projection))
    )


@dashboard_router.get("/", response_class=HTMLResponse)
@declare("read")
async def get_dashboard() -> HTMLResponse:
    return HTMLResponse(_dashboard(), headers={"Cache-Control": "no-cache"})


@functools.cache
def _dashboard() -> str:
    page = resources.files("zmem_service.http").joinpath("static/dashboard.html")
    return page.read_text(encoding="utf-8")


def _basis(zmem: ZMem, memory: Memory, basis: str | None) -> Memory | None:
    """The memory whose PCA basis to draw in: 404 if unknown, 422 if its z_dim differs."""
    if basis is None:
        return None
    other = zmem.memory(basis)
    mine, theirs = memory.settings.z_dim, other.settings.z_dim
    if theirs is None or (mine is not None and mine != theirs):
        raise ValidationFailed.at(
            ["query", "basis"],
            f"memory {basis!r} has z_dim {theirs}; memory {memory.name!r} has z_dim {mine}",
        )
    return other


CLIM_MAX = 1e15
"""Colour limits beyond this are no scale a picture can show (and overflow matplotlib)."""


def _limits(specs: list[str] | None, fields: tuple[str, ...]) -> Limits:
    """`FIELD:LO:HI` specs → {field: (lo, hi)}; 422 naming `clim` for anything else."""
    limits: Limits = {}
    for spec in specs or []:
        parts = spec.split(":")
        try:
            lo, hi = float(parts[1]), float(parts[2])
            ok = len(parts) == 3 and parts[0] in fields and -CLIM_MAX <= lo < hi <= CLIM_MAX
        except (IndexError, ValueError):
            ok = False
        if not ok or (parts[0] == "density" and lo <= 0):
            raise ValidationFailed.at(
                ["query", "clim"],
                f"{spec!r}: expected FIELD:LO:HI with FIELD one of {', '.join(fields)} and "
                f"-{CLIM_MAX:g} <= LO < HI <= {CLIM_MAX:g}"
                + (" (LO > 0 on the log density scale)" if "density" in fields else ""),
            )
        limits[parts[0]] = (lo, hi)
    return limits


async def _until_gone(request: Request, work: Awaitable[T]) -> T | Response:
    """`work`'s result, or an empty 499 once the client has hung up (nobody reads it): the
    cache then drops a computation that nobody else waits for."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return Response(status_code=499)
    try:
        return task.result()
    except RenderQueueFull as e:
        headers = {"Retry-After": str(e.retry_after)}
        return JSONResponse(
            e.problem(), status_code=e.status, media_type="application/problem+json", headers=headers
        )


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request: Request, work: Awaitable[Picture]) -> Response:
    result = await _until_gone(request, work)
    return result if isinstance(result, Response) else _png(request, result)


def _png(request: Request, picture: Picture) -> Response:
    headers = {
        "ETag": picture.etag,
        "Cache-Control": "no-cache",
        "X-Cache": "HIT" if picture.cached else "MISS",
    }
    if _matches(request.headers.get("if-none-match"), picture.etag):
        return Response(status_code=304, headers=headers)
    return Response(picture.png, media_type="image/png", headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weak comparison, RFC 9110 §13.1.2)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
