"""Malformed requests (SPEC §2 errors, §5 limits): the right 4xx, as problem+json, and nothing changes.

Every case runs against a fresh in-process app holding memory `m` (z_dim 4, 300
episodes, so it is active). The service state (the memory listing, each memory's
counters and its `/export` bytes) is captured before and after the bad request and
must be identical: a rejected request changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy

Z_DIM = 4
N_STORED = 300
MEM = "/memories/m"
EPISODES = f"{MEM}/episodes"
NEIGHBORS = f"{MEM}/neighbors"
SAFETENSORS = "application/x-safetensors"
PROBLEM = "application/problem+json"
DROP = object()  # in `batch(...)` overrides: remove the field


# -- request builders ----------------------------------------------------------------------------


def episode(i: int, **over: Any) -> dict[str, Any]:
    """A valid episode (z_dim 4), deterministic in `i`; `over` replaces (or with DROP removes) fields."""
    rng = np.random.default_rng(i)
    ep: dict[str, Any] = {
        "z": rng.normal(size=Z_DIM).round(4).tolist(),
        "soft_bind": round(float(rng.uniform(0, 1)), 3),
        "cone_vol": round(float(rng.uniform(0, 2)), 3),
        "lambda_bind": round(float(rng.uniform(0, 1)), 3),
        "id": f"ep-{i}",
        "worker": f"w{i % 3}",
    }
    for key, value in over.items():
        if value is DROP:
            ep.pop(key, None)
        else:
            ep[key] = value
    return ep


def batch(n: int = 5, bad: int | None = None, **over: Any) -> dict[str, Any]:
    """`n` new valid episodes; episode `bad` gets the overrides."""
    eps = [episode(10_000 + i) for i in range(n)]
    if bad is not None:
        eps[bad] = episode(10_000 + bad, **over)
    return {"episodes": eps}


def raw(value: Any) -> bytes:
    """JSON text as Python writes it: NaN and Infinity come out as the bare tokens."""
    return json.dumps(value).encode()


def st_episodes(
    n: int = 4,
    *,
    z_dtype: Any = np.float32,
    drop: tuple[str, ...] = (),
    raw_meta: dict[str, str] | None = None,
    **meta: Any,
) -> bytes:
    """A columnar safetensors episodes body; `meta` go to `__metadata__` as JSON literals."""
    rng = np.random.default_rng(7)
    tensors = {
        "z": rng.normal(size=(n, Z_DIM)).astype(z_dtype),
        "soft_bind": rng.uniform(0, 1, n).astype(np.float32),
        "cone_vol": rng.uniform(0, 2, n).astype(np.float32),
        "lambda_bind": rng.uniform(0, 1, n).astype(np.float32),
    }
    for name in drop:
        del tensors[name]
    return st_body(tensors, raw_meta=raw_meta, **meta)


def st_body(tensors: dict[str, np.ndarray], *, raw_meta: dict[str, str] | None = None, **meta: Any) -> bytes:
    """safetensors bytes; `meta` values are JSON-encoded, `raw_meta` values sent as they are."""
    metadata = {**{k: json.dumps(v) for k, v in meta.items()}, **(raw_meta or {})}
    return safetensors.numpy.save(tensors, metadata=metadata or None)


def st_with(**tensors: np.ndarray) -> bytes:
    """The default 4-row safetensors episodes with some tensors replaced."""
    loaded = safetensors.numpy.load(st_episodes())
    loaded.update(tensors)
    return st_body(loaded)


def st_nan_row(row: int) -> bytes:
    z = safetensors.numpy.load(st_episodes())["z"].copy()
    z[row, 1] = np.nan
    return st_with(z=z)


def chunks(data: bytes, size: int = 512) -> Callable[[httpx.Client], Iterator[bytes]]:
    """A body sent without content-length (chunked), so the limit is enforced while reading."""
    return lambda _client: (data[i : i + size] for i in range(0, len(data), size))


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    body: Any = None  # a JSON value, raw bytes, or a callable(client) -> bytes | iterator
    method: str = "POST"
    path: str = EPISODES
    content_type: str | None = "application/json"
    loc: tuple[Any, ...] | None = None  # some error's loc starts with this
    settings: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None


def _assert_in(part: str, text: str) -> None:
    assert part in text and "more)" not in text, text


def check_conflict(problem: dict[str, Any]) -> None:
    conflicts = {c["field"]: c for c in problem["conflicts"]}
    assert set(conflicts) == {"z_dim", "k"}, problem
    assert (conflicts["z_dim"]["stored"], conflicts["z_dim"]["requested"]) == (4, 8)
    assert (conflicts["k"]["stored"], conflicts["k"]["requested"]) == (64, 3)
    assert "z_dim" in problem["detail"] and "k" in problem["detail"]


def export_of_m(client: httpx.Client) -> bytes:
    return client.get(f"{MEM}/export").content


ST = SAFETENSORS
SMALL_BODY = {"max_body_bytes": 2048}
SIXTY_FIVE = "a" * 65
DEEP = b"[" * 100_000

CASES: list[Case | Any] = [
    # 400: the body cannot be parsed
    Case("not_json", 400, b"{not json"),
    Case("empty_body", 400, b""),
    Case("invalid_utf8", 400, b'\xff\xfe{"episodes": []}'),
    Case("utf8_bom", 400, b'\xef\xbb\xbf{"episodes": []}'),  # UTF-8 without a BOM, at any size
    Case("utf16", 400, '{"episodes": []}'.encode("utf-16-le")),
    Case("truncated_json", 400, raw(batch())[:-7]),
    Case("neighbors_not_json", 400, b"z=1,2,3,4", path=NEIGHBORS),
    Case("put_not_json", 400, b"{", method="PUT", path=MEM),
    Case("st_garbage", 400, b"garbage bytes, not safetensors", content_type=ST),
    Case("st_header_too_large", 400, b"\xff" * 8 + b"{}", content_type=ST),
    Case("st_truncated", 400, st_episodes()[:-10], content_type=ST),
    Case("json_sent_as_safetensors", 400, raw(batch()), content_type=ST),
    # 422: episodes that parse but are invalid
    Case("json_array_not_object", 422, [1, 2], loc=()),
    Case("json_null", 422, None, loc=()),  # sends the JSON literal `null`
    Case("missing_episodes", 422, {}, loc=("episodes",)),
    Case("episodes_not_a_list", 422, {"episodes": {"z": [1, 2, 3, 4]}}, loc=("episodes",)),
    Case("episode_not_an_object", 422, {"episodes": [episode(1), None]}, loc=("episodes", 1)),
    Case("missing_soft_bind", 422, batch(bad=2, soft_bind=DROP), loc=("episodes", 2, "soft_bind")),
    Case("missing_z", 422, batch(bad=1, z=DROP), loc=("episodes", 1, "z")),
    Case("missing_lambda_bind", 422, batch(bad=4, lambda_bind=DROP), loc=("episodes", 4, "lambda_bind")),
    Case(
        "wrong_z_dim_whole_batch",
        422,
        {"episodes": [episode(i, z=[0.1] * 5) for i in range(3)]},
        loc=("episodes", 0, "z"),
    ),
    Case("wrong_z_dim_in_middle", 422, batch(bad=2, z=[0.1] * 5), loc=("episodes", 2, "z")),
    Case("ragged_z", 422, batch(bad=3, z=[0.1, 0.2]), loc=("episodes", 3, "z")),
    Case("z_empty", 422, batch(n=1, bad=0, z=[]), loc=("episodes",)),
    Case(
        "z_dim_over_limit_new_memory",
        422,
        {"episodes": [episode(1, z=[0.0] * 4097)]},
        path="/memories/fresh/episodes",
        loc=("episodes",),
    ),
    Case("nan_in_z", 422, raw(batch(bad=2, z=[0.0, float("nan"), 0.0, 0.0])), loc=("episodes", 2, "z")),
    Case("infinity_cone_vol", 422, raw(batch(bad=1, cone_vol=float("inf"))), loc=("episodes", 1, "cone_vol")),
    Case("minus_infinity_E_T", 422, raw(batch(bad=3, E_T=float("-inf"))), loc=("episodes", 3, "E_T")),
    Case(
        "overflowing_literal",
        422,
        raw(batch(bad=1, soft_bind=12345.0)).replace(b"12345.0", b"1e999"),  # parses as inf
        loc=("episodes", 1, "soft_bind"),
    ),
    Case("negative_cone_vol", 422, batch(bad=3, cone_vol=-0.01), loc=("episodes", 3, "cone_vol")),
    Case(  # the seed's design: cone_vol > 0 (log(0 + eps) made it the most attractive point)
        "zero_cone_vol",
        422,
        batch(bad=2, cone_vol=0.0),
        loc=("episodes", 2, "cone_vol"),
        check=lambda p: _assert_in("cone_vol: must be > 0", p["detail"]),
    ),
    Case("soft_bind_above_1", 422, batch(bad=0, soft_bind=1.0001), loc=("episodes", 0, "soft_bind")),
    Case(  # import refuses it too, so an export of such a memory could not be restored
        "negative_lambda_bind", 422, batch(bad=1, lambda_bind=-5.0), loc=("episodes", 1, "lambda_bind")
    ),
    Case("soft_bind_below_0", 422, batch(bad=4, soft_bind=-0.5), loc=("episodes", 4, "soft_bind")),
    Case("string_for_number", 422, batch(bad=1, lambda_bind="high"), loc=("episodes", 1, "lambda_bind")),
    Case("string_in_z", 422, batch(bad=2, z=[0.0, "x", 0.0, 0.0]), loc=("episodes", 2, "z")),
    Case("z_not_a_list", 422, batch(bad=0, z="0,0,0,0"), loc=("episodes", 0, "z")),
    pytest.param(
        Case(
            "numeric_string_for_number", 422, batch(bad=1, soft_bind="0.5"), loc=("episodes", 1, "soft_bind")
        ),
        id="numeric_string_for_number",
    ),
    pytest.param(
        Case("bool_for_number", 422, batch(bad=2, cone_vol=True), loc=("episodes", 2, "cone_vol")),
        id="bool_for_number",
    ),
    Case("unknown_episode_field", 422, batch(bad=2, colour="red"), loc=("episodes", 2, "colour")),
    Case("unknown_top_level_field", 422, {**batch(), "colour": "red"}, loc=("colour",)),
    Case("id_too_long", 422, batch(bad=1, id="x" * 129), loc=("episodes", 1, "id")),
    Case("id_empty", 422, batch(bad=1, id=""), loc=("episodes", 1, "id")),
    Case("id_not_a_string", 422, batch(bad=0, id=12345), loc=("episodes", 0, "id")),
    Case("worker_too_long", 422, batch(bad=2, worker="w" * 65), loc=("episodes", 2, "worker")),
    Case("same_id_twice", 422, batch(bad=3, id="ep-10001"), loc=("episodes", 3, "id")),
    Case("batch_over_limit", 422, batch(n=6), settings={"max_batch": 5}, loc=("episodes",)),
    pytest.param(Case("deeply_nested_json", 400, DEEP), id="deeply_nested_json"),
    pytest.param(
        Case("deeply_nested_query", 400, b'{"z": ' + DEEP, path=NEIGHBORS),
        id="deeply_nested_query",
    ),
    pytest.param(
        Case(
            "z_beyond_float32",
            422,
            raw(batch(bad=1, z=[0.0, 12345.0, 0.0, 0.0])).replace(b"12345.0", b"1e39"),
            loc=("episodes", 1, "z"),
        ),
        id="z_beyond_float32",
    ),
    pytest.param(
        Case(
            "cone_vol_beyond_float32",
            422,
            raw(batch(bad=2, cone_vol=12345.0)).replace(b"12345.0", b"1e39"),
            loc=("episodes", 2, "cone_vol"),
        ),
        id="cone_vol_beyond_float32",
    ),
    pytest.param(
        Case("query_z_beyond_float32", 422, b'{"z": [0, 1e39, 0, 0]}', path=NEIGHBORS, loc=("z",)),
        id="query_z_beyond_float32",
    ),
    # 413: too large
    Case("oversize_body", 413, raw(batch(n=40)), settings=SMALL_BODY),
    Case("oversize_body_chunked", 413, chunks(raw(batch(n=40))), settings=SMALL_BODY),
    Case("oversize_neighbors_body", 413, {"z": [[0.5] * Z_DIM] * 200}, path=NEIGHBORS, settings=SMALL_BODY),
    Case("oversize_safetensors", 413, st_episodes(n=200), content_type=ST, settings=SMALL_BODY),
    # memory names in the path
    Case("name_encoded_slash", 404, batch(), path="/memories/..%2F/episodes"),
    Case("name_encoded_dotdot", 422, batch(), path="/memories/%2E%2E/episodes", loc=("path", "name")),
    Case("name_single_dot_encoded", 422, batch(), path="/memories/%2E/episodes", loc=("path", "name")),
    Case("name_leading_dash", 422, batch(), path="/memories/-bad/episodes", loc=("path", "name")),
    Case("name_65_chars", 422, batch(), path=f"/memories/{SIXTY_FIVE}/episodes", loc=("path", "name")),
    Case("name_with_space", 422, batch(), path="/memories/a%20b/episodes", loc=("path", "name")),
    Case("name_bad_on_read", 422, {"z": [0] * 4}, path="/memories/-bad/neighbors", loc=("path", "name")),
    Case("name_bad_on_put", 422, {"z_dim": 4}, method="PUT", path="/memories/-bad", loc=("path", "name")),
    # neighbors / risk queries
    Case("k_zero", 422, {"z": [0.0] * 4, "k": 0}, path=NEIGHBORS, loc=("k",)),
    Case("k_negative", 422, {"z": [0.0] * 4, "k": -1}, path=NEIGHBORS, loc=("k",)),
    Case("k_over_1024", 422, {"z": [0.0] * 4, "k": 1025}, path=NEIGHBORS, loc=("k",)),
    Case("k_fractional", 422, {"z": [0.0] * 4, "k": 2.5}, path=NEIGHBORS, loc=("k",)),
    Case("k_zero_query_param", 422, {"z": [0.0] * 4}, path=f"{NEIGHBORS}?k=0", loc=("k",)),
    Case("sigma_zero", 422, {"z": [0.0] * 4, "sigma": 0}, path=NEIGHBORS, loc=("sigma",)),
    Case("sigma_negative", 422, {"z": [0.0] * 4, "sigma": -1}, path=NEIGHBORS, loc=("sigma",)),
    Case("sigma_string", 422, {"z": [0.0] * 4, "sigma": "fast"}, path=NEIGHBORS, loc=("sigma",)),
    Case(  # the message names both forms instead of hiding "auto" behind "(and 1 more)"
        "sigma_capitalised_auto",
        422,
        {"z": [0.0] * 4, "sigma": "Auto"},
        path=NEIGHBORS,
        loc=("sigma",),
        check=lambda p: _assert_in('sigma: must be a positive number or "auto"', p["detail"]),
    ),
    Case(
        "sigma_capitalised_auto_query_param",
        422,
        {"z": [0.0] * 4},
        path=f"{NEIGHBORS}?sigma=Auto",
        loc=("sigma",),
        check=lambda p: _assert_in('a positive number or "auto"', p["detail"]),
    ),
    Case("sigma_infinity", 422, raw({"z": [0.0] * 4, "sigma": float("inf")}), path=NEIGHBORS, loc=("sigma",)),
    Case("query_z_wrong_dim", 422, {"z": [0.0] * 3}, path=NEIGHBORS, loc=("z",)),
    Case("query_z_empty", 422, {"z": []}, path=NEIGHBORS, loc=("z",)),
    Case("query_z_empty_rows", 422, {"z": [[], []]}, path=NEIGHBORS, loc=("z",)),
    Case("query_z_missing", 422, {"k": 3}, path=NEIGHBORS, loc=("z",)),
    Case("query_z_nan", 422, raw({"z": [0.0, float("nan"), 0.0, 0.0]}), path=NEIGHBORS, loc=("z",)),
    Case("query_z_ragged", 422, {"z": [[0.0] * 4, [0.0] * 3]}, path=NEIGHBORS, loc=("z",)),
    Case("query_unknown_field", 422, {"z": [0.0] * 4, "colour": 1}, path=NEIGHBORS, loc=("colour",)),
    Case("query_not_an_object", 422, [[0.0] * 4], path=NEIGHBORS, loc=()),
    Case("query_worker_too_long", 422, {"z": [0.0] * 4, "worker": "w" * 65}, path=NEIGHBORS, loc=("worker",)),
    Case("query_worker_a_number", 422, {"z": [0.0] * 4, "worker": 3}, path=NEIGHBORS, loc=("worker",)),
    Case("query_worker_nul", 422, {"z": [0.0] * 4, "worker": "w\x00"}, path=NEIGHBORS, loc=("worker",)),
    Case(
        "st_query_worker_a_list",
        422,
        st_body({"z": np.zeros((1, 4), np.float32)}, worker=["w"]),
        path=NEIGHBORS,
        content_type=ST,
        loc=("worker",),
    ),
    Case(
        "query_rows_over_limit",
        422,
        {"z": [[0.0] * 4] * 6},
        path=NEIGHBORS,
        settings={"max_batch": 5},
        loc=("z",),
    ),
    Case("risk_k_zero", 422, {"z": [0.0] * 4, "k": 0}, path=f"{MEM}/risk", loc=("k",)),
    Case("risk_z_wrong_dim", 422, {"z": [[0.0] * 5]}, path=f"{MEM}/risk", loc=("z",)),
    Case(
        "response_over_max_floats",
        422,
        {"z": [[0.0] * 4] * 10, "k": 64},  # 10 rows × 64 × 4 = 2560 floats
        path=NEIGHBORS,
        settings={"max_response_floats": 1000},
        loc=("k",),
    ),
    # unknown memories on reads
    Case("neighbors_unknown_memory", 404, {"z": [0.0] * 4}, path="/memories/nope/neighbors"),
    Case("risk_unknown_memory", 404, {"z": [0.0] * 4}, path="/memories/nope/risk"),
    Case("stats_unknown_memory", 404, method="GET", path="/memories/nope/stats", content_type=None),
    Case("export_unknown_memory", 404, method="GET", path="/memories/nope/export", content_type=None),
    Case("get_unknown_memory", 404, method="GET", path="/memories/nope", content_type=None),
    Case("delete_unknown_memory", 404, method="DELETE", path="/memories/nope", content_type=None),
    # memory settings
    Case(
        "put_min_size_over_capacity",
        422,
        {"z_dim": 4, "capacity": 5, "min_size": 6},
        method="PUT",
        path="/memories/x",
    ),
    Case(
        "put_capacity_zero",
        422,
        {"z_dim": 4, "capacity": 0},
        method="PUT",
        path="/memories/x",
        loc=("body", "capacity"),
    ),
    Case(
        "put_capacity_over_limit",
        422,
        {"capacity": 10_000_001},
        method="PUT",
        path="/memories/x",
        loc=("body", "capacity"),
    ),
    Case(
        "put_z_dim_over_limit", 422, {"z_dim": 4097}, method="PUT", path="/memories/x", loc=("body", "z_dim")
    ),
    Case("put_k_over_limit", 422, {"k": 1025}, method="PUT", path="/memories/x", loc=("body", "k")),
    Case("put_sigma_negative", 422, {"z_dim": 4, "sigma": -1}, method="PUT", path="/memories/x"),
    Case(
        "put_unknown_field",
        422,
        {"z_dim": 4, "colour": 1},
        method="PUT",
        path="/memories/x",
        loc=("body", "colour"),
    ),
    Case("put_conflict", 409, {"z_dim": 8, "k": 3}, method="PUT", path=MEM, check=check_conflict),
    # safetensors episodes
    Case("st_f64_z", 422, st_episodes(z_dtype=np.float64), content_type=ST, loc=("z",)),
    Case("st_f16_z", 422, st_episodes(z_dtype=np.float16), content_type=ST, loc=("z",)),
    Case("st_missing_soft_bind", 422, st_episodes(drop=("soft_bind",)), content_type=ST, loc=("soft_bind",)),
    Case("st_missing_z", 422, st_episodes(drop=("z",)), content_type=ST, loc=("z",)),
    Case("st_id_list_wrong_length", 422, st_episodes(id=["a", "b", "c"]), content_type=ST, loc=("id",)),
    Case("st_worker_not_strings", 422, st_episodes(worker=[1, 2, 3, 4]), content_type=ST, loc=("worker",)),
    Case("st_metadata_not_json", 422, st_episodes(raw_meta={"id": "not json"}), content_type=ST, loc=("id",)),
    Case(  # a misspelt optional field (HR for Hr) must not store zeros unseen
        "st_unknown_tensor", 422, st_with(HR=np.zeros(4, np.float32)), content_type=ST, loc=("HR",)
    ),
    Case(
        "st_unknown_metadata", 422, st_episodes(colour=["a", "b", "c", "d"]), content_type=ST, loc=("colour",)
    ),
    Case(
        "st_same_id_twice",
        422,
        st_episodes(id=["a", "b", "a", None]),
        content_type=ST,
        loc=("episodes", 2, "id"),
    ),
    Case(
        "st_soft_bind_wrong_shape",
        422,
        st_with(soft_bind=np.zeros(5, np.float32)),
        content_type=ST,
        loc=("soft_bind",),
    ),
    Case("st_z_one_dimensional", 422, st_with(z=np.zeros(4, np.float32)), content_type=ST, loc=("z",)),
    Case(
        "st_wrong_z_dim",
        422,
        st_with(z=np.zeros((4, 5), np.float32)),
        content_type=ST,
        loc=("episodes", 0, "z"),
    ),
    Case("st_nan_in_z", 422, st_nan_row(2), content_type=ST, loc=("episodes", 2, "z")),
    Case(
        "st_soft_bind_out_of_range",
        422,
        st_with(soft_bind=np.array([0.1, 1.5, 0.2, 0.3], np.float32)),
        content_type=ST,
        loc=("episodes", 1, "soft_bind"),
    ),
    Case(
        "st_error_when_safetensors_accepted",
        422,
        st_episodes(z_dtype=np.float64),
        content_type=ST,
        headers={"accept": ST},
        loc=("z",),
    ),
    # safetensors queries
    Case(
        "st_query_f64_z",
        422,
        st_body({"z": np.zeros((2, 4), np.float64)}),
        path=NEIGHBORS,
        content_type=ST,
        loc=("z",),
    ),
    Case(
        "st_query_missing_z",
        422,
        st_body({"q": np.zeros((2, 4), np.float32)}),
        path=NEIGHBORS,
        content_type=ST,
        loc=("z",),
    ),
    Case(  # a misspelt field must not pass unseen (JSON bodies refuse unknown fields too)
        "st_query_unknown_tensor",
        422,
        st_body({"z": np.zeros((2, 4), np.float32), "q": np.zeros((2, 4), np.float32)}),
        path=NEIGHBORS,
        content_type=ST,
        loc=("q",),
    ),
    Case(
        "st_query_k_zero",
        422,
        st_body({"z": np.zeros((2, 4), np.float32)}, k=0),
        path=NEIGHBORS,
        content_type=ST,
        loc=("k",),
        headers={"accept": ST},
    ),
    # booleans are not numbers, in metadata as in JSON (pydantic's lax mode took true as 1)
    Case(
        "st_query_k_true",
        422,
        st_body({"z": np.zeros((2, 4), np.float32)}, k=True),
        path=NEIGHBORS,
        content_type=ST,
        loc=("k",),
        check=lambda p: _assert_in("k: must be a number, not a boolean", p["detail"]),
    ),
    Case(
        "st_query_k_false",
        422,
        st_body({"z": np.zeros((2, 4), np.float32)}, k=False),
        path=NEIGHBORS,
        content_type=ST,
        loc=("k",),
    ),
    Case(
        "st_query_sigma_true",
        422,
        st_body({"z": np.zeros((2, 4), np.float32)}, sigma=True),
        path=NEIGHBORS,
        content_type=ST,
        loc=("sigma",),
    ),
    Case("k_true", 422, {"z": [0.0] * 4, "k": True}, path=NEIGHBORS, loc=("k",)),
    Case("k_true_query_param", 422, {"z": [0.0] * 4}, path=f"{NEIGHBORS}?k=true", loc=("k",)),
    Case("risk_k_true", 422, {"z": [0.0] * 4, "k": True}, path=f"{MEM}/risk", loc=("k",)),
    Case(
        "put_capacity_true",
        422,
        {"capacity": True},
        method="PUT",
        path="/memories/x",
        loc=("body", "capacity"),
    ),
    Case("put_k_true", 422, {"k": True}, method="PUT", path="/memories/x", loc=("body", "k")),
    Case("put_sigma_false", 422, {"sigma": False}, method="PUT", path="/memories/x", loc=("body", "sigma")),
    Case(
        "put_risk_a_true",
        422,
        {"risk": {"a": True}},
        method="PUT",
        path="/memories/x",
        loc=("body", "risk", "a"),
    ),
    Case(
        "st_query_garbage",
        400,
        b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....",
        path=NEIGHBORS,
        content_type=ST,
    ),
    # import
    Case(  # into an empty memory: a memory that holds episodes is a 409 before the file is read
        "import_garbage",
        422,
        b"PK\x03\x04 not really a zip",
        path="/memories/fresh/import",
        content_type="application/octet-stream",
    ),
    Case(
        "import_into_non_empty",
        409,
        export_of_m,
        path=f"{MEM}/import",
        content_type="application/octet-stream",
    ),
]


def case_params() -> list[Any]:
    return [pytest.param(c, id=c.id) if isinstance(c, Case) else c for c in CASES]


# -- helpers -----------------------------------------------------------------------------------------


def populate(client: httpx.Client, per_request: int = N_STORED) -> None:
    """Memory `m`: z_dim 4, N_STORED episodes (active), ids ep-0…, three workers."""
    r = client.put(MEM, json={"z_dim": Z_DIM})
    assert r.status_code == 201, r.text
    for start in range(0, N_STORED, per_request):
        eps = [episode(i) for i in range(start, min(N_STORED, start + per_request))]
        r = client.post(EPISODES, json={"episodes": eps})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(eps)
    stats = client.get(f"{MEM}/stats").json()
    assert stats["active"] and stats["size"] == N_STORED


def snapshot(client: httpx.Client) -> dict[str, Any]:
    """What a request could change: the listing, each memory's counters and its exported bytes."""
    listing = client.get("/memories")
    assert listing.status_code == 200
    state: dict[str, Any] = {"memories": listing.json()}
    for m in listing.json()["memories"]:
        stats = client.get(f"/memories/{m['name']}/stats").json()
        keep = ("size", "z_dim", "settings", "total_written", "next_seq", "seq_range", "workers")
        state[m["name"]] = {key: stats[key] for key in keep}
        export = client.get(f"/memories/{m['name']}/export")
        assert export.status_code == 200
        state[m["name"] + "/export"] = export.content
    return state


