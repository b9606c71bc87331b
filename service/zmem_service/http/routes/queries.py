"""`POST …/queries`: kernel numbers of queries a client computed itself, for the diagnostics.

A client that computes risk locally (a replica, a trainer using `neighbors`) posts, per
query row, its kernel risk, the unnormalised weight sum Σw and the effective number of
neighbours 1/Σw_norm², as JSON lists or safetensors tensors (F32 or F64) of those names.
The memory keeps them in its recorded-query log (`querylog.QueryLog`). A read token
suffices, as for `neighbors` and `risk`. Mounted at the root and under `/memories/{name}`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel

from ...errors import ValidationFailed
from ...memory import Memory
from ..wire import decode_body, is_safetensors, parse_json, parse_safetensors
from .deps import NameDep, ZMemDep

router = APIRouter()
FIELDS = ("risk", "wsum", "n_eff")
BYTES_PER_JSON_NUMBER = 48
"""Room for one JSON number, its separator and some indentation (a float64 in full takes ~25)."""
FLOAT32_MAX = float(np.finfo(np.float32).max)


class QueriesIn(BaseModel):
    """The JSON body of `POST …/queries` (the schema; `decode_queries` does the checking)."""

    risk: list[float]
    wsum: list[float]
    n_eff: list[float]


@router.post("/queries")
async def post_queries(request: Request, name: NameDep, zmem: ZMemDep) -> dict[str, Any]:
    """Record query rows: body `{"risk": [...], "wsum": [...], "n_eff": [...]}` (or the same
    tensors in safetensors), all finite and within float32's range, one length ≤ max_batch,
    wsum ≥ 0, n_eff ≥ 0 (a body too long for max_batch rows is a 413 before it is parsed).
    Answers `{"recorded": n, "recorded_queries": total kept}`; unknown memory → 404."""
    memory = zmem.memory(name)
    rows, kind = zmem.settings.max_batch, request.headers.get("content-type")
    # No body of `rows` rows is longer than this: refused (413) before anything is parsed.
    limit = len(FIELDS) * rows * (8 if is_safetensors(kind) else BYTES_PER_JSON_NUMBER) + 4096
    columns = await decode_body(request, zmem.settings, lambda body: decode_queries(body, kind, rows), limit)
    kept = await asyncio.to_thread(_record, memory, columns)
    return {"recorded": int(columns["risk"].size), "recorded_queries": kept}


def _record(memory: Memory, columns: dict[str, np.ndarray]) -> int:
    memory.record_queries(columns["risk"], columns["wsum"], columns["n_eff"])
    return len(memory.queries)


def decode_queries(body: bytes, content_type: str | None, max_rows: int) -> dict[str, np.ndarray]:
    """float64 columns `risk`, `wsum`, `n_eff` [n] from a JSON or safetensors body.

    Raises:
        BadRequest: the body can't be parsed.
        ValidationFailed: a column is missing, not a flat list/vector of finite numbers, the
            lengths differ or exceed `max_rows`, or wsum / n_eff is negative (names the field).
    """
    if is_safetensors(content_type):
        raw = _safetensors_columns(body)
    else:
        parsed = parse_json(body)
        if not isinstance(parsed, dict):
            raise ValidationFailed.at(["body"], "must be a JSON object with lists risk, wsum, n_eff")
        extra = sorted(set(parsed) - set(FIELDS))
        if extra:
            raise ValidationFailed.at([extra[0]], "unknown field; expected risk, wsum and n_eff")
        raw = {}
        for f in FIELDS:
            value = parsed.get(f)
            if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise ValidationFailed.at([f], "a list of numbers is required")
            try:
                raw[f] = np.array(value, dtype=np.float64).reshape(-1)
            except OverflowError:
                raise ValidationFailed.at([f], f"values must be at most {FLOAT32_MAX:.3g} in size") from None
    n = raw["risk"].size
    for f in FIELDS:
        col = raw[f]
        if col.size != n:
            raise ValidationFailed.at([f], f"{col.size} values; risk has {n}")
        if not np.isfinite(col).all():
            i = int(np.flatnonzero(~np.isfinite(col))[0])
            raise ValidationFailed.at([f, i], "must be finite (no NaN or inf)")
        if (np.abs(col) > FLOAT32_MAX).any():  # the service's own records are float32-sized
            i = int(np.flatnonzero(np.abs(col) > FLOAT32_MAX)[0])
            raise ValidationFailed.at([f, i], f"must be at most {FLOAT32_MAX:.3g} in size, got {col[i]:.3g}")
        if f != "risk" and (col < 0).any():
            i = int(np.flatnonzero(col < 0)[0])
            raise ValidationFailed.at([f, i], f"must be ≥ 0, got {col[i]}")
    if n > max_rows:
        raise ValidationFailed.at(["risk"], f"{n} query rows; the limit is {max_rows}")
    return raw


def _safetensors_columns(body: bytes) -> dict[str, np.ndarray]:
    tensors, _ = parse_safetensors(body, dtypes=("F32", "F64"))
    out = {}
    for f in FIELDS:
        if f not in tensors:
            raise ValidationFailed.at([f], "a F32 or F64 tensor is required")
        if tensors[f].ndim != 1:
            raise ValidationFailed.at([f], f"shape {list(tensors[f].shape)}; expected [n]")
        out[f] = tensors[f].astype(np.float64)
    extra = sorted(set(tensors) - set(FIELDS))
    if extra:
        raise ValidationFailed.at([extra[0]], "unknown tensor; expected risk, wsum and n_eff")
    return out
