"""Bodies to domain objects and answers to bytes: JSON everywhere, safetensors on the fast path.

safetensors bodies are the format both sides share (`zmem_core.wire`: arrays as
tensors named like the JSON fields, every other value in `__metadata__` as a JSON
literal). Decoding ends in the same domain objects whatever the format, so validation
has one shape: a 400 for a body that can't be parsed, a 422 naming the field otherwise.
These are plain functions over bytes and arrays; `exchange.py` decides where they run.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pydantic_core
from pydantic import ValidationError

from zmem_core import wire as core_wire
from zmem_core.limits import MAX_SQNORM, MAX_WORKER_CHARS, rows_too_large, text_problem
from zmem_core.wire import SAFETENSORS

from ..episodes import Z_TOO_LARGE, EpisodeBatch
from ..errors import BadRequest, ValidationFailed, ZMemError
from ..ring import FLOAT_FIELDS
from ..service import Query
from . import jsonchunks
from .schemas import EPISODE_LIST, ROW, ROWS, EpisodesIn, QueryOptions

JSON = "application/json"
# Bodies parsed whole by the native parser: at most this many bytes, and arrays, objects and
# members. The slowest such body (512 KiB of one-digit numbers; 32 Ki empty arrays) parses in
# about 5 ms, the switch interval after which the stepwise parser hands the GIL back to the
# event loop: the worst /healthz latency while such bodies arrive stays the stepwise
# parser's; from 1 MiB up it grows (benchmarks/bench_hostile.py, bench_json.py).
NATIVE_BYTES = 512 << 10
NATIVE_VALUES = 1 << 15
# Floats validated per pydantic call on large JSON bodies (each call holds the GIL).
FLOATS_PER_STEP = 16384
QUERY_FIELDS = ("risk", "wsum", "n_eff")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def json_values_cap(max_rows: int) -> int:
    """Most arrays, objects and object members a JSON body of `max_rows` episodes or query rows
    needs (an episode: one object, one z array, nine members), with room to spare."""
    return 16 * max_rows + 1024


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


def is_safetensors(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == SAFETENSORS


def parse_json(body: bytes, max_values: int | None = None) -> Any:
    """A JSON document (UTF-8 only, whatever the size), refused (422) past `max_values` arrays,
    objects and members when past `jsonchunks.WINDOW` bytes (counted at C speed first).

    A body of at most `NATIVE_BYTES` and `NATIVE_VALUES` is parsed whole by pydantic_core's
    parser; a larger one in steps (`jsonchunks.loads`), so that no single call holds the GIL
    for long. Both give what `json.loads` gives: a body the native parser refuses (a lone
    surrogate escape, nesting past its limit, or invalid JSON) is parsed again by the stdlib's,
    which takes it or says what is wrong in the words it always has."""
    try:
        # json.loads would also take UTF-16/32 and a BOM.
        text = body.decode("utf-8")
        if len(body) <= jsonchunks.WINDOW:
            return _parse_whole(body, text, json.loads)
        count = jsonchunks.count_values(text, NATIVE_VALUES if max_values is None else max_values)
        if max_values is not None and count > max_values:
            raise ValidationFailed.at(
                ["body"],
                f"{count} JSON arrays, objects and members; at most {max_values} "
                "(for this service's max_batch rows or episodes)",
            )
        if len(body) <= NATIVE_BYTES and count <= NATIVE_VALUES:
            return _parse_whole(body, text, jsonchunks.loads)
        return jsonchunks.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None


def _parse_whole(body: bytes, text: str, stdlib: Callable[[str], Any]) -> Any:
    """`body` by the native parser in one call, else by `stdlib` (see `parse_json`)."""
    try:
        # NaN and Infinity are taken, as json.loads takes them: the models name them (422).
        return pydantic_core.from_json(body, allow_inf_nan=True)
    except ValueError:
        return stdlib(text)


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


def _unknown(names: Any, known: Any, what: str) -> None:
    """422 naming the first of `names` not in `known`: a misspelt field must not pass unseen."""
    extra = sorted(set(names) - set(known))
    if extra:
        raise ValidationFailed.at([extra[0]], f"unknown {what}; expected some of {', '.join(sorted(known))}")


# -- episodes ----------------------------------------------------------------------------


def decode_episodes(body: bytes, content_type: str | None, max_batch: int) -> EpisodeBatch:
    """Episodes from either format (400 unparseable, 422 invalid). JSON is validated a slab of
    episodes at a time, so a large body never holds the GIL for long."""
    if is_safetensors(content_type):
        return _episodes_from_safetensors(*parse_safetensors(body))
    doc = parse_json(body, json_values_cap(max_batch))
    items = doc.get("episodes") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(doc) != 1:
        try:  # the wrong shape: let the model name it, without validating a list of episodes
            EpisodesIn.model_validate({**doc, "episodes": []} if isinstance(items, list) else doc)
        except ValidationError as e:
            raise pydantic_problem(e) from None
    assert isinstance(items, list)
    if len(items) > max_batch:
        msg = f"{len(items)} episodes in one request; the limit is {max_batch}"
        raise ValidationFailed.at(["episodes"], msg)
    first = items[0] if items else None
    d = len(first["z"]) if isinstance(first, dict) and isinstance(first.get("z"), list) else 0
    step = max(1, FLOATS_PER_STEP // max(d, 1))
    eps: list[Any] = []
    z_parts = []
    for start in range(0, len(items), step):
        try:
            chunk = EPISODE_LIST.validate_python(items[start : start + step])
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
    return EpisodeBatch(z=z, values=values, ids=[e.id for e in eps], workers=[e.worker for e in eps])


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


# -- queries -----------------------------------------------------------------------------


def decode_query(body: bytes, content_type: str | None, params: dict[str, str], max_rows: int) -> Query:
    """A neighbours/risk query from the body, with k/sigma/record from query parameters when the
    body lacks them."""
    if is_safetensors(content_type):
        tensors, fields = parse_safetensors(body)
        if "z" not in tensors:
            raise ValidationFailed.at(["z"], "a F32 tensor z is required")
        _unknown(tensors, ("z",), "tensor")
        z = tensors["z"]
    else:
        fields = parse_json(body, json_values_cap(max_rows))
        if not isinstance(fields, dict):
            raise ValidationFailed.at(["body"], "must be a JSON object")
        if "z" not in fields:
            raise ValidationFailed.at(["z"], "Field required")
        z = None
    merged = {k: json_param(v) for k, v in params.items() if k in ("k", "sigma", "record")}
    if "worker" in params:
        merged["worker"] = params["worker"]  # text, as it is
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
    # Squares summed in float64 can't overflow; a NaN or inf makes the sum fail the test. The
    # rows' total within the bound puts every row within it.
    total = np.einsum("ij,ij->", z, z, dtype=np.float64)
    if not total <= MAX_SQNORM and not (np.einsum("ij,ij->i", z, z, dtype=np.float64) <= MAX_SQNORM).all():
        if not np.isfinite(z).all():
            raise ValidationFailed.at(
                ["z", int(np.flatnonzero(~np.isfinite(z).all(1))[0])],
                "must be finite float32 (no NaN, inf or |x| > 3.4e38)",
            )
        raise ValidationFailed.at(["z", int(rows_too_large(z)[0])], Z_TOO_LARGE)
    z = np.ascontiguousarray(z, np.float32)
    return Query(z, one_row, options.k, options.sigma, options.record, checked_worker(options.worker))


def _json_z(raw: Any) -> np.ndarray:
    """A JSON z (a list of numbers, or of rows of numbers) as float32 [d] or [B, d], validated in slabs."""
    if not isinstance(raw, list):
        raise ValidationFailed.at(["z"], "must be a list of numbers or a list of rows of numbers")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf: named by the caller
        if not raw or not isinstance(raw[0], list):
            parts = []
            for start in range(0, len(raw), FLOATS_PER_STEP):
                try:
                    row = ROW.validate_python(raw[start : start + FLOATS_PER_STEP])
                except ValidationError as e:
                    raise pydantic_problem(e, ("z",), offset=start) from None
                parts.append(np.array(row, np.float32))
            return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
        d = len(raw[0])
        step = max(1, FLOATS_PER_STEP // max(d, 1))
        blocks = []
        for start in range(0, len(raw), step):
            try:
                rows = ROWS.validate_python(raw[start : start + step])
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


# -- recorded queries --------------------------------------------------------------------


def decode_queries(
    body: bytes, content_type: str | None, max_rows: int
) -> tuple[dict[str, np.ndarray], str | None]:
    """float64 columns `risk`, `wsum`, `n_eff` [n] from a JSON or safetensors body, and the
    worker that asked those queries (an optional `worker` field, or metadata key).

    Raises:
        BadRequest: the body can't be parsed.
        ValidationFailed: a column is missing, not a flat list/vector of finite numbers, the
            lengths differ or exceed `max_rows`, or wsum / n_eff is negative (names the field).
    """
    if is_safetensors(content_type):
        raw, worker = _safetensors_columns(body)
    else:
        parsed = parse_json(body, json_values_cap(max_rows))
        if not isinstance(parsed, dict):
            raise ValidationFailed.at(["body"], "must be a JSON object with lists risk, wsum, n_eff")
        extra = sorted(set(parsed) - {*QUERY_FIELDS, "worker"})
        if extra:
            raise ValidationFailed.at([extra[0]], "unknown field; expected risk, wsum, n_eff and worker")
        worker = parsed.get("worker")
        raw = {}
        for f in QUERY_FIELDS:
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
    for f in QUERY_FIELDS:
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
    return raw, checked_worker(worker)


def checked_worker(worker: Any) -> str | None:
    """A query's `worker` (a string of at most MAX_WORKER_CHARS, or None), else a 422 naming it."""
    if worker is not None and not isinstance(worker, str):
        raise ValidationFailed.at(["worker"], "must be a string or null")
    problem = text_problem(worker, MAX_WORKER_CHARS, allow_empty=True)
    if problem is not None:
        raise ValidationFailed.at(["worker"], problem)
    return worker


