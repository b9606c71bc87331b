"""The export/import file format: an `.npz` of the buffer in arrival order.

Arrays: z, soft_bind, cone_vol, E_T, lambda_bind, lambda_T, Hr, risk_target, seq,
ts (float epoch seconds), id and worker (fixed-width unicode, "" for none), and
`settings` (a 0-d JSON string). Loadable with `allow_pickle=False`.

An import is read from a file (the request body is streamed to a temporary file),
and nothing is decompressed before the archive's member names, declared sizes,
dtypes and shapes have been checked against the settings: a zip bomb or an
unknown member is refused before it costs memory. Rows then pass the same checks
as written episodes, so anything an import accepts, a later export reproduces and
a later import accepts again.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from zmem_core.limits import MAX_CAPACITY, MAX_ID_CHARS, MAX_SQNORM, MAX_WORKER_CHARS, MAX_Z_DIM, text_problem

from .episodes import EpisodeBatch
from .errors import InsufficientStorage, ValidationFailed
from .memory import MAX_SEQ
from .ring import FLOAT_FIELDS, Columns
from .settings import MemorySettings

MAX_TS = 2.0**35  # epoch seconds (the year 3058): beyond it a timestamp is garbage
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
MEMBERS = {f"{name}.npy" for name in (*EXPORT_FIELDS, "settings")}
MAX_SETTINGS_BYTES = 64 * 1024
NPY_HEADER_SLACK = 4096  # an .npy member's header, beyond its data
PY_STR_BYTES = 64  # a Python str's own overhead, beyond its characters


def write_npz(settings: MemorySettings, rows: Columns, out: IO[bytes] | Path) -> None:
    """Write the export file of `rows` to `out` (a path or a binary file), member by member.

    String columns are written STRING_CHUNK rows at a time, so their fixed-width copies
    (up to 512 bytes a row for 128-character ids) never exist whole."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in (*EXPORT_FIELDS, "settings"):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                if name == "settings":
                    text = np.array(settings.model_dump_json())
                    np.lib.format.write_array(member, text, allow_pickle=False)
                elif name in ("id", "worker"):
                    _write_strings(member, getattr(rows, name))
                else:
                    np.lib.format.write_array(member, getattr(rows, name), allow_pickle=False)


STRING_CHUNK = 8192


def _write_strings(member: IO[bytes], values: np.ndarray) -> None:
    """An object column of str/None as a fixed-width unicode .npy ("" for None)."""
    width = max((len(v) for v in values if v is not None), default=1) or 1
    dtype = np.dtype(f"<U{width}")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (len(values),)}
    np.lib.format.write_array_header_1_0(member, header)
    for start in range(0, len(values), STRING_CHUNK):
        chunk = ["" if v is None else v for v in values[start : start + STRING_CHUNK]]
        member.write(np.array(chunk, dtype=dtype).tobytes())


def read_npz(path: Path, room: int) -> tuple[MemorySettings, Columns]:
    """Settings and rows of an export file; a 422 names what is wrong with it, a 507 says it
    would need more than `room` bytes (what the memory budget has left) to load."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValidationFailed.at(["body"], f"not a zmem export (.npz): {e}") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        unknown = sorted(set(members) - MEMBERS)
        if unknown:
            raise ValidationFailed.at([unknown[0]], f"unknown member of an export file (also: {unknown[1:]})")
        missing = sorted(name.removesuffix(".npy") for name in MEMBERS - set(members))
        if missing:
            raise ValidationFailed.at([missing[0]], f"missing from the file (also: {missing[1:]})")
        declared = sum(info.file_size for info in members.values())
        if declared > room:
            raise InsufficientStorage(
                f"the import file unpacks to {declared} bytes; the memory budget "
                f"(--max-memory-bytes) has {max(room, 0)} left"
            )
        settings_info = members["settings.npy"]
        if settings_info.file_size > MAX_SETTINGS_BYTES:
            raise ValidationFailed.at(["settings"], f"{settings_info.file_size} bytes; far too long")
        settings = _settings(_load(archive, "settings", (), "U", MAX_SETTINGS_BYTES))
        seq_shape = _header(archive, "seq")[0]
        if len(seq_shape) != 1 or seq_shape[0] > 2 * MAX_CAPACITY:
            raise ValidationFailed.at(
                ["seq"], f"shape {list(seq_shape)}; expected [n] with n <= {2 * MAX_CAPACITY}"
            )
        n = seq_shape[0]
        z_shape = _header(archive, "z")[0]
        if len(z_shape) != 2 or z_shape[0] != n or not 1 <= z_shape[1] <= MAX_Z_DIM:
            raise ValidationFailed.at(
                ["z"], f"shape {list(z_shape)}; expected [{n}, d] with 1 <= d <= {MAX_Z_DIM}"
            )
        d = z_shape[1]
        if settings.z_dim is not None and d != settings.z_dim:
            raise ValidationFailed.at(
                ["z"], f"z has {d} dimensions; the file's settings say z_dim {settings.z_dim}"
            )
        if settings.z_dim is None:
            settings = _settings({**settings.model_dump(), "z_dim": d})
        # Only the last `capacity` rows are kept; they are widened (float64 values, Python
        # strings) while the file's own columns are still held: count both against the budget.
        keep = min(n, settings.capacity)
        strings = sum(_header(archive, m)[1].itemsize + PY_STR_BYTES for m in ("id", "worker"))
        widened = keep * (8 * d + 8 * (len(FLOAT_FIELDS) + 3) + strings)
        if declared + widened > room:
            raise InsufficientStorage(
                f"loading the import file takes about {declared + widened} bytes ({declared} unpacked, "
                f"{widened} for the {keep} rows kept); the memory budget (--max-memory-bytes) has "
                f"{max(room, 0)} left"
            )
        columns = {
            "z": _load(archive, "z", (n, d), "f", 8 * n * d),
            "seq": _load(archive, "seq", (n,), "iu", 8 * n),
            "ts": _load(archive, "ts", (n,), "fiu", 8 * n),
            "id": _load(archive, "id", (n,), "U", 4 * MAX_ID_CHARS * n),
            "worker": _load(archive, "worker", (n,), "U", 4 * MAX_WORKER_CHARS * n),
            **{f: _load(archive, f, (n,), "fiu", 8 * n) for f in (*FLOAT_FIELDS, "risk_target")},
        }
    return settings, _rows(settings, {key: column[n - keep :] for key, column in columns.items()})


def _settings(value: Any) -> MemorySettings:
    try:
        if isinstance(value, np.ndarray):
            value = json.loads(str(value))
        return MemorySettings.model_validate(value)
    except (ValueError, TypeError, RecursionError) as e:
        raise ValidationFailed.at(["settings"], f"invalid settings: {str(e)[:300]}") from None


def _header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """An .npy member's shape and dtype, read from its header without reading its data."""
    try:
        with archive.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
    except Exception as e:
        raise ValidationFailed.at([name], f"not a readable .npy array: {str(e)[:200]}") from None
    if fortran or dtype.hasobject:
        raise ValidationFailed.at([name], "must be a C-ordered array without Python objects")
    return tuple(shape), dtype


