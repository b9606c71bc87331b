"""Routes declared once: the hot path and FastAPI's routing both follow a route's declaration.

`neighbors` and `risk` are served by the hot path (`fastpath.FastPath`) unless the app is
built with `fast_path=False`; either way, what the route declares (`edge.declare`) decides
who may call it and which bodies it takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from fastapi import Request
from fastapi.testclient import TestClient

from zmem_service.http import app as app_module
from zmem_service.http.edge import ATTRIBUTE, Edge, declared_routes, edge_of
from zmem_service.http.routes import memory as memory_routes
from zmem_service.settings import ServiceSettings

from ..server import wait_until

READ = {"authorization": "Bearer r-secret"}
WRITE = {"authorization": "Bearer w-secret"}
ST = "application/x-safetensors"
Z = {"z": [0.0, 1.0]}


def make(tmp_path: Path, fast_path: bool) -> TestClient:
    settings = ServiceSettings(
        data_dir=tmp_path / ("fast" if fast_path else "slow"),
        durability="none",
        min_size=1,
        token="w-secret",  # type: ignore[arg-type]
        read_token="r-secret",  # type: ignore[arg-type]
    )
    client = TestClient(app_module.create_app(settings, fast_path=fast_path))
    client.__enter__()
    wait_until(lambda: client.get("/readyz").status_code == 200, 10, "the app's readiness")
    ep = {"z": [0.0, 1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1}
    for name in ("default", "m"):
        path = "/episodes" if name == "default" else f"/memories/{name}/episodes"
        assert client.post(path, json={"episodes": [ep]}, headers=WRITE).status_code == 200
    return client


@pytest.fixture
def guarded_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths FastAPI's guard dependency saw (the hot path never calls it)."""
    seen: list[str] = []
    guard = app_module.guard

    async def spy(request: Request) -> None:
        seen.append(request.url.path)
        await guard(request)

    monkeypatch.setattr(app_module, "guard", spy)
    yield seen


def redeclare(monkeypatch: pytest.MonkeyPatch, endpoint: Any, **changes: Any) -> None:
    monkeypatch.setattr(endpoint, ATTRIBUTE, dataclasses.replace(edge_of(endpoint), **changes))


@pytest.mark.parametrize("fast_path", [True, False], ids=["hot path", "FastAPI"])
def test_both_paths_follow_a_changed_declaration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guarded_calls: list[str], fast_path: bool
) -> None:
    paths = ["/risk", "/memories/m/risk"]
    c = make(tmp_path, fast_path)
    try:
        for path in paths:  # as declared: a read route taking JSON and safetensors
            assert c.post(path, json=Z, headers=READ).status_code == 200
            st = safetensors.numpy.save({"z": np.zeros((1, 2), np.float32)})
            assert c.post(path, content=st, headers={**READ, "content-type": ST}).status_code == 200
        served_by_fastapi = [p for p in guarded_calls if p.endswith("/risk")]
        assert sorted(served_by_fastapi) == ([] if fast_path else sorted(paths * 2))
    finally:
        c.__exit__(None, None, None)

    # The same route, now declared a write route taking JSON only.
    redeclare(monkeypatch, memory_routes.post_risk, access="write", bodies=("application/json",))
    guarded_calls.clear()
    c = make(tmp_path / "again", fast_path)
    try:
        for path in paths:
            r = c.post(path, json=Z, headers=READ)
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json", path
            assert c.post(path, json=Z, headers=WRITE).status_code == 200, path
            st = safetensors.numpy.save({"z": np.zeros((1, 2), np.float32)})
            r = c.post(path, content=st, headers={**WRITE, "content-type": ST})
            assert r.status_code == 415 and "application/json" in r.json()["detail"], path
        # neighbors kept its own declaration
        assert c.post("/neighbors", json=Z, headers=READ).status_code == 200
        served_by_fastapi = [p for p in guarded_calls if p.endswith("/risk")]
        assert sorted(served_by_fastapi) == ([] if fast_path else sorted(paths * 3))
    finally:
        c.__exit__(None, None, None)


def test_the_schema_follows_a_changed_declaration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redeclare(monkeypatch, memory_routes.post_risk, bodies=("application/json",))
    spec = app_module.create_app(ServiceSettings(data_dir=tmp_path)).openapi()
    assert set(spec["paths"]["/risk"]["post"]["requestBody"]["content"]) == {"application/json"}
    assert set(spec["paths"]["/neighbors"]["post"]["requestBody"]["content"]) == {
        "application/json",
        ST,
    }


def test_every_route_declares_its_access_and_an_undeclared_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_module.create_app(ServiceSettings(data_dir=tmp_path))
    declared = {(d.path, m): d.edge for d in declared_routes(app.routes) for m in d.methods}
    assert declared[("/healthz", "GET")].access == "open"
    assert declared[("/memories/{name}/episodes", "POST")].access == "write"
    assert declared[("/memories/{name}/risk", "POST")].access == "read"
    assert all(isinstance(edge, Edge) for edge in declared.values())
    fast = sorted(path for (path, method), edge in declared.items() if edge.fast is not None)
    assert fast == ["/memories/{name}/neighbors", "/memories/{name}/risk", "/neighbors", "/risk"]
    monkeypatch.delattr(memory_routes.get_stats, ATTRIBUTE)
    with pytest.raises(TypeError, match="declares no access"):
        app_module.create_app(ServiceSettings(data_dir=tmp_path / "b"))


def test_the_dashboard_cookie_is_read_among_other_cookies(tmp_path: Path) -> None:
    from zmem_service.http.auth import COOKIE, cookie_value

    c = make(tmp_path, True)
    try:
        mine = f"{COOKIE}={cookie_value('r-secret')}"
        for header in (mine, f'theme={{"dark": true}}; {mine}; lang=en', f"a=b c; {mine}"):
            assert c.get("/stats", headers={"cookie": header}).status_code == 200, header
            assert c.post("/risk", json=Z, headers={"cookie": header}).status_code == 200, header
            assert c.post("/episodes", json={"episodes": []}, headers={"cookie": header}).status_code == 403
        assert c.get("/stats", headers={"cookie": "theme=dark"}).status_code == 401
    finally:
        c.__exit__(None, None, None)
