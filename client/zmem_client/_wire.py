"""safetensors bodies: arrays as F32 tensors, everything else as JSON literals in metadata."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import safetensors.numpy

SAFETENSORS = "application/x-safetensors"


def encode(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    return safetensors.numpy.save(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        metadata={k: json.dumps(v) for k, v in meta.items()},
    )


def decode(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    (n,) = struct.unpack("<Q", body[:8])
    meta = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
    return safetensors.numpy.load(body), {k: json.loads(v) for k, v in meta.items()}