def send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    content: Any = None
    if case.content_type is not None:
        headers["content-type"] = case.content_type
        body = case.body(client) if callable(case.body) else case.body
        content = raw(body) if isinstance(body, dict | list | None) else body  # None: the literal null
    return client.request(case.method, case.path, content=content, headers=headers)


def assert_problem(r: httpx.Response, case: Case) -> dict[str, Any]:
    assert r.status_code == case.status, f"{case.id}: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    problem = r.json()
    assert isinstance(problem["type"], str) and problem["type"]
    assert isinstance(problem["title"], str) and problem["title"]
    assert problem["status"] == case.status
    assert isinstance(problem["detail"], str) and problem["detail"]
    if case.status == 422:
        errors = problem["errors"]
        assert isinstance(errors, list) and errors, problem
        for e in errors:
            assert isinstance(e["loc"], list) and isinstance(e["msg"], str) and e["msg"], e
    if case.loc is not None:
        locs = [tuple(e["loc"]) for e in problem["errors"]]
        assert any(loc[: len(case.loc)] == case.loc for loc in locs), (case.loc, locs)
    if case.check is not None:
        case.check(problem)
    return problem


# -- tests ---------------------------------------------------------------------------------------------


def test_the_table_is_big_and_ids_are_unique() -> None:
    ids = [p.id for p in case_params()]
    assert len(ids) == len(set(ids)) >= 25


