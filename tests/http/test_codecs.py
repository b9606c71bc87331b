"""The edge's safetensors writer: what `zmem_core.wire` (and the safetensors library) read back."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from zmem_core import wire
from zmem_service.http.codecs import encode_safetensors

rng = np.random.default_rng(0)
CASES: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = [
    (
        {
            "z": rng.random((2, 64, 32), np.float32),
            "risk_target": rng.random((2, 64), np.float32),
            "d2": rng.random((2, 64), np.float32),
            "seq": np.arange(128, dtype=np.int64).reshape(2, 64),
        },
        {"size": 50_000, "active": True, "k": 64, "sigma": 1.0},
    ),
    ({"risk": np.float32(0.25).reshape(())}, {"size": 3, "active": False, "sigma": "auto"}),
    ({"z": np.zeros((3, 0, 4), np.float32), "seq": np.zeros((3, 0), np.int64)}, {"k": 0}),
    ({"a": np.ones(5, np.float32)[::2], "b": np.arange(3, dtype=">f4")}, {}),
    ({}, {"x": None, "s": 'a"b\\\\c', "l": [1, "two"], "f": 1e-300, "big": 10**30, "g": np.float64(2.5)}),
    ({}, {}),
]


@pytest.mark.parametrize("arrays, meta", CASES)
def test_answers_read_back_as_written(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    for _ in range(2):  # the second time from the cached tensor header
        body = encode_safetensors(arrays, meta)
        tensors, got = wire.decode(body, ("F32", "I64"))
        assert got == meta
        assert tensors.keys() == arrays.keys()
        for name, a in arrays.items():
            assert tensors[name].shape == a.shape and np.array_equal(tensors[name], a), name
        assert safetensors.numpy.load(body).keys() == arrays.keys()
        assert (8 + int.from_bytes(body[:8], "little")) % 8 == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metadata_value_is_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        encode_safetensors({}, {"sigma": bad})