def _load(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], kinds: str, most: int) -> np.ndarray:
    """One member, after checking its declared shape, dtype kind and size (`most` bytes of data)."""
    got_shape, dtype = _header(archive, name)
    if got_shape != shape:
        raise ValidationFailed.at([name], f"shape {list(got_shape)}; expected {list(shape)}")
    if dtype.kind not in kinds or (dtype.kind == "f" and dtype.itemsize > 8):
        raise ValidationFailed.at([name], f"dtype {dtype.str} is not allowed here")
    size = archive.getinfo(f"{name}.npy").file_size
    if size > most + NPY_HEADER_SLACK:
        raise ValidationFailed.at([name], f"declares {size} bytes; at most {most} fit its shape")
    try:
        with archive.open(f"{name}.npy") as f:
            array = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:
        raise ValidationFailed.at([name], f"not a readable .npy array: {str(e)[:200]}") from None
    return array


def _rows(settings: MemorySettings, c: dict[str, np.ndarray]) -> Columns:
    """The checks a write makes, and the file's consistency (seqs, risk targets)."""
    n = len(c["seq"])
    seq = c["seq"].astype(np.int64)
    if n and (np.diff(seq) <= 0).any():
        raise ValidationFailed.at(["seq"], "seqs must increase strictly")
    if n and (seq[0] < 1 or seq[-1] >= MAX_SEQ - 1):
        raise ValidationFailed.at(["seq"], f"seqs must lie in [1, 2**53 - 1), got {seq[0]}..{seq[-1]}")
    with np.errstate(over="ignore", invalid="ignore"):
        z = c["z"].astype(np.float32)
        values = {f: c[f].astype(np.float64) for f in (*FLOAT_FIELDS, "risk_target", "ts")}
        norm2 = np.einsum("nd,nd->n", z, z, dtype=np.float64)
    for name, bad, rule in (
        ("z", ~np.isfinite(z).all(axis=1) | ~(norm2 <= MAX_SQNORM), "finite, with ‖z‖² <= 8.5e37"),
        ("soft_bind", ~((values["soft_bind"] >= 0) & (values["soft_bind"] <= 1)), "in [0, 1]"),
        ("cone_vol", ~(values["cone_vol"] >= 0) | ~np.isfinite(values["cone_vol"]), "finite and >= 0"),
        ("lambda_bind", ~(values["lambda_bind"] >= 0) | ~np.isfinite(values["lambda_bind"]), "finite, >= 0"),
        ("ts", ~((values["ts"] >= 0) & (values["ts"] <= MAX_TS)), f"epoch seconds in [0, {MAX_TS:.0f}]"),
        *((f, ~np.isfinite(values[f].astype(np.float32)), "a finite float32") for f in ("E_T", "lambda_T")),
        ("Hr", ~np.isfinite(values["Hr"].astype(np.float32)), "a finite float32"),
    ):
        rows = np.flatnonzero(bad)
        if len(rows):
            raise ValidationFailed.at([name, int(rows[0])], f"must be {rule} (and {len(rows) - 1} more rows)")
    floats = {f: values[f].astype(np.float32) for f in FLOAT_FIELDS}
    ids = [str(v) or None for v in c["id"]]
    workers = [str(v) or None for v in c["worker"]]
    expected = EpisodeBatch(z, floats, ids, workers).risk_targets(settings.risk)
    off = ~np.isclose(values["risk_target"], expected, rtol=1e-5, atol=1e-6) | ~np.isfinite(expected)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValidationFailed.at(
            ["risk_target", i], f"is {values['risk_target'][i]}, but the settings' weights give {expected[i]}"
        )
    seen: dict[str, int] = {}
    for key, texts, limit in (("id", ids, MAX_ID_CHARS), ("worker", workers, MAX_WORKER_CHARS)):
        for i, text in enumerate(texts):
            problem = text_problem(text, limit, allow_empty=True)
            if problem:
                raise ValidationFailed.at([key, i], problem)
            if key == "id" and text is not None:
                if text in seen:
                    raise ValidationFailed.at(["id", i], f"repeats the id of row {seen[text]}")
                seen[text] = i
    return Columns(
        z=np.ascontiguousarray(z),
        seq=seq,
        ts=values["ts"],
        id=np.array(ids, object),
        worker=np.array(workers, object),
        risk_target=expected,
        **floats,
    )