@pytest.mark.parametrize("case", case_params())
def test_bad_request(make_client, case: Case) -> None:  # type: ignore[no-untyped-def]
    client = make_client(capacity=1000, min_size=10, **case.settings)
    populate(client, per_request=5 if case.settings else N_STORED)  # small limits: small requests
    before = snapshot(client)
    r = send(client, case)
    assert_problem(r, case)
    assert snapshot(client) == before, f"{case.id} changed the service state"


def test_all_or_nothing(make_client) -> None:  # type: ignore[no-untyped-def]
    """One bad episode among good ones stores none: no seq, no id, no eviction is used up."""
    client = make_client(capacity=N_STORED, min_size=10)  # full: any accepted write would evict
    populate(client)
    before = snapshot(client)
    next_seq = before["m"]["next_seq"]
    good = [episode(20_000 + i) for i in range(10)]
    for i, bad in [(0, {"soft_bind": 2.0}), (7, {"cone_vol": -1.0}), (9, {"z": [1.0, 2.0]})]:
        eps = [dict(e) for e in good]
        eps[i].update(bad)
        r = client.post(EPISODES, json={"episodes": eps})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"][:2] == ["episodes", i]
        assert snapshot(client) == before
    # The same ids are new afterwards, and the seqs continue where they were.
    r = client.post(EPISODES, json={"episodes": good})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "accepted": 10,
        "duplicates": 0,
        "size": N_STORED,
        "first_seq": next_seq,
        "last_seq": next_seq + 9,
    }


