"""Routes of one memory; mounted at the root (memory `default`) and under `/memories/{name}`."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi import Query as QueryParam  # a query-string parameter, not a kNN query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ...service import ZMem
from ..wire import body_chunks, neighbors_arrays, read_episodes, read_query, respond
from .deps import NameDep, ZMemDep

router = APIRouter()


@router.post("/episodes")
async def post_episodes(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    batch = await read_episodes(request, zmem.settings)
    return await zmem.write(name, batch)


@router.post("/neighbors")
async def post_neighbors(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    return await neighbors_answer(request, name, zmem)


@router.post("/risk")
async def post_risk(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    return await risk_answer(request, name, zmem)


async def neighbors_answer(request: Request, name: str, zmem: ZMem) -> Response:
    """`POST …/neighbors` (also served by `fastpath`, which skips FastAPI's routing)."""
    query = await read_query(request, zmem.settings)
    nb = await zmem.neighbors(name, query)
    meta = {"size": nb.size, "active": nb.active, "k": nb.k, "sigma": nb.sigma}
    return await respond(request, zmem.settings, neighbors_arrays(nb, query.one_row), meta)


async def risk_answer(request: Request, name: str, zmem: ZMem) -> Response:
    """`POST …/risk` (also served by `fastpath`)."""
    query = await read_query(request, zmem.settings)
    nb, risk = await zmem.risk(name, query)
    meta = {"size": nb.size, "active": nb.active, "sigma": nb.sigma}
    risk32 = risk.astype(np.float32)
    arrays = {"risk": risk32.reshape(()) if query.one_row else risk32}
    return await respond(request, zmem.settings, arrays, meta)


@router.get("/changes")
async def get_changes(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    after: Annotated[int, QueryParam(ge=0, le=2**53, description="the follower's last seq")] = 0,
    generation: Annotated[
        str | None, QueryParam(max_length=64, description="the follower's generation of the memory")
    ] = None,
    limit: Annotated[int, QueryParam(ge=1, le=100_000, description="most rows in the page")] = 10_000,
    wait: Annotated[float, QueryParam(ge=0, le=30, description="seconds to wait for new rows")] = 0,
    auto: Annotated[
        bool,
        QueryParam(description='include the value of sigma "auto" even if the memory\'s sigma is a number'),
    ] = False,
) -> Response:
    """The rows after `after` in seq order (z, risk_target, seq) and what a replica needs to mirror
    the memory exactly; `reset` says to drop the mirrored state first."""
    page = await zmem.changes(name, after, generation, limit, wait, auto)
    arrays = {"z": page.rows.z, "risk_target": page.rows.risk_target, "seq": page.rows.seq}
    return await respond(request, zmem.settings, arrays, page.meta)


@router.get("/stats")
async def get_stats(name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    return await zmem.stats(name)


@router.get("/export")
async def get_export(name: NameDep, zmem: ZMemDep) -> Response:
    path = await zmem.export_npz(name)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}.npz",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


@router.post("/import")
async def post_import(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    return await zmem.import_npz(name, body_chunks(request), int(declared) if declared.isdigit() else None)
