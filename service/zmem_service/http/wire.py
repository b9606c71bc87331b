"""Request and response bodies: JSON everywhere, safetensors on the fast path.

safetensors bodies are the format both sides share (`zmem_core.wire`: arrays as
tensors named like the JSON fields, every other value in `__metadata__` as a JSON
literal); this module adds the HTTP around it (content types, size limits, pools).
Decoding ends in the same domain objects whatever the format, so validation has one
shape: a 400 for a body that can't be parsed, a 422 naming the field otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect

from zmem_core import wire as core_wire
from zmem_core.limits import MAX_ID_CHARS, MAX_K, MAX_SIGMA, MAX_WORKER_CHARS, MIN_SIGMA, rows_too_large
from zmem_core.wire import SAFETENSORS

from ..episodes import Z_TOO_LARGE, EpisodeBatch
from ..errors import (
    BadRequest,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
    ZMemError,
)
from ..memory import Neighbors
from ..ring import FLOAT_FIELDS
from ..settings import NoBool, ServiceSettings
from . import jsonchunks

JSON = "application/json"
NPZ_TYPES = ("application/octet-stream", "application/x-npz", "application/zip")
T = TypeVar("T")
log = logging.getLogger("zmem")
# Bodies and answers up to these sizes are decoded/encoded on the event loop: below them
# a hop to a pool thread (~60 µs) costs more than the work (benchmarks/bench_hostile.py).
INLINE_JSON_BYTES = 2048
INLINE_SAFETENSORS_BYTES = 256 * 1024
LARGE_ANSWER_BYTES = 1 << 20
"""Answers above this hold one of the answer slots until they are sent (`respond`)."""
INLINE_JSON_FLOATS = 256
# Floats validated per pydantic call on large JSON bodies (each call holds the GIL).
FLOATS_PER_STEP = 16384
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

    k: Annotated[int | None, NoBool] = Field(None, ge=1, le=MAX_K)
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


_EPISODE_LIST = TypeAdapter(list[EpisodeIn])
_ROWS = TypeAdapter(list[list[Finite]])
_ROW = TypeAdapter(list[Finite])


@dataclass
class QueryRequest:
    """A neighbours/risk request as decoded from the wire (before it meets a memory)."""

    z: np.ndarray  # float32 [B, d]
    one_row: bool  # the request sent a 1-D z: answer without the batch axis
    options: QueryOptions


def _shift(loc: tuple[str | int, ...], offset: int) -> list[str | int]:
    """`loc` with its leading list index moved by `offset` (errors of a slab of a list)."""
    if loc and isinstance(loc[0], int):
        return [loc[0] + offset, *loc[1:]]
    return list(loc)


def pydantic_problem(
    e: ValidationError, prefix: tuple[str | int, ...] = (), offset: int = 0
) -> ValidationFailed:
    """A 422 naming the fields (pydantic's `input` is never echoed; ZMemError caps the rest)."""
    errors = [
        {"loc": [*prefix, *_shift(err["loc"], offset)], "msg": err["msg"]}
        for err in e.errors(include_url=False, include_input=False, include_context=False)[:20]
    ]
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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before the body was complete") from None
    return b"".join(chunks)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives (for bodies streamed to disk); a client that goes away is a 400."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before the body was complete") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def check_body_type(request: Request) -> None:
    """FastAPI dependency on every route: a POST/PUT body must be JSON or safetensors (an import:
    an npz, typed so or untyped), else 415. Types a browser may send cross-site without a
    preflight (text/plain, forms) are never parsed."""
    if request.method not in ("POST", "PUT"):
        return
    given = media_type(request)
    if given in (JSON, SAFETENSORS) or given.endswith("+json"):
        return
    if request.url.path.endswith("/import") and (given in NPZ_TYPES or not given):
        return
    if not given and request.headers.get("content-length", "0") == "0":
        return  # no body at all
    wanted = (
        "an npz (application/octet-stream)"
        if request.url.path.endswith("/import")
        else (f"{JSON} or {SAFETENSORS}")
    )
    raise UnsupportedMediaType(f"content-type {given or '(none)'!r} is not accepted here; send {wanted}")