def test_safetensors_all_or_nothing(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(capacity=1000, min_size=10)
    populate(client)
    before = snapshot(client)
    body = st_with(cone_vol=np.array([0.1, 0.2, -3.0, 0.4], np.float32))
    r = client.post(EPISODES, content=body, headers={"content-type": SAFETENSORS})
    assert r.status_code == 422
    assert ["episodes", 2, "cone_vol"] in [e["loc"] for e in r.json()["errors"]]
    assert snapshot(client) == before


def test_every_bad_episode_is_named(client) -> None:  # type: ignore[no-untyped-def]
    """A batch with several bad episodes lists each (index and field), sorted by index."""
    populate(client)
    eps = [episode(30_000 + i) for i in range(6)]
    eps[1]["soft_bind"] = 1.5
    eps[4]["cone_vol"] = -2.0
    eps[5]["id"] = eps[2]["id"]
    r = client.post(EPISODES, json={"episodes": eps})
    assert r.status_code == 422
    locs = [e["loc"] for e in r.json()["errors"]]
    assert locs == [["episodes", 1, "soft_bind"], ["episodes", 4, "cone_vol"], ["episodes", 5, "id"]]
    assert "(and 2 more)" in r.json()["detail"]
    # Type errors too (found while parsing, before the range checks).
    eps = [episode(30_000 + i) for i in range(6)]
    del eps[1]["lambda_bind"]
    eps[4]["worker"] = "w" * 65
    r = client.post(EPISODES, json={"episodes": eps})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["errors"]] == [
        ["episodes", 1, "lambda_bind"],
        ["episodes", 4, "worker"],
    ]


