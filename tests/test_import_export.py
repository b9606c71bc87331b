"""Import and export under hostile files: nothing unpacked before it is checked, the rules of a
write apply, and whatever an export produces an import accepts (however large)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from benchmarks.bench_memory import zip_bomb
from zmem_service.ring import FLOAT_FIELDS

SETTINGS = {"z_dim": None, "capacity": 100, "min_size": 1, "k": 4, "sigma": 1.0}


def npz(n: int = 3, **overrides: object) -> bytes:
    data: dict[str, object] = {
        "z": np.zeros((n, 4), np.float32),
        "seq": np.arange(1, n + 1),
        "ts": np.full(n, 1.7e9),
        "id": np.array([f"i{i}" for i in range(n)]),
        "worker": np.array([""] * n),
        "settings": json.dumps({**SETTINGS, "risk": {"a": 1, "b": 0.2, "c": 0.05, "eps": 1e-8}}),
    }
    for f in (*FLOAT_FIELDS, "risk_target"):
        data[f] = np.zeros(n, np.float32)
    data["soft_bind"] = data["cone_vol"] = np.ones(n, np.float32)  # risk target ≈ 0
    data.update(overrides)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in data.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def refused(client, body: bytes, status: int = 422) -> dict:
    r = client.post("/memories/imp/import", content=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/memories/imp/stats").status_code == 404  # nothing was created
    return r.json()


def test_the_fixture_itself_imports(client) -> None:
    assert client.post("/memories/imp/import", content=npz()).json() == {"imported": 3, "size": 3}


def test_a_zip_bomb_is_refused_before_it_is_unpacked(make_client) -> None:
    client = make_client(max_memory_bytes=64 * 2**20)
    bomb = zip_bomb(rows=2**21)  # 256 MiB of z in a ~0.3 MiB body: more than the whole budget
    assert len(bomb) < 2**20
    problem = refused(client, bomb, 507)
    assert "--max-memory-bytes" in problem["detail"]


def test_an_unknown_member_is_refused(client) -> None:
    buf = io.BytesIO(npz())
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("extra.npy", b"\x00" * 100)
    assert refused(client, buf.getvalue())["errors"][0]["loc"] == ["extra.npy"]


def test_a_member_declaring_more_than_its_shape_holds_is_refused(client) -> None:
    """A z member whose npy header says [3, 4] but whose zip entry declares megabytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(npz())) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data + (b"\x00" * 2**22 if info.filename == "z.npy" else b""))
    assert refused(client, buf.getvalue())["errors"][0]["loc"] == ["z"]


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"seq": np.array(5)}, "seq"),  # 0-d
        ({"z": np.array([["a"] * 4] * 3)}, "z"),
        ({"soft_bind": np.array(["x", "y", "z"])}, "soft_bind"),
        ({"ts": np.array([b"a", b"b", b"c"], dtype="V1")}, "ts"),
        ({"ts": np.array([1e300, 1.0, 2.0])}, "ts"),
        ({"ts": np.array([-1e15, 1.0, 2.0])}, "ts"),
        ({"id": np.array(["a", "b", "a"])}, "id"),
        ({"soft_bind": np.array([7.0, 1.0, 1.0], np.float32)}, "soft_bind"),
        ({"cone_vol": np.array([-3.0, 1.0, 1.0], np.float32)}, "cone_vol"),
        ({"lambda_bind": np.array([-1.0, 0.0, 0.0], np.float32)}, "lambda_bind"),
        ({"z": np.full((3, 4), 1e19, np.float32)}, "z"),  # ‖z‖² would overflow float32
        ({"risk_target": np.array([5.0, 0.0, 0.0], np.float32)}, "risk_target"),
        ({"seq": np.array([2**53 - 3, 2**53 - 2, 2**53 - 1])}, "seq"),
        ({"settings": "[" * 100_000 + "]" * 100_000}, "settings"),
        ({"settings": json.dumps({"capacity": 0})}, "settings"),
    ],
    ids=[
        "seq_0d",
        "z_strings",
        "soft_bind_strings",
        "ts_void",
        "ts_1e300",
        "ts_negative",
        "repeated_ids",
        "soft_bind_7",
        "cone_vol_negative",
        "lambda_bind_negative",
        "z_overflows",
        "risk_target_inconsistent",
        "seq_at_the_limit",
        "settings_deeply_nested",
        "settings_invalid",
    ],
)
def test_a_bad_file_is_422_naming_the_member(client, overrides: dict, loc: str) -> None:
    problem = refused(client, npz(**overrides))
    assert problem["errors"][0]["loc"][0] == loc, problem


