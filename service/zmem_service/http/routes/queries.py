"""`POST …/queries`: kernel numbers of queries a client computed itself, for the diagnostics.

A client that computes risk locally (a replica, a trainer using `neighbors`) posts, per
query row, its kernel risk, the unnormalised weight sum Σw and the effective number of
neighbours 1/Σw_norm², as JSON lists or safetensors tensors (F32 or F64) of those names,
and optionally the worker that asked them (`worker`, a field or a metadata key).
The memory keeps them in its recorded-query log (`querylog.QueryLog`). A read token
suffices, as for `neighbors` and `risk`. Mounted at the root and under `/memories/{name}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..edge import QUERY_BODIES, Call, declare
from ..exchange import read_queries
from ..schemas import QueriesIn
from .deps import NameDep, ZMemDep

router = APIRouter()


@router.post("/queries")
@declare("read", QUERY_BODIES, schema=QueriesIn)
async def post_queries(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    """Record query rows: body `{"risk": [...], "wsum": [...], "n_eff": [...]}` (or the same
    tensors in safetensors), all finite and within float32's range, one length ≤ max_batch,
    wsum ≥ 0, n_eff ≥ 0 (a body too long for max_batch rows is a 413 before it is parsed).
    Answers `{"recorded": n, "recorded_queries": total kept}`; unknown memory → 404."""
    zmem.memory(name)  # an unknown memory is a 404 before the body is read
    columns, worker = await read_queries(Call.of(request), zmem.settings)
    kept = await zmem.record_queries(name, columns, worker)
    return {"recorded": int(columns["risk"].size), "recorded_queries": kept}