def test_limits_are_inclusive(make_client) -> None:  # type: ignore[no-untyped-def]
    """Right at each limit is fine: 128-char id, 64-char worker, 64-char name, max_batch rows, k=1024."""
    client = make_client(capacity=1000, min_size=10, max_batch=5)
    populate(client, per_request=5)
    eps = batch(n=5)["episodes"]
    eps[0]["id"], eps[1]["worker"] = "i" * 128, "w" * 64
    assert client.post(EPISODES, json={"episodes": eps}).status_code == 200
    assert client.post(f"/memories/{'n' * 64}/episodes", json=batch(n=1)).status_code == 200
    r = client.post(NEIGHBORS, json={"z": [[0.0] * 4] * 5, "k": 1024})
    assert r.status_code == 200 and r.json()["k"] == N_STORED + 5


def test_tiny_sigma_gives_a_finite_risk_or_a_422(client) -> None:  # type: ignore[no-untyped-def]
    populate(client)
    stored = episode(0)["z"]
    r = client.post(f"{MEM}/risk", json={"z": stored, "sigma": 1e-200})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        risk = json.loads(r.text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
        assert np.isfinite(risk["risk"])


# -- end to end ----------------------------------------------------------------------------------------

E2E_CASES = [
    "not_json",
    "nan_in_z",
    "soft_bind_above_1",
    "same_id_twice",
    "name_leading_dash",
    "name_encoded_slash",
    "k_over_1024",
    "stats_unknown_memory",
    "put_conflict",
    "st_garbage",
    "st_f64_z",
    "st_id_list_wrong_length",
]


@pytest.mark.e2e
def test_bad_requests_over_a_socket(server) -> None:  # type: ignore[no-untyped-def]
    by_id = {c.id: c for c in CASES if isinstance(c, Case)}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        populate(client)
        before = snapshot(client)
        for name in E2E_CASES:
            case = by_id[name]
            assert not case.settings
            assert_problem(send(client, case), case)
        assert snapshot(client) == before


@pytest.mark.e2e
def test_float32_overflow_is_a_422_over_a_socket(server) -> None:  # type: ignore[no-untyped-def]
    """Outside pytest's -W error the overflowing cast only warns, and validation answers 422."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        populate(client)
        before = snapshot(client)
        body = raw(batch(bad=1, z=[0.0, 12345.0, 0.0, 0.0])).replace(b"12345.0", b"1e39")
        r = client.post(EPISODES, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and ["episodes", 1, "z"] in [e["loc"] for e in r.json()["errors"]]
        assert snapshot(client) == before