def is_safetensors(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == SAFETENSORS


def wants_safetensors(request: Request) -> bool:
    return SAFETENSORS in request.headers.get("accept", "")


def parse_json(body: bytes) -> Any:
    try:
        # UTF-8 only, whatever the size (json.loads would also take UTF-16/32 and a BOM).
        text = body.decode("utf-8")
        if len(body) <= jsonchunks.WINDOW:
            return json.loads(text)
        return jsonchunks.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None


def parse_safetensors(
    body: bytes, dtypes: tuple[str, ...] = ("F32",)
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors (of `dtypes` only: F32 unless said) and the decoded `__metadata__` values
    (`zmem_core.wire.decode`): a 400 for a body that is not safetensors, else a 422 naming
    the tensor or metadata key."""
    try:
        return core_wire.decode(body, dtypes)
    except core_wire.NotSafetensors as e:
        raise BadRequest(f"body is not a valid safetensors file: {e}") from None
    except core_wire.WrongDtype as e:
        allowed = " or ".join(dtypes)
        raise ValidationFailed.at([e.name], f"tensor is {e.dtype}; only {allowed} is accepted") from None
    except core_wire.BadMetadata as e:
        raise ValidationFailed.at([e.key], e.reason) from None


def decode_episodes(body: bytes, content_type: str | None, max_batch: int | None = None) -> EpisodeBatch:
    """Episodes from either format (400 unparseable, 422 invalid). JSON is validated a slab of
    episodes at a time, so a large body never holds the GIL for long."""
    if is_safetensors(content_type):
        return _episodes_from_safetensors(*parse_safetensors(body))
    doc = parse_json(body)
    items = doc.get("episodes") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(doc) != 1:
        try:  # the wrong shape: let the model name it, without validating a list of episodes
            EpisodesIn.model_validate({**doc, "episodes": []} if isinstance(items, list) else doc)
        except ValidationError as e:
            raise pydantic_problem(e) from None
    assert isinstance(items, list)
    if max_batch is not None and len(items) > max_batch:
        msg = f"{len(items)} episodes in one request; the limit is {max_batch}"
        raise ValidationFailed.at(["episodes"], msg)
    first = items[0] if items else None
    d = len(first["z"]) if isinstance(first, dict) and isinstance(first.get("z"), list) else 0
    step = max(1, FLOATS_PER_STEP // max(d, 1))
    eps: list[EpisodeIn] = []
    z_parts = []
    for start in range(0, len(items), step):
        try:
            chunk = _EPISODE_LIST.validate_python(items[start : start + step])
        except ValidationError as e:
            raise pydantic_problem(e, ("episodes",), offset=start) from None
        for i, episode in enumerate(chunk):
            if len(episode.z) != d:
                msg = f"z has {len(episode.z)} values; episode 0 has {d}"
                raise ValidationFailed.at(["episodes", start + i, "z"], msg)
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, which `validate` names
            z_parts.append(np.array([e.z for e in chunk], np.float32).reshape(len(chunk), d))
        eps.extend(chunk)
    z = np.concatenate(z_parts) if z_parts else np.zeros((0, 0), np.float32)
    with np.errstate(over="ignore"):
        values = {f: np.array([getattr(e, f) for e in eps], np.float32) for f in FLOAT_FIELDS}
    return EpisodeBatch(
        z=z,
        values=values,
        ids=[e.id for e in eps],
        workers=[e.worker for e in eps],
    )


def _unknown(names: Any, known: Any, what: str) -> None:
    """422 naming the first of `names` not in `known`: a misspelt field must not pass unseen."""
    extra = sorted(set(names) - set(known))
    if extra:
        raise ValidationFailed.at([extra[0]], f"unknown {what}; expected some of {', '.join(sorted(known))}")


def _episodes_from_safetensors(t: dict[str, np.ndarray], meta: dict[str, Any]) -> EpisodeBatch:
    if "z" not in t or t["z"].ndim != 2:
        raise ValidationFailed.at(["z"], "a F32 tensor z of shape [B, d] is required")
    _unknown(t, ("z", *FLOAT_FIELDS), "tensor")
    _unknown(meta, ("id", "worker"), "metadata key")
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


def decode_query(body: bytes, content_type: str | None, params: dict[str, str]) -> QueryRequest:
    """A query from the body, with k/sigma/record from query parameters when the body lacks them."""
    if is_safetensors(content_type):
        tensors, fields = parse_safetensors(body)
        if "z" not in tensors:
            raise ValidationFailed.at(["z"], "a F32 tensor z is required")
        _unknown(tensors, ("z",), "tensor")
        z = tensors["z"]
    else:
        fields = parse_json(body)
        if not isinstance(fields, dict):
            raise ValidationFailed.at(["body"], "must be a JSON object")
        if "z" not in fields:
            raise ValidationFailed.at(["z"], "Field required")
        z = None
    merged = {k: json_param(v) for k, v in params.items() if k in ("k", "sigma", "record")}
    merged.update({k: v for k, v in fields.items() if k != "z"})
    try:
        options = QueryOptions.model_validate(merged)
    except ValidationError as e:
        raise pydantic_problem(e) from None
    if z is None:
        z = _json_z(fields["z"])
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
    too_large = rows_too_large(z)
    if len(too_large):
        raise ValidationFailed.at(["z", int(too_large[0])], Z_TOO_LARGE)
    return QueryRequest(np.ascontiguousarray(z, np.float32), one_row, options)


def _json_z(raw: Any) -> np.ndarray:
    """A JSON z (a list of numbers, or of rows of numbers) as float32 [d] or [B, d], validated in slabs."""
    if not isinstance(raw, list):
        raise ValidationFailed.at(["z"], "must be a list of numbers or a list of rows of numbers")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf: named by the caller
        if not raw or not isinstance(raw[0], list):
            parts = []
            for start in range(0, len(raw), FLOATS_PER_STEP):
                try:
                    row = _ROW.validate_python(raw[start : start + FLOATS_PER_STEP])
                except ValidationError as e:
                    raise pydantic_problem(e, ("z",), offset=start) from None
                parts.append(np.array(row, np.float32))
            return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
        d = len(raw[0])
        step = max(1, FLOATS_PER_STEP // max(d, 1))
        blocks = []
        for start in range(0, len(raw), step):
            try:
                rows = _ROWS.validate_python(raw[start : start + step])
            except ValidationError as e:
                raise pydantic_problem(e, ("z",), offset=start) from None
            for i, r in enumerate(rows):
                if len(r) != d:
                    raise ValidationFailed.at(["z", start + i], "rows of z must all have the same length")
            blocks.append(np.array(rows, np.float32).reshape(len(rows), d))
        return np.concatenate(blocks)


def json_param(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value  # e.g. sigma=auto; the model says whether it is valid


def safetensors_size(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
    """Bytes of the safetensors answer, within a few per tensor (the header's offsets)."""
    header = len(json.dumps({k: json.dumps(v) for k, v in meta.items()})) + 96 * len(arrays)
    return 8 + header + sum(a.nbytes for a in arrays.values())


# -- off the event loop -------------------------------------------------------------------


class Pool:
    """A thread pool of its own for one kind of work, bounded: `workers` threads and at most
    `slots` jobs admitted at once (running, queued or reading their body); past that a 503."""

    def __init__(self, name: str, workers: int, slots: int) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"zmem-{name}")
        self._free = slots

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        if self._free <= 0:
            raise Unavailable(f"too many large requests are {self.name}; retry shortly")
        self._free -= 1
        try:
            yield
        finally:
            self._free += 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread (call inside `admitted()`)."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class Codecs:
    """The service's pools for bodies (decode: reads; decode_writes: episodes) and answers
    (encode); on `app.state.codecs`. Writes decode in a pool of their own, so requests that
    a read token may send can't take every slot and hold the workers' episodes off."""

    decode: Pool
    decode_writes: Pool
    encode: Pool
    answers: AnswerSlots

    @classmethod
    def create(cls) -> Codecs:
        # 2 threads each: JSON work holds the GIL, so more threads would only queue on it.
        # 8 slots per decode pool bound the large bodies held in memory at once
        # (16 × max_body_bytes in all).
        return cls(
            decode=Pool("being decoded", 2, 8),
            decode_writes=Pool("being written", 2, 8),
            encode=Pool("being encoded", 2, 8),
            answers=AnswerSlots(8),  # 8 × max_response_bytes of large answers at most
        )

    def close(self) -> None:
        self.decode.close()
        self.decode_writes.close()
        self.encode.close()


def _inline_body(request: Request) -> int:
    return INLINE_SAFETENSORS_BYTES if is_safetensors(media_type(request)) else INLINE_JSON_BYTES


async def decode_body(
    request: Request,
    settings: ServiceSettings,
    decode: Callable[[bytes], T],
    limit: int | None = None,
    *,
    write: bool = False,
) -> T:
    """Read the body (at most `limit` bytes, default max_body_bytes) and decode it: on the loop
    when small, else admitted to a decode pool (the writes' own for `write`) before the body
    is read, so large bodies in memory stay bounded."""
    limit = settings.max_body_bytes if limit is None else min(limit, settings.max_body_bytes)
    inline = _inline_body(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= inline:
        return decode(await read_body(request, limit))
    codecs: Codecs = request.app.state.codecs
    pool = codecs.decode_writes if write else codecs.decode
    async with pool.admitted():
        body = await read_body(request, limit)
        return decode(body) if len(body) <= inline else await pool.run(decode, body)


async def read_episodes(request: Request, settings: ServiceSettings) -> EpisodeBatch:
    """The request's episodes, decoded (400/413/415/422 as the module says)."""
    decode = partial(decode_episodes, content_type=media_type(request), max_batch=settings.max_batch)
    return await decode_body(request, settings, decode, write=True)


async def read_query(request: Request, settings: ServiceSettings) -> QueryRequest:
    """The request's neighbours/risk query, k/sigma/record from the query string when the body lacks them."""
    params, kind = dict(request.query_params), media_type(request)
    return await decode_body(request, settings, lambda body: decode_query(body, kind, params))


async def respond(
    request: Request, settings: ServiceSettings, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> Response:
    """An answer as safetensors when the client accepts it, JSON otherwise; at most
    `max_response_bytes` (else 422 on `k`, saying when safetensors would fit).

    A large answer (over LARGE_ANSWER_BYTES) takes one of the service's answer slots from
    before it is encoded until its last byte is handed over (503 when none is free), and
    goes out in chunks under the connection's flow control, dropped once its client has
    read nothing for `body_timeout` s: answers nobody reads can't pile up in memory."""
    st_size = safetensors_size(arrays, meta)
    if st_size <= LARGE_ANSWER_BYTES:
        body, media_type = await _encode(request, settings, arrays, meta, st_size)
        return Response(body, media_type=media_type)
    slots: AnswerSlots = request.app.state.codecs.answers
    slots.take()
    try:
        body, media_type = await _encode(request, settings, arrays, meta, st_size)
    except BaseException:
        slots.give()
        raise
    return SentInChunks(body, media_type, done=slots.give, stall=settings.body_timeout)


async def _encode(
    request: Request,
    settings: ServiceSettings,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    st_size: int,
) -> tuple[bytes, str]:
    """(body, media type) of an answer whose safetensors form takes `st_size` bytes."""
    limit = settings.max_response_bytes
    pool: Pool = request.app.state.codecs.encode
    if wants_safetensors(request):
        if st_size > limit:
            raise ValidationFailed.at(["k"], f"the answer would be {st_size} bytes; {_over(limit)}")
        if st_size <= INLINE_SAFETENSORS_BYTES:
            return core_wire.encode(arrays, meta), SAFETENSORS
        async with pool.admitted():
            return await pool.run(core_wire.encode, arrays, meta), SAFETENSORS
    try:
        if sum(a.size for a in arrays.values()) <= INLINE_JSON_FLOATS:
            body = jsonchunks.encode_arrays(meta, arrays, limit)
        else:
            async with pool.admitted():
                body = await pool.run(jsonchunks.encode_arrays, meta, arrays, limit)
    except jsonchunks.TooLarge:
        hint = (
            f"the safetensors answer ({st_size} bytes) fits: send Accept: {SAFETENSORS}"
            if st_size <= limit
            else "ask for fewer rows or a smaller k"
        )
        raise ValidationFailed.at(["k"], f"the JSON answer would exceed {limit} bytes; {hint}") from None
    except ValueError:  # NaN or infinity: admissible inputs never produce one
        raise ZMemError("the answer holds a non-finite number; see the server log") from None
    return body, JSON


class AnswerSlots:
    """At most `slots` large answers held at once (being encoded or sent); on the event loop."""

    def __init__(self, slots: int) -> None:
        self._free = slots

    def take(self) -> None:
        if self._free <= 0:
            raise Unavailable("too many large answers are being sent; retry shortly")
        self._free -= 1

    def give(self) -> None:
        self._free += 1


class SentInChunks(Response):
    """A whole answer sent a chunk at a time: each chunk waits for the connection to drain
    (uvicorn's flow control), and a client that reads nothing for `stall` seconds loses the
    answer and its connection. `done` runs once, when the answer is handed over or dropped."""

    CHUNK = 256 * 1024

    def __init__(self, body: bytes, media_type: str, *, done: Callable[[], None], stall: float) -> None:
        super().__init__(body, media_type=media_type)
        self._done: Callable[[], None] | None = done
        self._stall = stall

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            view = memoryview(self.body)
            for start in range(0, len(view), self.CHUNK):
                chunk = {
                    "type": "http.response.body",
                    "body": bytes(view[start : start + self.CHUNK]),
                    "more_body": start + self.CHUNK < len(view),
                }
                await asyncio.wait_for(send(chunk), self._stall)
        except TimeoutError:
            log.info("dropped an answer whose client read nothing for %g s", self._stall)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._done is not None:
            done, self._done = self._done, None
            done()

    def __del__(self) -> None:  # never sent (the request ended first): the slot comes back
        self._finish()


def _over(limit: int) -> str:
    return f"the limit is {limit} (max_response_bytes): ask for fewer rows or a smaller k"


def neighbors_arrays(nb: Neighbors, one_row: bool) -> dict[str, np.ndarray]:
    arrays = {"z": nb.z, "risk_target": nb.risk_target, "d2": nb.d2, "seq": nb.seq}
    return {k: v[0] for k, v in arrays.items()} if one_row else arrays
