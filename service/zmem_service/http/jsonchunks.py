"""JSON parsing and encoding in short steps, for bodies and answers of many MiB.

`json.loads` and `json.dumps` are single C calls that hold the GIL from start to end:
run on a worker thread over a 30 MiB body they still stop the event loop for the
whole call. These functions do the same work as a series of C calls on pieces of
at most a few tens of KiB, so the interpreter can hand the GIL to the event loop
between pieces (every `sys.getswitchinterval()`, 5 ms by default).

`loads` walks containers in Python and hands every value that fits a small window
to the C decoder, and runs of scalars in a large array a window at a time, so its
Python work grows with the number of large containers and of object members, never
with the number of numbers. `count_values` bounds that number at C speed before
anything is parsed (the codecs refuse a body past their cap). `encode_arrays` writes
numpy arrays a slab of rows at a time (orjson, native speed) and stops as soon as the
output passes a byte limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import orjson

# Largest text handed to the C decoder in one call, and floats encoded per call.
WINDOW = 1 << 16
FLOATS_PER_STEP = 8192
MAX_DEPTH = 64

_decoder = json.JSONDecoder()
_ws = re.compile(r"[ \t\n\r]*")
_STRING = r'"(?:[^"\\\x00-\x1f]|\\.)*"'
# Scalars each followed by a comma: the comma proves a number complete, so a run cut at
# the end of a window never splits one.
_SCALAR_RUN = re.compile(rf"(?:(?:-?[0-9][0-9.eE+-]*|true|false|null|{_STRING})[ \t\n\r]*,[ \t\n\r]*)+")
_STRINGS = re.compile(_STRING)


def count_values(text: str, cap: int) -> int:
    """An upper bound on the arrays, objects and object members of `text` (exact when over
    `cap`: characters inside strings are not counted then), at C speed."""
    count = text.count("[") + text.count("{") + text.count(":")
    if count <= cap:
        return count
    bare = _STRINGS.sub("", text)
    return bare.count("[") + bare.count("{") + bare.count(":")


def loads(text: str) -> Any:
    """`json.loads(text)` in steps; raises json.JSONDecodeError (a ValueError) or RecursionError."""
    value, end = _value(text, _ws.match(text, 0).end(), 0)  # type: ignore[union-attr]
    end = _ws.match(text, end).end()  # type: ignore[union-attr]
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _value(text: str, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise RecursionError("nested too deeply")
    opening = text[pos : pos + 1]
    if opening not in ("[", "{"):
        return _decoder.raw_decode(text, pos)
    # Small containers whole: try windows of growing size; one that can't hold the
    # container fails (truncated) and the next is 8 times larger.
    size = 2048
    while True:
        window = text[pos : pos + size]
        try:
            value, n = _decoder.raw_decode(window)
            return value, pos + n
        except json.JSONDecodeError as e:
            if len(window) < size:  # the window held the rest of the text: a real error
                raise json.JSONDecodeError(e.msg, text, pos + e.pos) from None
        if size >= WINDOW:
            break
        size *= 8
    return (_array if opening == "[" else _object)(text, pos, depth)


def _array(text: str, pos: int, depth: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    pos = _ws.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "]":
        return out, pos + 1
    runs = True
    while True:
        run = _SCALAR_RUN.match(text, pos, pos + WINDOW) if runs else None
        if run is not None:
            try:  # up to a window of scalars in one C call
                out.extend(json.loads("[" + run.group().rstrip(" \t\n\r")[:-1] + "]"))
                pos = _ws.match(text, run.end()).end()  # type: ignore[union-attr]
                continue
            except ValueError:
                # An invalid scalar (01, 1.2.3) within this window: one by one from here, so the
                # error says where; it is at most a window away, and ends the parse.
                runs = False
        value, pos = _value(text, pos, depth + 1)
        out.append(value)
        pos = _ws.match(text, pos).end()  # type: ignore[union-attr]
        sep = text[pos : pos + 1]
        if sep == "]":
            return out, pos + 1
        if sep != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _ws.match(text, pos + 1).end()  # type: ignore[union-attr]


def _object(text: str, pos: int, depth: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    pos = _ws.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "}":
        return out, pos + 1
    while True:
        if text[pos : pos + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        key, pos = _decoder.raw_decode(text, pos)
        pos = _ws.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        value, pos = _value(text, _ws.match(text, pos + 1).end(), depth + 1)  # type: ignore[union-attr]
        out[key] = value
        pos = _ws.match(text, pos).end()  # type: ignore[union-attr]
        sep = text[pos : pos + 1]
        if sep == "}":
            return out, pos + 1
        if sep != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _ws.match(text, pos + 1).end()  # type: ignore[union-attr]


class TooLarge(Exception):
    """The encoded answer passed the byte limit (`written` bytes so far)."""

    def __init__(self, written: int) -> None:
        super().__init__(written)
        self.written = written


class _Out:
    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(self.size)
        self.parts.append(data)


def encode_arrays(meta: dict[str, Any], arrays: dict[str, np.ndarray], limit: int) -> bytes:
    """`json.dumps({**meta, **arrays as lists})` in steps, compact; raises TooLarge past
    `limit` bytes and ValueError on a NaN or infinity (never valid JSON).

    The arrays are written by orjson a slab of rows at a time, floats as float64: a float32
    value prints with the digits `float(value)` has, as `tolist()` and the stdlib wrote them
    (float32's own shortest digits would be other numbers to a float64 reader); only the
    spelling of small and large ones differs (`1e-5`, `0.00002878…` for `1e-05`, `2.878…e-05`)."""
    out = _Out(limit)
    out.add(json.dumps(meta, allow_nan=False, separators=(",", ":"))[:-1].encode() if meta else b"{")
    for i, (key, array) in enumerate(arrays.items()):
        out.add(("," if meta or i else "").encode() + json.dumps(key).encode() + b":")
        _encode(array, out)
    out.add(b"}")
    return b"".join(out.parts)


def _dumps(a: np.ndarray) -> bytes:
    if a.ndim == 0:  # a scalar (orjson would write a 0-d array as a list)
        return json.dumps(a.tolist(), allow_nan=False).encode()
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("Out of range float values are not JSON compliant")
        a = a.astype(np.float64, copy=False)
    elif a.dtype.kind not in "iub":
        return json.dumps(a.tolist(), allow_nan=False, separators=(",", ":")).encode()
    return orjson.dumps(np.ascontiguousarray(a), option=orjson.OPT_SERIALIZE_NUMPY)


def _encode(a: np.ndarray, out: _Out) -> None:
    if a.ndim <= 1 or a.size <= FLOATS_PER_STEP:
        out.add(_dumps(a))
        return
    row = a[0].size
    out.add(b"[")
    if row > FLOATS_PER_STEP:
        for i in range(len(a)):
            if i:
                out.add(b",")
            _encode(a[i], out)
    else:
        step = FLOATS_PER_STEP // max(row, 1)
        for i in range(0, len(a), step):
            if i:
                out.add(b",")
            out.add(_dumps(a[i : i + step])[1:-1])
    out.add(b"]")
