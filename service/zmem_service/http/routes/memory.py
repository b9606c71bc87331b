"""Routes of one memory; mounted at the root (memory `default`) and under `/memories/{name}`.

`neighbors` and `risk` carry nearly all the traffic (a training step calls `risk()`
once): their declarations name the handler the hot path (`fastpath.py`) calls without
FastAPI's routing, the same one the FastAPI routes call.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi import Query as QueryParam  # a query-string parameter, not a kNN query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from zmem_core.wire import SAFETENSORS

from ...feed import Changes
from ...memory import Neighbors
from ...service import ZMem
from ..edge import JSON, NPZ, QUERY_BODIES, Call, declare
from ..exchange import answer_bytes, answer_ticket, body_chunks, read_episodes, read_query, respond
from ..schemas import EpisodesIn, QueryIn
from ..streaming import Answer
from .deps import NameDep, ZMemDep

router = APIRouter()


async def neighbors_answer(call: Call, name: str, zmem: ZMem) -> Response:
    """`POST …/neighbors`: the answer's slot is taken before the search, so a computed answer
    is never dropped for want of one."""
    query = await read_query(call, zmem.settings)
    floats, k = zmem.answer_floats(name, query)
    ticket = await answer_ticket(call, answer_bytes(floats, query.z.shape[0], k))
    try:
        nb = await zmem.neighbors(name, query)
    except BaseException:
        if ticket is not None:
            ticket.release()
        raise
    meta = {"size": nb.size, "active": nb.active, "k": nb.k, "sigma": nb.sigma}
    return await respond(call, zmem.settings, _neighbors_arrays(nb, query.one_row), meta, ticket)


async def risk_answer(call: Call, name: str, zmem: ZMem) -> Response:
    """`POST …/risk`: B floats, never a large answer."""
    query = await read_query(call, zmem.settings)
    nb, risk = await zmem.risk(name, query)
    meta = {"size": nb.size, "active": nb.active, "sigma": nb.sigma}
    risk32 = risk.astype(np.float32)
    arrays = {"risk": risk32.reshape(()) if query.one_row else risk32}
    return await respond(call, zmem.settings, arrays, meta)


def _neighbors_arrays(nb: Neighbors, one_row: bool) -> dict[str, np.ndarray]:
    arrays = {"z": nb.z, "risk_target": nb.risk_target, "d2": nb.d2, "seq": nb.seq}
    return {k: v[0] for k, v in arrays.items()} if one_row else arrays


@router.post("/episodes")
@declare("write", (JSON, SAFETENSORS), schema=EpisodesIn)
async def post_episodes(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    batch = await read_episodes(Call.of(request), zmem.settings)
    return await zmem.write(name, batch)


@router.post("/neighbors")
@declare("read", QUERY_BODIES, schema=QueryIn, fast=neighbors_answer)
async def post_neighbors(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    return await neighbors_answer(Call.of(request), name, zmem)


@router.post("/risk")
@declare("read", QUERY_BODIES, schema=QueryIn, fast=risk_answer)
async def post_risk(request: Request, name: NameDep, zmem: ZMemDep) -> Response:
    return await risk_answer(Call.of(request), name, zmem)


@router.get("/changes")
@declare("read")
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
    the memory exactly; `reset` says to drop the mirrored state first.

    Cacheable (`ETag`, `Cache-Control`: `Changes.immutable` pages for a year, others a
    second); `If-None-Match` naming the page's validator gets 304. Every follower at one
    position gets the same page, encoded once per format."""
    call = Call.of(request)
    page = await zmem.changes(name, after, generation, limit, wait, auto)
    form = SAFETENSORS if call.head.wants(SAFETENSORS) else JSON
    etag = page.etag(after, limit, form)
    headers = {
        "etag": etag,
        "cache-control": IMMUTABLE if page.immutable(generation) else TAIL,
        "vary": "Accept, Authorization",
    }
    if _matches(call.head.header(b"if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return await _encoded(call, zmem, page, form, headers)


IMMUTABLE = "public, max-age=31536000, immutable"
TAIL = "public, max-age=1"


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether an `If-None-Match` value names `etag` (weak comparison, RFC 9110 §13.1.2)."""
    if not if_none_match:
        return False
    ours = etag.removeprefix("W/")
    return any(t.strip() == "*" or t.strip().removeprefix("W/") == ours for t in if_none_match.split(","))


async def _encoded(call: Call, zmem: ZMem, page: Changes, form: str, headers: dict[str, str]) -> Response:
    """The page's answer in `form`, encoded once for every poller it is served to (a large
    answer, sent in chunks under an answer slot, is encoded per request)."""
    kept = page.encoded.get(form)
    if isinstance(kept, asyncio.Future):
        kept = await asyncio.shield(kept)
    if kept is not None:
        return Answer(kept[0], kept[1], headers=headers)
    encoding: asyncio.Future[tuple[bytes, str] | None] = asyncio.get_running_loop().create_future()
    page.encoded[form] = encoding
    arrays = {"z": page.rows.z, "risk_target": page.rows.risk_target, "seq": page.rows.seq}
    try:
        answer = await respond(call, zmem.settings, arrays, page.meta)
    except BaseException:
        del page.encoded[form]
        encoding.set_result(None)  # the others encode (and fail) themselves
        raise
    if isinstance(answer, Answer):
        page.encoded[form] = (answer.body, answer.media_type)
        encoding.set_result(page.encoded[form])
        answer.raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        return answer
    del page.encoded[form]
    encoding.set_result(None)
    answer.raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
    return answer


@router.get("/stats")
@declare("read")
async def get_stats(name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    return await zmem.stats(name)


@router.get("/export")
@declare("read")
async def get_export(name: NameDep, zmem: ZMemDep) -> Response:
    path = await zmem.export_npz(name)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}.npz",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


@router.post("/import")
@declare("write", NPZ, untyped=True)
async def post_import(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    call = Call.of(request)
    return await zmem.import_npz(name, body_chunks(call), call.head.content_length)
