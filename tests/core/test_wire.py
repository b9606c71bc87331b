"""The safetensors body format both sides speak (`zmem_core.wire`): round trips, and what a
reader refuses, in the order the service reports it (400 before 422)."""

from __future__ import annotations

import contextlib
import json
import math
import struct

import numpy as np
import pytest
import safetensors.numpy

from zmem_core import wire

META = {"k": 64, "sigma": "auto", "record": True, "id": ["a", "b\u00e9"], "none": None, "x": 0.25}


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "z": rng.standard_normal((3, 5)).astype(np.float32),
        "seq": np.array([[1, 2], [3, 2**53], [7, 9]], np.int64),
        "risk": rng.standard_normal(3),
        "empty": np.zeros((2, 0), np.float32),
    }


def test_a_round_trip_keeps_arrays_dtypes_and_values() -> None:
    sent = arrays()
    tensors, meta = wire.decode(wire.encode(sent, META))
    assert meta == META
    assert tensors.keys() == sent.keys()
    for name, a in sent.items():
        assert tensors[name].dtype == a.dtype and tensors[name].shape == a.shape
        np.testing.assert_array_equal(tensors[name], a)


def test_the_body_is_plain_safetensors_with_json_literal_metadata() -> None:
    """Any safetensors reader takes it; each metadata value is the JSON text of the value."""
    body = wire.encode({"z": np.ones((1, 2), np.float32)}, {"k": 7, "sigma": "auto"})
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + n])
    assert header["__metadata__"] == {"k": "7", "sigma": '"auto"'}
    assert header["z"]["dtype"] == "F32"
    np.testing.assert_array_equal(safetensors.numpy.load(body)["z"], np.ones((1, 2), np.float32))


def test_non_contiguous_arrays_are_written_as_their_values() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2].T
    tensors, _ = wire.decode(wire.encode({"v": view}, {}))
    np.testing.assert_array_equal(tensors["v"], view)


def test_nan_metadata_only_when_asked_for() -> None:
    """The service never writes NaN (it is not JSON); the client may pass one on for the service to refuse."""
    with pytest.raises(ValueError):
        wire.encode({}, {"sigma": math.nan})
    _, meta = wire.decode(wire.encode({}, {"sigma": math.nan}, allow_nan=True))
    assert math.isnan(meta["sigma"])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00" * 4,
        b"\xff" * 16,  # a header longer than the body
        struct.pack("<Q", 2) + b"{}" + b"junk",  # bytes no tensor claims
        struct.pack("<Q", 9) + b"not json!",
    ],
)
def test_what_is_not_safetensors(body: bytes) -> None:
    with pytest.raises(wire.NotSafetensors):
        wire.decode(body)


def test_a_tensor_of_another_dtype_is_named() -> None:
    body = wire.encode({"z": np.zeros((1, 2), np.float32), "seq": np.zeros(1, np.int64)}, {})
    assert wire.decode(body, ("F32", "I64"))[0].keys() == {"z", "seq"}
    with pytest.raises(wire.WrongDtype) as caught:
        wire.decode(body, ("F32",))
    assert (caught.value.name, caught.value.dtype) == ("seq", "I64")


def test_metadata_that_is_not_a_json_literal_is_named() -> None:
    for raw, reason in (("nope", "not a JSON literal"), ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        body = safetensors.numpy.save({"z": np.zeros(1, np.float32)}, metadata={"ok": "1", "bad": raw})
        with pytest.raises(wire.BadMetadata, match=reason) as caught:
            wire.decode(body)
        assert caught.value.key == "bad"


def test_an_unparseable_body_is_reported_before_its_dtypes_and_metadata() -> None:
    body = safetensors.numpy.save({"seq": np.zeros(1, np.int64)}, metadata={"bad": "nope"})
    with pytest.raises(wire.WrongDtype):  # the dtype before the metadata
        wire.decode(body, ("F32",))
    with pytest.raises(wire.NotSafetensors):  # the body before either
        wire.decode(body[:-1], ("F32",))


def test_a_remembered_header_reads_as_a_new_one() -> None:
    """A header read before is not parsed again: the same answers, the same refusals, and no
    caller can change what the next one reads."""
    body = wire.encode({"z": np.ones((1, 3), np.float32)}, {"k": 5, "record": True, "worker": "w1"})
    first = wire.decode(body, ("F32",))
    assert bytes(body[8 : 8 + struct.unpack("<Q", body[:8])[0]]) in wire._HEADERS
    first[1]["k"] = 99
    tensors, meta = wire.decode(body, ("F32",))
    assert meta == {"k": 5, "record": True, "worker": "w1"}
    np.testing.assert_array_equal(tensors["z"], np.ones((1, 3), np.float32))
    with pytest.raises(wire.WrongDtype):  # dtypes are checked per call
        wire.decode(body, ("I64",))
    with pytest.raises(wire.NotSafetensors):  # and the body too
        wire.decode(body[:-1], ("F32",))


def test_headers_with_lists_or_bad_metadata_are_not_remembered() -> None:
    listed = wire.encode({"z": np.ones(1, np.float32)}, {"id": ["a"]})
    bad = safetensors.numpy.save({"z": np.zeros(1, np.float32)}, metadata={"bad": "nope"})
    for body in (listed, bad, listed, bad):
        before = dict(wire._HEADERS)
        with contextlib.suppress(wire.BadMetadata):
            wire.decode(body)
        assert dict(wire._HEADERS) == before
    assert wire.decode(listed)[1] == {"id": ["a"]}
