"""The shared limits (`zmem_core.limits`): their checks at the boundary, and the service's
settings and the client's checks drawing the same lines."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pydantic
import pytest

from zmem_client import ZMemClient
from zmem_core.limits import (
    MAX_BATCH,
    MAX_CAPACITY,
    MAX_ID_CHARS,
    MAX_K,
    MAX_SIGMA,
    MAX_SQNORM,
    MAX_WORKER_CHARS,
    MAX_Z_DIM,
    MIN_SIGMA,
    rows_too_large,
    text_problem,
)
from zmem_service.settings import MemorySettings, MemorySettingsIn, ServiceSettings


def test_the_squared_norm_bound_keeps_every_distance_finite_in_float32() -> None:
    """Two admissible z's at opposite ends: their squared distance (≤ 4 · MAX_SQNORM) fits float32."""
    x = np.float32(math.sqrt(MAX_SQNORM))
    a, b = np.array([x], np.float32), np.array([-x], np.float32)
    with np.errstate(over="raise"):
        assert np.isfinite(((a - b) ** 2).sum(dtype=np.float32))


def test_rows_too_large_at_the_boundary() -> None:
    edge = np.float32(math.sqrt(MAX_SQNORM))
    while float(edge) ** 2 > MAX_SQNORM:  # the largest float32 whose square is admitted
        edge = np.nextafter(edge, np.float32(0))
    over = np.nextafter(edge, np.float32(np.inf))
    z = np.array([[edge, 0.0], [over, 0.0], [np.inf, 0.0], [np.nan, 1.0], [1.0, 1.0]], np.float32)
    # Non-finite rows are someone else's error ("must be finite"), never "too large".
    assert rows_too_large(z).tolist() == [1]
    assert rows_too_large(np.zeros((0, 3), np.float32)).tolist() == []


@pytest.mark.parametrize(
    ("text", "allow_empty", "problem"),
    [
        (None, False, None),
        ("w", False, None),
        ("x" * MAX_ID_CHARS, False, None),
        ("x" * (MAX_ID_CHARS + 1), False, f"must be 1..{MAX_ID_CHARS} characters"),
        ("", False, f"must be 1..{MAX_ID_CHARS} characters"),
        ("", True, None),
        ("a\x00b", True, "must not contain NUL"),
        ("a\ud800", True, "must be valid Unicode text (no lone surrogates)"),
    ],
)
def test_text_problem(text: str | None, allow_empty: bool, problem: str | None) -> None:
    assert text_problem(text, MAX_ID_CHARS, allow_empty=allow_empty) == problem


def test_the_service_settings_draw_the_same_lines() -> None:
    assert ServiceSettings().max_batch == MAX_BATCH
    MemorySettings(z_dim=MAX_Z_DIM, capacity=MAX_CAPACITY, k=MAX_K, sigma=MAX_SIGMA)
    MemorySettings(sigma=MIN_SIGMA)
    for bad in ({"z_dim": MAX_Z_DIM + 1}, {"capacity": MAX_CAPACITY + 1}, {"k": MAX_K + 1}):
        with pytest.raises(pydantic.ValidationError):
            MemorySettingsIn.model_validate(bad)
    for sigma in (MIN_SIGMA / 2, MAX_SIGMA * 2):
        with pytest.raises(pydantic.ValidationError):
            MemorySettings(sigma=sigma)


@pytest.fixture
def offline() -> Iterator[ZMemClient]:
    c = ZMemClient("http://zmem.test")
    yield c
    c.close()


def test_the_client_refuses_what_the_service_would(offline: ZMemClient) -> None:
    ok = {"soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
    with pytest.raises(ValueError, match="too large"):
        offline.record(np.array([1e19, 1e19], np.float32), **ok)
    with pytest.raises(ValueError, match=f"id must be 1..{MAX_ID_CHARS} characters"):
        offline.record(np.ones(2, np.float32), id="x" * (MAX_ID_CHARS + 1), **ok)
    with pytest.raises(ValueError, match=f"worker must be 1..{MAX_WORKER_CHARS} characters"):
        offline.record(np.ones(2, np.float32), worker="w" * (MAX_WORKER_CHARS + 1), **ok)
    with pytest.raises(ValueError, match="worker must not contain NUL"):
        offline.record(np.ones(2, np.float32), worker="a\x00", **ok)
    with pytest.raises(ValueError, match=f"batch_size in 1..{MAX_BATCH}"):
        ZMemClient("http://zmem.test", batch_size=MAX_BATCH + 1)
