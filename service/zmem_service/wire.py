"""Request and response bodies: JSON everywhere, safetensors on the fast path.

safetensors bodies carry arrays as tensors named like the JSON fields and every
other value in `__metadata__` as a JSON literal (`64`, `"auto"`, `["a", "b"]`).
Decoding ends in the same domain objects whatever the format, so validation has
one shape: a 400 for a body that can't be parsed, a 422 naming the field otherwise.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import safetensors
import safetensors.numpy
from fastapi import Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .episodes import MAX_ID_CHARS, MAX_WORKER_CHARS, EpisodeBatch
from .errors import BadRequest, PayloadTooLarge, ValidationFailed
from .memory import Neighbors
from .ring import FLOAT_FIELDS
from .settings import MAX_K, MAX_SIGMA, MIN_SIGMA

SAFETENSORS = "application/x-safetensors"
# strict: a JSON string or boolean is not a number (ints are).
Finite = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class EpisodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    z: list[Finite]
    soft_bind: Finite
    cone_vol: Finite
    lambda_bind: Finite
    E_T: Finite = 0.0
    lambda_T: Finite = 0.0
    Hr: Finite = 0.0
    id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    worker: str | None = Field(None, max_length=MAX_WORKER_CHARS)


class EpisodesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    episodes: list[EpisodeIn]


class QueryOptions(BaseModel):
    """The options of a neighbours/risk query (body fields or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, le=MAX_K)
    sigma: Annotated[float, Field(ge=MIN_SIGMA, le=MAX_SIGMA, strict=True)] | Literal["auto"] | None = None
    record: bool = False

    @field_validator("sigma", mode="wrap")
    @classmethod
    def _sigma_says_both_forms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # The union reports one error per member, and "(and 1 more)" hid the "auto" one.
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "sigma",
                'must be a positive number or "auto" (numbers in [{lo}, {hi}]), got {value}',
                {"lo": f"{MIN_SIGMA:g}", "hi": f"{MAX_SIGMA:g}", "value": repr(value)},
            ) from None


class QueryIn(QueryOptions):
    z: list[Finite] | list[list[Finite]]


@dataclass
class Query:
    z: np.ndarray  # float32 [B, d]
    one_row: bool  # the request sent a 1-D z: answer without the batch axis
    options: QueryOptions