def test_import_accepts_what_export_produces_even_past_the_body_limit(make_client) -> None:
    client = make_client(max_body_bytes=1024, capacity=1000, min_size=1)
    eps = [
        {
            "z": [float(i), 1.0],
            "soft_bind": 0.5,
            "cone_vol": 0.0,
            "lambda_bind": 0.1,
            "id": "x" * 100 + str(i),
        }
        for i in range(40)
    ]
    # cone_vol 0 was allowed by release 0.1.0; its exports must still import (this write is
    # refused today only where the write rules say so).
    eps = [{**e, "cone_vol": 0.5} for e in eps]
    for i in range(0, 40, 5):
        body = json.dumps({"episodes": eps[i : i + 5]}).encode()
        assert len(body) < 1024
        assert (
            client.post("/episodes", content=body, headers={"content-type": "application/json"}).status_code
            == 200
        )
    export = client.get("/export").content
    assert len(export) > 10 * 1024  # far past the body limit
    assert client.post("/memories/copy/import", content=export).json() == {"imported": 40, "size": 40}
    again = client.get("/memories/copy/export").content
    with np.load(io.BytesIO(export)) as a, np.load(io.BytesIO(again)) as b:
        for key in a.files:
            if key != "settings":
                np.testing.assert_array_equal(a[key], b[key])


def test_writes_stop_before_the_seq_limit_and_the_export_stays_importable(client) -> None:
    top = 2**53 - 3
    body = npz(seq=np.array([top - 2, top - 1, top]))
    assert client.post("/memories/imp/import", content=body).status_code == 200
    ep = {"z": [0.0] * 4, "soft_bind": 1.0, "cone_vol": 1.0, "lambda_bind": 0.0}
    assert client.post("/memories/imp/episodes", json={"episodes": [ep]}).json()["last_seq"] == top + 1
    r = client.post("/memories/imp/episodes", json={"episodes": [ep]})
    assert r.status_code == 507 and "seqs" in r.json()["detail"]
    assert (
        client.post("/memories/back/import", content=client.get("/memories/imp/export").content).status_code
        == 200
    )


def test_stats_summarise_a_sample_and_are_cheap(make_client) -> None:
    client = make_client(capacity=30_000, min_size=1)
    z = np.random.default_rng(0).normal(size=(25_000, 2))
    for start in range(0, 25_000, 5_000):
        eps = [
            {"z": row.tolist(), "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
            for row in z[start : start + 5_000]
        ]
        client.post("/episodes", json={"episodes": eps})
    stats = client.get("/stats").json()
    assert stats["size"] == 25_000 and stats["summary_sample"] == 10_000
    assert stats["seq_range"] == [1, 25_000]
    assert stats["fields"]["soft_bind"]["median"] == pytest.approx(0.5)
    assert stats["z_norm"]["mean"] == pytest.approx(np.linalg.norm(z, axis=1).mean(), rel=0.05)
    assert client.get("/stats").json() == {**stats}  # cached while nothing changes


def test_a_long_file_of_narrow_columns_is_loaded_only_as_far_as_capacity(make_client) -> None:
    """40,000 rows of uint8 values and float16 z for a capacity of 10: only the last 10 rows are
    widened (float64 values, Python strings), and the budget check counts the file's unpacked
    columns plus those widened rows."""
    n = 40_000
    columns: dict[str, object] = {f: np.zeros(n, np.uint8) for f in (*FLOAT_FIELDS, "risk_target")}
    columns.update(soft_bind=np.ones(n, np.uint8), cone_vol=np.ones(n, np.uint8))
    settings = {**SETTINGS, "capacity": 10, "risk": {"a": 1, "b": 0.2, "c": 0.05, "eps": 1e-8}}
    narrow = npz(
        n,
        z=np.zeros((n, 4), np.float16),
        seq=np.arange(1, n + 1, dtype=np.int32),
        ts=np.full(n, 1_700_000_000, np.uint32),
        settings=json.dumps(settings),
        **columns,
    )
    client = make_client(max_memory_bytes=4 * 2**20)
    assert client.post("/memories/imp/import", content=narrow).json() == {"imported": 10, "size": 10}
    seq = np.load(io.BytesIO(client.get("/memories/imp/export").content))["seq"]
    assert seq.tolist() == list(range(n - 9, n + 1))
    with zipfile.ZipFile(io.BytesIO(narrow)) as z:
        unpacked = sum(info.file_size for info in z.infolist())
    tight = make_client(max_memory_bytes=unpacked + 100)  # the file fits, the widened rows don't
    assert "for the 10 rows kept" in refused(tight, narrow, 507)["detail"]


def test_imports_are_refused_early_where_the_file_is_not_needed(client) -> None:
    r = client.post("/memories/imp/import", content=npz(), headers={"content-length": str(2**40)})
    assert r.status_code == 413, r.text
    assert client.post("/memories/full/import", content=npz()).status_code == 200
    r = client.post("/memories/full/import", content=b"not even a zip file")
    assert r.status_code == 409 and "import needs an empty memory" in r.json()["detail"]
