"""The export/import file format: an `.npz` of the buffer in arrival order.

Arrays: z, soft_bind, cone_vol, E_T, lambda_bind, lambda_T, Hr, risk_target, seq,
ts (float epoch seconds), id and worker (fixed-width unicode, "" for none), and
`settings` (a 0-d JSON string). Loadable with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json

import numpy as np

from .episodes import MAX_ID_CHARS, MAX_WORKER_CHARS, string_problem
from .errors import ValidationFailed
from .ring import FLOAT_FIELDS, Columns
from .settings import MemorySettings

MAX_SEQ = 2**53  # seqs stay exact as JSON numbers and as SQLite integers
EXPORT_FIELDS = (
    "z",
    "soft_bind",
    "cone_vol",
    "E_T",
    "lambda_bind",
    "lambda_T",
    "Hr",
    "risk_target",
    "seq",
    "ts",
    "id",
    "worker",
)


def write_npz(settings: MemorySettings, rows: Columns) -> bytes:
    arrays: dict[str, np.ndarray] = {f: getattr(rows, f) for f in EXPORT_FIELDS}
    for key in ("id", "worker"):
        arrays[key] = np.array(["" if v is None else v for v in arrays[key]], dtype=np.str_)
    arrays["settings"] = np.array(settings.model_dump_json())
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: kwargs as bools
    return buf.getvalue()


def read_npz(body: bytes) -> tuple[MemorySettings, Columns]:
    """Settings and rows of an export file; a 422 names what is wrong with it."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as f:
            data = {key: f[key] for key in f.files}
    except Exception as e:
        raise ValidationFailed.at(["body"], f"not a zmem export (.npz): {e}") from None
    missing = [k for k in (*EXPORT_FIELDS, "settings") if k not in data]
    if missing:
        raise ValidationFailed.at([missing[0]], f"missing from the file (also: {missing[1:]})")
    try:
        settings = MemorySettings.model_validate(json.loads(str(data["settings"])))
    except ValueError as e:
        raise ValidationFailed.at(["settings"], f"invalid settings: {e}") from None
    n = len(data["seq"])
    z = data["z"]
    if z.ndim != 2 or z.shape != (n, settings.z_dim or z.shape[1]):
        raise ValidationFailed.at(
            ["z"], f"shape {list(z.shape)} does not match {n} rows of z_dim {settings.z_dim}"
        )
    if settings.z_dim is None:
        try:  # validated like any memory's settings: a bad file must not poison the store
            settings = MemorySettings.model_validate({**settings.model_dump(), "z_dim": int(z.shape[1])})
        except ValueError as e:
            raise ValidationFailed.at(["z"], f"z_dim {z.shape[1]} is not valid: {e}") from None
    for key in (*FLOAT_FIELDS, "risk_target", "ts", "id", "worker"):
        if data[key].shape != (n,):
            raise ValidationFailed.at([key], f"shape {list(data[key].shape)}; expected [{n}]")
    if data["seq"].dtype.kind not in "iu":
        raise ValidationFailed.at(["seq"], f"seqs must be integers, not {data['seq'].dtype}")
    seq = data["seq"].astype(np.int64)
    if n and (np.diff(seq) <= 0).any():
        raise ValidationFailed.at(["seq"], "seqs must increase strictly")
    if n and (seq[0] < 1 or seq[-1] >= MAX_SEQ):
        raise ValidationFailed.at(["seq"], f"seqs must lie in [1, 2**53), got {seq[0]}..{seq[-1]}")
    ids = [str(v) or None for v in data["id"]]
    workers = [str(v) or None for v in data["worker"]]
    for key, values, limit in (("id", ids, MAX_ID_CHARS), ("worker", workers, MAX_WORKER_CHARS)):
        for i, text in enumerate(values):
            problem = string_problem(text, limit, allow_empty=True)
            if problem:
                raise ValidationFailed.at([key, i], problem)
    numeric = [z, *(data[k] for k in (*FLOAT_FIELDS, "risk_target", "ts"))]
    if not all(np.isfinite(a.astype(np.float64)).all() for a in numeric):
        raise ValidationFailed.at(["body"], "the file holds NaN or inf")
    return settings, Columns(
        z=np.ascontiguousarray(z, np.float32),
        seq=seq,
        ts=data["ts"].astype(np.float64),
        id=np.array(ids, object),
        worker=np.array(workers, object),
        **{k: data[k].astype(np.float32) for k in (*FLOAT_FIELDS, "risk_target")},
    )
