"""Routes of one memory; mounted at the root (memory `default`) and under `/memories/{name}`."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from ..service import ZMem
from ..wire import Query as WireQuery
from ..wire import decode_episodes, decode_query, encode, neighbors_arrays, read_body
from .deps import NameDep, ZMemDep

router = APIRouter()


@router.post("/episodes")
async def post_episodes(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    body = await read_body(request, zmem.settings.max_body_bytes)
    batch = decode_episodes(body, request.headers.get("content-type"))
    return await zmem.write(name, batch)


async def _query(request: Request, zmem: ZMem) -> WireQuery:
    body = await read_body(request, zmem.settings.max_body_bytes)
    return decode_query(body, request.headers.get("content-type"), dict(request.query_params))


@router.post("/neighbors")
async def post_neighbors(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    query = await _query(request, zmem)
    nb = await zmem.neighbors(name, query)
    meta = {"size": nb.size, "active": nb.active, "k": nb.k, "sigma": nb.sigma}
    return encode(request, neighbors_arrays(nb, query.one_row), meta)


@router.post("/risk")
async def post_risk(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    query = await _query(request, zmem)
    nb, risk = await zmem.risk(name, query)
    meta = {"size": nb.size, "active": nb.active, "sigma": nb.sigma}
    risk32 = risk.astype(np.float32)
    return encode(request, {"risk": risk32.reshape(()) if query.one_row else risk32}, meta)


@router.get("/changes")
async def get_changes(
    request: Request,
    name: NameDep,
    zmem: ZMemDep,
    after: Annotated[int, Query(ge=0, le=2**53, description="the follower's last seq")] = 0,
    generation: Annotated[
        str | None, Query(max_length=64, description="the follower's generation of the memory")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100_000, description="most rows in the page")] = 10_000,
    wait: Annotated[float, Query(ge=0, le=30, description="seconds to wait for new rows")] = 0,
) -> Response:
    """The rows after `after` in seq order (z, risk_target, seq) and what a replica needs to mirror
    the memory exactly; `reset` says to drop the mirrored state first."""
    page = await zmem.changes(name, after, generation, limit, wait)
    arrays = {"z": page.rows.z, "risk_target": page.rows.risk_target, "seq": page.rows.seq}
    return encode(request, arrays, page.meta)


@router.get("/stats")
async def get_stats(name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    return await zmem.stats(name)


@router.get("/export")
async def get_export(name: NameDep, zmem: ZMemDep) -> Response:
    body = await zmem.export_npz(name)
    return Response(
        body,
        media_type="application/octet-stream",
        headers={"content-disposition": f'attachment; filename="{name}.npz"'},
    )


@router.post("/import")
async def post_import(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    body = await read_body(request, zmem.settings.max_body_bytes)
    return await zmem.import_npz(name, body)