def pydantic_problem(e: ValidationError, prefix: tuple[str, ...] = ()) -> ValidationFailed:
    errors = [{"loc": [*prefix, *err["loc"]], "msg": err["msg"]} for err in e.errors()[:20]]
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ValidationFailed(f"{where}: {first['msg']}{more}", errors=errors)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over `limit` bytes before or while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def is_safetensors(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == SAFETENSORS


def wants_safetensors(request: Request) -> bool:
    return SAFETENSORS in request.headers.get("accept", "")


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None


def parse_safetensors(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors (F32 only) and the decoded `__metadata__` values."""
    try:
        (n,) = struct.unpack("<Q", body[:8])
        header = json.loads(body[8 : 8 + n])
        tensors = safetensors.numpy.load(body)
    except Exception as e:
        raise BadRequest(f"body is not a valid safetensors file: {e}") from None
    for name, spec in header.items():
        if name != "__metadata__" and spec.get("dtype") != "F32":
            raise ValidationFailed.at([name], f"tensor is {spec.get('dtype')}; only F32 is accepted")
    meta = {}
    for key, text in (header.get("__metadata__") or {}).items():
        try:
            meta[key] = json.loads(text)
        except ValueError:
            raise ValidationFailed.at([key], f"metadata value {text!r} is not a JSON literal") from None
    return tensors, meta


def decode_episodes(body: bytes, content_type: str | None) -> EpisodeBatch:
    if is_safetensors(content_type):
        return _episodes_from_safetensors(*parse_safetensors(body))
    try:
        parsed = EpisodesIn.model_validate(parse_json(body))
    except ValidationError as e:
        raise pydantic_problem(e) from None
    eps = parsed.episodes
    dims = {len(e.z) for e in eps}
    if len(dims) > 1:
        d0 = len(eps[0].z)
        i = next(i for i, e in enumerate(eps) if len(e.z) != d0)
        raise ValidationFailed.at(["episodes", i, "z"], f"z has {len(eps[i].z)} values; episode 0 has {d0}")
    d = dims.pop() if dims else 0
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, which `validate` names
        z = np.array([e.z for e in eps], np.float32).reshape(len(eps), d)
        values = {f: np.array([getattr(e, f) for e in eps], np.float32) for f in FLOAT_FIELDS}
    return EpisodeBatch(
        z=z,
        values=values,
        ids=[e.id for e in eps],
        workers=[e.worker for e in eps],
    )


def _episodes_from_safetensors(t: dict[str, np.ndarray], meta: dict[str, Any]) -> EpisodeBatch:
    if "z" not in t or t["z"].ndim != 2:
        raise ValidationFailed.at(["z"], "a F32 tensor z of shape [B, d] is required")
    b = t["z"].shape[0]
    values = {}
    for f in FLOAT_FIELDS:
        col = t.get(f)
        required = f in ("soft_bind", "cone_vol", "lambda_bind")
        if col is None and required:
            raise ValidationFailed.at([f], f"a F32 tensor {f} of shape [{b}] is required")
        if col is not None and col.shape != (b,):
            raise ValidationFailed.at([f], f"shape {list(col.shape)}; expected [{b}]")
        values[f] = np.zeros(b, np.float32) if col is None else col
    lists = {}
    for key in ("id", "worker"):
        value = meta.get(key)
        if value is None:
            value = [None] * b
        if (
            not isinstance(value, list)
            or len(value) != b
            or not all(v is None or isinstance(v, str) for v in value)
        ):
            raise ValidationFailed.at([key], f"metadata {key} must be a list of {b} strings or nulls")
        lists[key] = value
    return EpisodeBatch(z=t["z"], values=values, ids=lists["id"], workers=lists["worker"])


def decode_query(body: bytes, content_type: str | None, params: dict[str, str]) -> Query:
    """A query from the body, with k/sigma/record from query parameters when the body lacks them."""
    if is_safetensors(content_type):
        tensors, fields = parse_safetensors(body)
        if "z" not in tensors:
            raise ValidationFailed.at(["z"], "a F32 tensor z is required")
        z = tensors["z"]
    else:
        fields = parse_json(body)
        if not isinstance(fields, dict):
            raise ValidationFailed.at(["body"], "must be a JSON object")
        z = None
    merged = {k: json_param(v) for k, v in params.items() if k in ("k", "sigma", "record")}
    merged.update({k: v for k, v in fields.items() if k != "z" or z is None})
    try:
        if z is None:
            parsed = QueryIn.model_validate(merged)
            rows: list[Any] = parsed.z
            if rows and isinstance(rows[0], list) and len({len(r) for r in rows}) > 1:
                i = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]))
                raise ValidationFailed.at(["z", i], "rows of z must all have the same length")
            with np.errstate(over="ignore"):  # beyond float32 becomes inf: named below
                z = np.array(rows, np.float32) if rows else np.zeros((0,), np.float32)
            options: QueryOptions = parsed
        else:
            options = QueryOptions.model_validate(merged)
    except ValidationError as e:
        raise pydantic_problem(e) from None
    one_row = z.ndim == 1
    if one_row:
        z = z[None, :]
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValidationFailed.at(["z"], "z must be [d] or [B, d] with d >= 1 (rows of equal length)")
    if not np.isfinite(z).all():
        raise ValidationFailed.at(
            ["z", int(np.flatnonzero(~np.isfinite(z).all(1))[0])],
            "must be finite float32 (no NaN, inf or |x| > 3.4e38)",
        )
    return Query(np.ascontiguousarray(z, np.float32), one_row, options)


def json_param(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value  # e.g. sigma=auto; the model says whether it is valid


def encode(request: Request, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Response:
    """A response as safetensors when the client accepts it, JSON otherwise."""
    if wants_safetensors(request):
        body = safetensors.numpy.save(
            {k: v if v.flags.c_contiguous else v.copy() for k, v in arrays.items()},
            metadata={k: json.dumps(v) for k, v in meta.items()},
        )
        return Response(body, media_type=SAFETENSORS)
    payload = {**meta, **{k: v.tolist() for k, v in arrays.items()}}
    return Response(json.dumps(payload), media_type="application/json")


def neighbors_arrays(nb: Neighbors, one_row: bool) -> dict[str, np.ndarray]:
    arrays = {"z": nb.z, "risk_target": nb.risk_target, "d2": nb.d2, "seq": nb.seq}
    return {k: v[0] for k, v in arrays.items()} if one_row else arrays
