"""The limits both sides enforce (SPEC §5), so that the client refuses what the service would.

Past any of them the service answers 4xx; the client checks what it can before sending
(in `record()`, the constructor and the replica's feed), with the same numbers from here.
"""

from __future__ import annotations

import numpy as np

MAX_BATCH = 10_000
"""Episodes or query rows in one request: the default of the service's `max_batch` setting,
and the most the client puts in one request."""
MAX_K = 1024
MAX_Z_DIM = 4096
MAX_CAPACITY = 10_000_000
MIN_SIGMA, MAX_SIGMA = 1e-12, 1e12
"""σ outside this range makes σ² leave the normal float64 range, and the kernel 0/0."""
MAX_SQNORM = float(np.finfo(np.float32).max) / 4
"""The largest squared norm of a stored or query z: then |a − b|² ≤ (|a| + |b|)² ≤ float32 max
for any two admissible z's, so distances (and σ, and the kernel) stay finite in float32."""
MAX_ID_CHARS = 128
MAX_WORKER_CHARS = 64


def rows_too_large(z: np.ndarray) -> np.ndarray:
    """Indices of the finite rows of z [B, d] whose squared norm (in float64) exceeds MAX_SQNORM."""
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", z, z, dtype=np.float64)
    return np.flatnonzero(np.isfinite(sq) & (sq > MAX_SQNORM))


def text_problem(text: str | None, limit: int, *, allow_empty: bool) -> str | None:
    """Why `text` can't be an id (limit MAX_ID_CHARS) or a worker name (MAX_WORKER_CHARS):
    too long, empty where that isn't allowed, a NUL, or not encodable as UTF-8 (a lone
    surrogate); None when it can (and for None)."""
    if text is None:
        return None
    if len(text) > limit or (not text and not allow_empty):
        return f"must be {0 if allow_empty else 1}..{limit} characters"
    if "\x00" in text:
        return "must not contain NUL"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None