def _safetensors_columns(body: bytes) -> tuple[dict[str, np.ndarray], Any]:
    tensors, meta = parse_safetensors(body, dtypes=("F32", "F64"))
    _unknown(meta, ("worker",), "metadata key")
    out = {}
    for f in QUERY_FIELDS:
        if f not in tensors:
            raise ValidationFailed.at([f], "a F32 or F64 tensor is required")
        if tensors[f].ndim != 1:
            raise ValidationFailed.at([f], f"shape {list(tensors[f].shape)}; expected [n]")
        out[f] = tensors[f].astype(np.float64)
    extra = sorted(set(tensors) - set(QUERY_FIELDS))
    if extra:
        raise ValidationFailed.at([extra[0]], "unknown tensor; expected risk, wsum and n_eff")
    return out, meta.get("worker")


# -- answers -----------------------------------------------------------------------------


_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


_TENSOR_HEADERS: dict[tuple[tuple[str, str, tuple[int, ...]], ...], str] = {}
"""The tensor part of a header by (name, dtype, shape) of each array: the hot answers' shapes
repeat, so their headers are built once."""


def encode_safetensors(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """`zmem_core.wire.encode(arrays, meta)`, written directly: the header from its parts (the
    tensors' part built once per shape, padded to 8 bytes as safetensors writes it) and the
    arrays' bytes in order, without the library's per-tensor bookkeeping. Raises ValueError on
    a NaN or infinity in `meta`."""
    key = tuple((name, a.dtype.str, a.shape) for name, a in arrays.items())
    tensors = _TENSOR_HEADERS.get(key)  # only shapes of the dtypes below are kept
    if tensors is None:
        if any(a.dtype.newbyteorder("=") not in _DTYPES for a in arrays.values()):
            return core_wire.encode(arrays, meta)
        fields, offset = [], 0
        for name, a in arrays.items():
            end = offset + a.nbytes
            shape = ",".join(map(str, a.shape))
            dtype = _DTYPES[a.dtype.newbyteorder("=")]
            fields.append(
                f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[{offset},{end}]}}'
            )
            offset = end
        tensors = ",".join(fields)
        if len(_TENSOR_HEADERS) >= 256:
            _TENSOR_HEADERS.clear()
        _TENSOR_HEADERS[key] = tensors
    parts: list[Any] = [
        a
        if a.flags.c_contiguous and a.dtype.byteorder in "<=|"
        else np.ascontiguousarray(a, "<" + a.dtype.str[1:])
        for a in arrays.values()
    ]
    if meta:
        literals = ",".join([f"{_key(k)}:{_quoted_literal(v)}" for k, v in meta.items()])
        text = f'{{"__metadata__":{{{literals}}}{"," if tensors else ""}{tensors}}}'.encode()
    else:
        text = f"{{{tensors}}}".encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *(a.data for a in parts)])


