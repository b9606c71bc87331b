"""safetensors bodies as both sides write and read them (SPEC §2).

Arrays travel as tensors named like the JSON fields (F32, and I64 for seqs); every
other value travels in `__metadata__` as a JSON literal (`64`, `"auto"`, `["a", "b"]`).
This module needs safetensors (in both the client and the service extras), so
`zmem_core` does not import it: import `zmem_core.wire` where it is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from typing import Any

import numpy as np
import safetensors.numpy

SAFETENSORS = "application/x-safetensors"


class NotSafetensors(ValueError):
    """The body is not a safetensors file (bad header, offsets or data)."""


class WrongDtype(ValueError):
    """A tensor of a dtype the reader does not take; `name` is the tensor, `dtype` its dtype."""

    def __init__(self, name: str, dtype: Any) -> None:
        super().__init__(f"{name}: tensor is {dtype}")
        self.name, self.dtype = name, dtype


class BadMetadata(ValueError):
    """A `__metadata__` value that is not a JSON literal; `key` names it, `reason` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def encode(arrays: dict[str, np.ndarray], meta: dict[str, Any], *, allow_nan: bool = False) -> bytes:
    """A safetensors body: `arrays` as tensors of their own dtypes (copied only where not
    C-contiguous), `meta` values as JSON literals. A NaN or infinity in `meta` raises
    ValueError unless `allow_nan` (then it is written as JSON's non-standard `NaN`)."""
    return safetensors.numpy.save(
        {k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={k: json.dumps(v, allow_nan=allow_nan) for k, v in meta.items()},
    )


SMALL_HEADER = 1024
"""Headers up to this many bytes are remembered once read (`_HEADERS`)."""
_HEADERS: dict[bytes, tuple[tuple[tuple[str, Any], ...], dict[str, Any]]] = {}
"""Small headers read before: their tensors' (name, dtype) and their metadata values when all
are scalars. A worker's queries repeat one header (the same shape and options), so each is
parsed once."""
_SCALARS = (bool, int, float, str, type(None))


def decode(
    body: bytes, dtypes: Collection[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and the decoded `__metadata__` values of a safetensors body.

    `dtypes` (safetensors names: "F32", "I64", …), when given, are the only tensor dtypes
    taken. Raises, in this order: NotSafetensors, WrongDtype (the first such tensor),
    BadMetadata (the first such value); all are ValueErrors.
    """
    try:
        (n,) = struct.unpack("<Q", body[:8])
        text = body[8 : 8 + n]
        small = n <= SMALL_HEADER
        seen = _HEADERS.get(text) if small else None
        header = json.loads(text) if seen is None else None
        tensors = safetensors.numpy.load(body)
    except Exception as e:  # whatever the parser trips on, the body is not safetensors
        raise NotSafetensors(str(e)) from None
    if seen is None:
        assert header is not None
        specs = tuple((name, spec.get("dtype")) for name, spec in header.items() if name != "__metadata__")
    else:
        specs = seen[0]
    if dtypes is not None:
        for name, dtype in specs:
            if dtype not in dtypes:
                raise WrongDtype(name, dtype)
    if seen is not None:
        return tensors, dict(seen[1])
    assert header is not None
    meta = _metadata(header.get("__metadata__") or {})
    if small and all(isinstance(v, _SCALARS) for v in meta.values()):
        if len(_HEADERS) >= 256:
            _HEADERS.clear()
        _HEADERS[text] = (specs, dict(meta))
    return tensors, meta


def _metadata(texts: dict[str, str]) -> dict[str, Any]:
    meta = {}
    for key, text in texts.items():
        try:
            meta[key] = json.loads(text)
        except ValueError:
            raise BadMetadata(key, "metadata value is not a JSON literal") from None
        except RecursionError:
            raise BadMetadata(key, "metadata value is nested too deeply") from None
    return meta
