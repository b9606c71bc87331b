"""JSON answers are written a slab at a time at native speed, with the numbers the stdlib wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zmem_service.http.jsonchunks import FLOATS_PER_STEP, TooLarge, encode_arrays


def stdlib(meta: dict[str, object], arrays: dict[str, np.ndarray]) -> object:
    return json.loads(json.dumps({**meta, **{k: a.tolist() for k, a in arrays.items()}}))


def test_every_float32_reads_back_as_the_float_the_stdlib_wrote() -> None:
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, 1.0, 0.1, 1e-5, 1e16, 3.4e38, 1.4e-45, -2.5], np.float32)
    floats = np.concatenate([pattern[np.isfinite(pattern)], edges])
    answer = json.loads(encode_arrays({}, {"x": floats}, 1 << 30))["x"]
    assert answer == floats.tolist()  # exact float64 equality, number by number
    assert (np.signbit(np.array(answer)) == np.signbit(floats)).all()  # -0.0 stays -0.0


@pytest.mark.parametrize(
    "shape", [(), (2, 0, 3), (0,), (0, 5), (3,), (257, 64, 32), (3, FLOATS_PER_STEP + 1), (5, 7)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.bool_])
def test_answers_equal_the_stdlib_for_every_shape_and_dtype(shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(1)
    arrays = {"z": (rng.standard_normal(shape) * 100).astype(dtype), "seq": np.arange(4, dtype=np.int64)}
    meta = {"size": 3, "active": True, "sigma": 0.5, "k": None}
    encoded = encode_arrays(meta, arrays, 1 << 30)
    assert json.loads(encoded) == stdlib(meta, arrays)
    if not shape:
        return
    strided = arrays["z"][..., ::2]  # a view that is not contiguous
    assert json.loads(encode_arrays({}, {"z": strided}, 1 << 30)) == stdlib({}, {"z": strided})


def test_past_the_limit_and_on_non_finite_numbers_the_encoder_stops() -> None:
    z = np.ones((256, 64, 32), np.float32)
    with pytest.raises(TooLarge) as caught:
        encode_arrays({"size": 1}, {"z": z}, 100_000)
    assert 100_000 < caught.value.written < 100_000 + 8 * FLOATS_PER_STEP  # stopped within a slab
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError):
            encode_arrays({}, {"z": np.array([[1.0, bad]], np.float32)}, 1 << 20)