_KEYS: dict[str, str] = {}
"""Metadata keys as JSON strings: the answers' few keys, written by the service itself."""


def _key(name: str) -> str:
    quoted = _KEYS.get(name)
    if quoted is None:
        quoted = json.dumps(name)
        if len(_KEYS) < 256:
            _KEYS[name] = quoted
    return quoted


def _quoted_literal(value: Any) -> str:
    """`json.dumps(json.dumps(value, allow_nan=False))`: the JSON literal of `value` as a JSON
    string, without the encoder for the common scalars (whose literals need no escapes)."""
    if value is True:
        return '"true"'
    if value is False:
        return '"false"'
    if value is None:
        return '"null"'
    if type(value) is int:
        return f'"{value}"'
    if type(value) is float and math.isfinite(value):
        return f'"{value!r}"'
    return json.dumps(json.dumps(value, allow_nan=False))


def safetensors_size(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
    """Bytes of the safetensors answer, within a few per tensor (the header's offsets)."""
    header = len(json.dumps({k: json.dumps(v) for k, v in meta.items()})) + 96 * len(arrays)
    return 8 + header + sum(a.nbytes for a in arrays.values())


def encode_json(
    meta: dict[str, Any], arrays: dict[str, np.ndarray], limit: int, st_size: int | None = None
) -> bytes:
    """The JSON answer, at most `limit` bytes (else a 422 on `k` saying whether the safetensors
    answer, `st_size` bytes when measured already, would fit)."""
    try:
        return jsonchunks.encode_arrays(meta, arrays, limit)
    except jsonchunks.TooLarge:
        if st_size is None:
            st_size = safetensors_size(arrays, meta)
        hint = (
            f"the safetensors answer ({st_size} bytes) fits: send Accept: {SAFETENSORS}"
            if st_size <= limit
            else "ask for fewer rows or a smaller k"
        )
        raise ValidationFailed.at(["k"], f"the JSON answer would exceed {limit} bytes; {hint}") from None
    except ValueError:  # NaN or infinity: admissible inputs never produce one
        raise ZMemError("the answer holds a non-finite number; see the server log") from None


def check_safetensors_size(st_size: int, limit: int) -> None:
    if st_size > limit:
        raise ValidationFailed.at(
            ["k"],
            f"the answer would be {st_size} bytes; the limit is {limit} (max_response_bytes): "
            "ask for fewer rows or a smaller k",
        )
