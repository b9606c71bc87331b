"""A memory's stats: per-field summaries over a sample of its rows.

Taking the sample reads the ring, so the owning `Memory` calls `sample` with its lock
held; `summaries` works on that copy alone and runs after the lock is released.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ring import FLOAT_FIELDS, Ring

STATS_SAMPLE = 10_000
"""Stats summarise at most this many episodes (evenly spread over arrival order)."""
SUMMARISED = (*FLOAT_FIELDS, "risk_target")
"""The fields summarised, besides the norm of z."""


def sample(ring: Ring | None) -> dict[str, Any] | None:
    """A copy of at most STATS_SAMPLE rows spread evenly over arrival order (all of them when
    the ring holds fewer): each summarised field, "z_norm", and the seq and ts ranges of
    the rows held; None when the ring holds nothing. Reads the ring: its owner's lock held."""
    if ring is None or not ring.size:
        return None
    order = ring.order()
    picked = order[np.unique(np.linspace(0, len(order) - 1, STATS_SAMPLE).astype(np.int64))]
    out: dict[str, Any] = {f: ring.column(f)[picked] for f in SUMMARISED}
    out["z_norm"] = np.linalg.norm(ring.column("z")[picked], axis=1)
    ends = order[[0, -1]]
    out["seq_range"] = [int(s) for s in ring.column("seq")[ends]]
    out["ts_range"] = [float(t) for t in ring.column("ts")[ends]]
    return out


def summaries(picked: dict[str, Any] | None) -> dict[str, Any]:
    """The stats' summary keys for a `sample` (None: the memory holds nothing)."""
    return {
        "seq_range": picked["seq_range"] if picked else None,
        "ts_range": picked["ts_range"] if picked else None,
        "summary_sample": len(picked["z_norm"]) if picked else 0,
        "fields": {f: summary(picked[f]) if picked else None for f in SUMMARISED},
        "z_norm": summary(picked["z_norm"]) if picked else None,
    }


def summary(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    q = np.percentile(x.astype(np.float64), [0, 50, 100])
    return {
        "min": float(q[0]),
        "median": float(q[1]),
        "max": float(q[2]),
        "mean": float(x.mean(dtype=np.float64)),
        "std": float(x.std(dtype=np.float64)),
    }
