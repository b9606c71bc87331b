"""Routes of one memory; mounted at the root (memory `default`) and under `/memories/{name}`."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from ..memory import Neighbors
from ..service import ZMem
from ..wire import Query, neighbors_arrays, read_body, read_episodes, read_query, respond
from .deps import NameDep, ZMemDep

router = APIRouter()


@router.post("/episodes")
async def post_episodes(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    batch = await read_episodes(request, zmem.settings)
    reply = await zmem.write(name, batch)
    metrics = request.app.state.metrics
    metrics.episodes.labels(name).inc(reply["accepted"])
    metrics.duplicates.labels(name).inc(reply["duplicates"])
    return reply


async def _query(request: Request, name: str, zmem: ZMem) -> tuple[Query, Neighbors]:
    query = await read_query(request, zmem.settings)
    return query, await zmem.search(name, query)


@router.post("/neighbors")
async def post_neighbors(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    query, nb = await _query(request, name, zmem)
    meta = {"size": nb.size, "active": nb.active, "k": nb.k, "sigma": nb.sigma}
    return await respond(request, zmem.settings, neighbors_arrays(nb, query.one_row), meta)


@router.post("/risk")
async def post_risk(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    query, nb = await _query(request, name, zmem)
    risk = nb.kernel_risk().astype(np.float32)
    meta = {"size": nb.size, "active": nb.active, "sigma": nb.sigma}
    return await respond(request, zmem.settings, {"risk": risk.reshape(()) if query.one_row else risk}, meta)


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
