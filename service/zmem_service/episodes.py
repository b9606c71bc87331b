"""Episode batches as they arrive, and the checks every batch passes before it is written.

Both wire formats decode into an `EpisodeBatch`; `validate` names the first invalid
field of each bad episode (`["episodes", i, field]`) so a client can fix its data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zmem_core.limits import (
    MAX_ID_CHARS,
    MAX_SQNORM,
    MAX_WORKER_CHARS,
    MAX_Z_DIM,
    rows_too_large,
    text_problem,
)

from .errors import ValidationFailed
from .ring import FLOAT_FIELDS
from .settings import RiskWeights

MAX_ERRORS = 20
Z_TOO_LARGE = f"squared norm must be at most {MAX_SQNORM:.3g} (float32 max / 4), so distances stay finite"


@dataclass
class EpisodeBatch:
    """z float32 [B, d]; `values[field]` float32 [B] for each of FLOAT_FIELDS; ids and workers [B]."""

    z: np.ndarray
    values: dict[str, np.ndarray]
    ids: list[str | None]
    workers: list[str | None]

    def __len__(self) -> int:
        return int(self.z.shape[0])

    def risk_targets(self, w: RiskWeights) -> np.ndarray:
        """r = a·(1 − soft_bind) + b·log(cone_vol + eps) + c·lambda_bind, float32 [B]."""
        v = self.values
        soft, cone, lam = (v[f].astype(np.float64) for f in ("soft_bind", "cone_vol", "lambda_bind"))
        r = w.a * (1.0 - soft) + w.b * np.log(cone + w.eps) + w.c * lam
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 → inf, refused by the caller
            return r.astype(np.float32)


def validate(batch: EpisodeBatch, *, max_batch: int) -> None:
    """Raise ValidationFailed listing each invalid episode field; return when all are fine."""
    n = len(batch)
    if n > max_batch:
        raise ValidationFailed.at(["episodes"], f"{n} episodes in one request; the limit is {max_batch}")
    if n == 0:
        return
    if batch.z.ndim != 2 or batch.z.shape[1] < 1 or batch.z.shape[1] > MAX_Z_DIM:
        raise ValidationFailed.at(["episodes", "z"], f"z must be [B, d] with 1 <= d <= {MAX_Z_DIM}")
    errors: list[dict] = []

    def bad(rows: np.ndarray, field: str, msg: str) -> None:
        errors.extend({"loc": ["episodes", int(i), field], "msg": msg} for i in rows[:MAX_ERRORS])

    bad(
        np.flatnonzero(~np.isfinite(batch.z).all(axis=1)),
        "z",
        "must be finite float32 (no NaN, inf or |x| > 3.4e38)",
    )
    bad(rows_too_large(batch.z), "z", Z_TOO_LARGE)
    for field in FLOAT_FIELDS:
        col = batch.values[field]
        bad(np.flatnonzero(~np.isfinite(col)), field, "must be a finite float32 number")
    soft, cone, lam = batch.values["soft_bind"], batch.values["cone_vol"], batch.values["lambda_bind"]
    with np.errstate(invalid="ignore"):
        bad(np.flatnonzero((soft < 0) | (soft > 1)), "soft_bind", "must be in [0, 1]")
        bad(np.flatnonzero(cone <= 0), "cone_vol", "must be > 0 (the risk target takes its log)")
        bad(np.flatnonzero(lam < 0), "lambda_bind", "must be >= 0")
    seen: dict[str, int] = {}
    for i, (id_, worker) in enumerate(zip(batch.ids, batch.workers, strict=True)):
        if id_ is not None:
            problem = text_problem(id_, MAX_ID_CHARS, allow_empty=False)
            if problem:
                bad(np.array([i]), "id", problem)
            elif id_ in seen:
                bad(np.array([i]), "id", f"repeats the id of episode {seen[id_]} in this request")
            seen.setdefault(id_, i)
        problem = text_problem(worker, MAX_WORKER_CHARS, allow_empty=True)
        if worker is not None and problem:
            bad(np.array([i]), "worker", problem)
    if errors:
        errors.sort(key=lambda e: (e["loc"][1], e["loc"][2]))
        first = errors[0]
        detail = f"episodes.{first['loc'][1]}.{first['loc'][2]}: {first['msg']}"
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
        raise ValidationFailed(detail, errors=errors[:MAX_ERRORS])
