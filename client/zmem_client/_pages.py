"""Pages of the changes feed (SPEC §2) as the replica reads them: asked for, bounded, checked.

A page is a safetensors answer (`z` F32 [n, z_dim], `risk_target` F32 [n], `seq` I64 [n],
the rest in its metadata). `get_page` asks for one and `read_page` reads it in exact
amounts: at most what a page asked for with its `limit` can hold, the header's tensor
table checked before any row is read, nothing past its declared end. Anything the replica
would mirror or answer with must be of its type and range (`check_meta`, `check_layout`,
`check_rows`); a page that is not raises `PageRefused` before anything is applied.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import httpx
import numpy as np

from zmem_core.limits import MAX_CAPACITY, MAX_K, MAX_SIGMA, MAX_Z_DIM, MIN_SIGMA
from zmem_core.wire import SAFETENSORS

from ._exceptions import NoSuchMemory, ReplicaError, Timeout
from ._http import mapped, read_error

PAGE_ROWS = 10_000  # rows per feed page, at most
PAGE_BYTES = 16 * 2**20
"""Bytes of rows per feed page the replica asks for, at most: wide rows come in fewer per page
(the service refuses answers over its `max_response_bytes`, 64 MiB by default)."""
HEADER_BYTES = 2**20  # a page's safetensors header (metadata and tensor table): far more than it needs
FEED_HEADERS = {"accept": SAFETENSORS, "accept-encoding": "identity"}  # compressed bodies have no byte cap


class PageRefused(ReplicaError):
    """A feed answer the replica refuses: malformed, inconsistent with its own settings or
    with the mirror, or past its byte cap. Nothing of it is applied; the feed thread counts
    it (`feed_errors`, `last_feed_error`) and asks again after a backoff, so the replica keeps
    its last good state and the lag (`max_lag`, `strict`) says it is falling behind."""


def get_page(
    http: httpx.Client,
    prefix: str,
    memory: str,
    params: dict[str, Any],
    timeout: float,
    max_bytes: int,
    *,
    fresh: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """One checked feed page (`read_page`), None when the memory does not exist. `fresh`: the
    service's own answer, never a cache's (`Cache-Control: no-cache`; what `sync` asks).

    Raises TransportError (unreachable, or not answered within `timeout`), HTTPError (an
    error answer) or PageRefused.
    """
    url = prefix + "changes"
    deadline = time.monotonic() + timeout
    headers = {**FEED_HEADERS, "cache-control": "no-cache"} if fresh else FEED_HEADERS
    with (
        mapped(f"GET {url}", timeout, lambda: http.is_closed),
        http.stream("GET", url, params=params, headers=headers, timeout=timeout) as r,
    ):
        if r.status_code >= 400:
            error = read_error(r, deadline, memory)
            if isinstance(error, NoSuchMemory):
                return None
            raise error
        return read_page(r, params["limit"], max_bytes, deadline)


def row_bytes(z_dim: int) -> int:
    """Bytes of one row in a page: z (float32 [z_dim]), risk_target (float32), seq (int64)."""
    return 4 * z_dim + 4 + 8


def page_limit(z_dim: int | None) -> int:
    """Rows to ask for in one page of a memory of `z_dim` (unknown: the widest possible)."""
    return max(1, min(PAGE_ROWS, PAGE_BYTES // row_bytes(z_dim or MAX_Z_DIM)))


class _Body:
    """A streamed answer's body, read in exact amounts: past `cap` bytes in all, or past
    `deadline`, it stops reading and raises, so a body's size is bounded by what its
    request can legitimately bring back, not by what the other side sends."""

    def __init__(self, r: httpx.Response, cap: int, deadline: float) -> None:
        self._chunks = r.iter_bytes()
        self._pending = memoryview(b"")
        self._cap = cap
        self._deadline = deadline
        self._url = r.request.url
        self.received = 0

    def _next(self) -> bool:
        for chunk in self._chunks:
            self.received += len(chunk)
            if self.received > self._cap:
                raise PageRefused(f"GET {self._url}: the answer runs past {self._cap} bytes, its cap")
            if time.monotonic() > self._deadline:
                raise Timeout(f"GET {self._url}: the answer was not complete in time")
            if chunk:
                self._pending = memoryview(chunk)
                return True
        return False

    def read(self, n: int) -> bytearray:
        """Exactly the next `n` bytes; PageRefused if the body ends first."""
        out = bytearray(n)
        view, at = memoryview(out), 0
        while at < n:
            if not self._pending and not self._next():
                raise PageRefused(f"GET {self._url}: the answer ends after {self.received} bytes")
            take = min(n - at, len(self._pending))
            view[at : at + take] = self._pending[:take]
            self._pending = self._pending[take:]
            at += take
        return out

    def at_end(self) -> bool:
        return not self._pending and not self._next()


_COLUMNS: dict[str, tuple[str, np.dtype[Any], int]] = {  # name: (safetensors dtype, numpy dtype, rank)
    "z": ("F32", np.dtype("<f4"), 2),
    "risk_target": ("F32", np.dtype("<f4"), 1),
    "seq": ("I64", np.dtype("<i8"), 1),
}


def read_page(
    r: httpx.Response, limit: int, max_bytes: int, deadline: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (`z` float32 [n, z_dim], `risk_target` float32 [n], `seq` int64 [n]) and the
    metadata of a feed page asked for with `limit`, checked (`check_meta`, `check_rows`).

    Reads at most what such a page can hold: `limit` rows of the widest z, no more than
    `max_bytes` (a page the mirror could not hold is no use), plus its header; the header's
    tensor table is checked before the rows are read, and nothing past its declared end is
    read. Raises PageRefused for anything else, before reading it where the headers tell,
    and ReplicaError for rows past `max_bytes`.
    """
    where = f"GET {r.request.url}"
    kind = r.headers.get("content-type", "")
    if not kind.startswith(SAFETENSORS):
        raise PageRefused(f"{where}: the page came as {kind[:80]!r}, not {SAFETENSORS}")
    encoding = r.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PageRefused(f"{where}: the page came {encoding[:40]!r}-encoded; the replica asks for identity")
    data_cap = min(limit * row_bytes(MAX_Z_DIM), max_bytes)
    cap = 8 + HEADER_BYTES + data_cap
    declared = r.headers.get("content-length", "").strip()
    if declared and (not declared.isdigit() or int(declared) > cap):
        raise PageRefused(f"{where}: the page declares {declared[:40]} bytes; at most {cap} can be one")
    body = _Body(r, cap, deadline)
    (n,) = struct.unpack("<Q", body.read(8))
    if n > HEADER_BYTES:
        raise PageRefused(f"{where}: the page's header declares {n} bytes; at most {HEADER_BYTES} can be one")
    try:
        header = json.loads(bytes(body.read(n)))
        raw = header.pop("__metadata__", None) or {}
        meta = {key: json.loads(value) for key, value in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise PageRefused(f"{where}: the page's header is not safetensors: {e}") from None
    try:
        check_meta(meta)
        layout, total = check_layout(header, meta, limit, max_bytes)
    except PageRefused as e:
        raise PageRefused(f"{where}: {e}") from None
    data = body.read(total)
    if not body.at_end():
        raise PageRefused(f"{where}: the page goes on past the {8 + n + total} bytes its header declares")
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin) in layout.items():
        a = np.frombuffer(data, dtype, int(np.prod(shape)), begin).reshape(shape)
        arrays[name] = a if a.flags.aligned else a.copy()
    try:
        check_rows(arrays, meta)
    except PageRefused as e:
        raise PageRefused(f"{where}: {e}") from None
    return arrays, meta


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_sigma(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and MIN_SIGMA <= v <= MAX_SIGMA


def check_meta(meta: dict[str, Any]) -> None:
    """A page's metadata as the service sends it (SPEC §2), or PageRefused naming what is not:
    anything the replica mirrors or answers with must be of its type and range."""
    settings = meta.get("settings")
    wrong: list[str] = []
    if not isinstance(meta.get("generation"), str) or not 0 < len(meta["generation"]) <= 128:
        wrong.append("generation")
    wrong += [key for key in ("reset", "complete") if not isinstance(meta.get(key), bool)]
    if not _is_int(meta.get("next_seq"), 1, 2**62):
        wrong.append("next_seq")
    if meta.get("oldest_seq") is not None and not _is_int(meta["oldest_seq"], 1, 2**62):
        wrong.append("oldest_seq")
    if meta.get("sigma_auto") is not None and not _is_sigma(meta["sigma_auto"]):
        wrong.append("sigma_auto")
    if not isinstance(settings, dict):
        wrong.append("settings")
    else:
        if settings.get("z_dim") is not None and not _is_int(settings["z_dim"], 1, MAX_Z_DIM):
            wrong.append("settings.z_dim")
        if not _is_int(settings.get("capacity"), 1, MAX_CAPACITY):
            wrong.append("settings.capacity")
        if not _is_int(settings.get("min_size"), 0, MAX_CAPACITY):
            wrong.append("settings.min_size")
        if not _is_int(settings.get("k"), 1, MAX_K):
            wrong.append("settings.k")
        if settings.get("sigma") != "auto" and not _is_sigma(settings.get("sigma")):
            wrong.append("settings.sigma")
        capacity = settings["capacity"] if "settings.capacity" not in wrong else 0
        if not _is_int(meta.get("size"), 0, capacity):
            wrong.append("size")
    if wrong:
        shown = {key: meta.get(key) for key in wrong if "." not in key}
        raise PageRefused(f"the page's metadata is invalid ({', '.join(wrong)}): {str(shown)[:300]}")


def check_layout(
    header: Any, meta: dict[str, Any], limit: int, max_bytes: int
) -> tuple[dict[str, tuple[np.dtype[Any], tuple[int, ...], int]], int]:
    """The page's tensor table checked against its settings: exactly `z` F32 [n, z_dim],
    `risk_target` F32 [n] and `seq` I64 [n] with n ≤ limit and n ≤ capacity, tiling the data
    without gaps → ({name: (dtype, shape, offset)}, data bytes). Rows past `max_bytes` raise
    ReplicaError: the mirror could never hold them."""
    if not isinstance(header, dict) or set(header) != set(_COLUMNS):
        names = sorted(map(str, header)) if isinstance(header, dict) else type(header).__name__
        raise PageRefused(f"the page holds tensors {names}; a page is exactly {sorted(_COLUMNS)}")
    layout: dict[str, tuple[np.dtype[Any], tuple[int, ...], int]] = {}
    spans = []
    for name, (dtype, numpy_dtype, rank) in _COLUMNS.items():
        info = header[name] if isinstance(header[name], dict) else {}
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (
            info.get("dtype") != dtype
            or not isinstance(shape, list)
            or len(shape) != rank
            or not all(_is_int(x, 0, 2**40) for x in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(x, 0, 2**62) for x in offsets)
        ):
            shown = str(header[name])[:200]
            raise PageRefused(f"the page's {name} is {shown}; it must be {dtype} of rank {rank}")
        size = int(np.prod(shape)) * numpy_dtype.itemsize
        if offsets[1] - offsets[0] != size:
            raise PageRefused(f"the page's {name} {shape} {dtype} spans bytes {offsets}")
        layout[name] = (numpy_dtype, tuple(shape), offsets[0])
        spans.append(offsets)
    total = 0
    for begin, end in sorted(spans):
        if begin != total:
            raise PageRefused(f"the page's tensors do not tile its data: {sorted(spans)}")
        total = end
    n, d = layout["z"][1]
    z_dim, capacity = meta["settings"].get("z_dim"), meta["settings"]["capacity"]
    if n and d != z_dim:
        raise PageRefused(f"the page's z has {d} columns; its settings say z_dim {z_dim}")
    if layout["risk_target"][1] != (n,) or layout["seq"][1] != (n,):
        lengths = {name: layout[name][1][0] for name in _COLUMNS}
        raise PageRefused(f"the page's columns disagree in length: {lengths}")
    if n > min(limit, capacity):
        raise PageRefused(f"the page holds {n} rows; {limit} were asked for, capacity {capacity}")
    if total > max_bytes:  # the mirror needs more than the page: following this memory is hopeless
        raise ReplicaError(
            f"the replica needs more than {total} bytes for {n} rows of z_dim {d} (a page of the "
            f"memory, capacity {capacity}), over replica_max_bytes={max_bytes}: raise the limit "
            "or use replica=False"
        )
    return layout, total


def check_rows(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Rows the mirror can hold: seqs ascending within the page's seq range, finite numbers, z
    whose squared norm fits float32 (as the service admits them), or PageRefused."""
    z, rt, seq = arrays["z"], arrays["risk_target"], arrays["seq"]
    if not len(seq):
        return
    oldest = meta["oldest_seq"] if meta["oldest_seq"] is not None else 1
    if seq[0] < oldest or seq[-1] >= meta["next_seq"] or (len(seq) > 1 and (np.diff(seq) <= 0).any()):
        raise PageRefused(
            f"the page's seqs {seq[0]}..{seq[-1]} are not ascending within [{oldest}, {meta['next_seq']})"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        sqnorm = np.einsum("ij,ij->i", z, z)
    if not np.isfinite(sqnorm).all() or not np.isfinite(rt).all():
        raise PageRefused("the page holds a non-finite number, or a z whose squared norm overflows float32")
