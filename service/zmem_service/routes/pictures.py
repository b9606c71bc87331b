"""A memory's pictures and diagnostics, and the HTML dashboard.

`router` is mounted like the memory routes: at the root (memory `default`) and under
`/memories/{name}`. `dashboard_router` is mounted once, for `GET /`. Pictures are PNG with
an ETag and `Cache-Control: no-cache`, so a browser revalidates and gets a 304 while the
memory is unchanged.

Auth is app-wide (`auth.authorize`, a dependency of every route, and `auth.CookieMiddleware`
for `GET /?token=…`): these are read routes and need no more than a read token.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse

from ..pictures import Picture, PictureCache
from .deps import NameDep, ZMemDep

router = APIRouter()
dashboard_router = APIRouter()


def get_pictures(request: Request) -> PictureCache:
    """The app's picture cache (made by the lifespan, one per app)."""
    cache: PictureCache = request.app.state.pictures
    return cache


PicturesDep = Annotated[PictureCache, Depends(get_pictures)]
MaxPoints = Annotated[int, Query(ge=1, le=50_000, description="most points drawn")]
Seed = Annotated[int, Query(ge=0, description="seeds the subsample of drawn points")]
Dpi = Annotated[int, Query(ge=10, le=300, description="dots per inch")]
Last = Annotated[int, Query(ge=1, le=100_000, description="how many recent z's")]


@router.get("/map.png", response_class=Response)
async def get_map(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    pictures: PicturesDep,
    max_points: MaxPoints = 5000,
    seed: Seed = 0,
    dpi: Dpi = 100,
) -> Response:
    memory = zmem.memory(name)
    return _png(request, await pictures.map(memory, max_points=max_points, seed=seed, dpi=dpi))


@router.get("/trail.png", response_class=Response)
async def get_trail(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    pictures: PicturesDep,
    last: Last = 1000,
    max_points: MaxPoints = 5000,
    seed: Seed = 0,
    dpi: Dpi = 100,
) -> Response:
    memory = zmem.memory(name)
    picture = await pictures.trail(memory, last=last, max_points=max_points, seed=seed, dpi=dpi)
    return _png(request, picture)


@router.get("/risk.png", response_class=Response)
async def get_risk(
    request: Request, name: NameDep, zmem: ZMemDep, pictures: PicturesDep, dpi: Dpi = 100
) -> Response:
    return _png(request, await pictures.risk(zmem.memory(name), dpi=dpi))


@router.get("/diagnostics")
async def get_diagnostics(name: NameDep, zmem: ZMemDep, pictures: PicturesDep) -> dict[str, Any]:
    return await pictures.diagnostics(zmem.memory(name))


@dashboard_router.get("/", response_class=HTMLResponse)
async def get_dashboard() -> HTMLResponse:
    return HTMLResponse(_dashboard(), headers={"Cache-Control": "no-cache"})


@functools.cache
def _dashboard() -> str:
    page = resources.files("zmem_service").joinpath("static/dashboard.html")
    return page.read_text(encoding="utf-8")


def _png(request: Request, picture: Picture) -> Response:
    headers = {"ETag": picture.etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("if-none-match"), picture.etag):
        return Response(status_code=304, headers=headers)
    return Response(picture.png, media_type="image/png", headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weak comparison, RFC 9110 §13.1.2)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
