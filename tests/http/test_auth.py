"""Bearer tokens: write token for everything, read token for reads, cookie for the dashboard."""

from __future__ import annotations

import pytest

EP = {"episodes": [{"z": [0.0, 1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}]}


@pytest.fixture
def secured(make_client):  # type: ignore[no-untyped-def]
    return make_client(token="w-secret", read_token="r-secret", min_size=1)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_health_is_open_everything_else_needs_a_token(secured) -> None:
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/readyz").status_code == 200
    for method, path in [
        ("GET", "/stats"),
        ("GET", "/export"),
        ("GET", "/metrics"),
        ("GET", "/memories"),
        ("POST", "/episodes"),
        ("POST", "/neighbors"),
    ]:
        r = secured.request(method, path, json=EP)
        assert r.status_code == 401, (method, path)
        assert r.headers["content-type"] == "application/problem+json"
    assert secured.get("/stats", headers=bearer("wrong")).status_code == 401


def test_read_token_reads_and_cannot_write(secured) -> None:
    assert secured.post("/episodes", json=EP, headers=bearer("w-secret")).status_code == 200
    read = bearer("r-secret")
    assert secured.get("/stats", headers=read).status_code == 200
    assert secured.get("/export", headers=read).status_code == 200
    assert secured.get("/metrics", headers=read).status_code == 200
    assert secured.post("/neighbors", json={"z": [0.0, 1.0]}, headers=read).status_code == 200
    assert secured.post("/risk", json={"z": [0.0, 1.0]}, headers=read).status_code == 200
    assert secured.post("/episodes", json=EP, headers=read).status_code == 403
    assert secured.put("/memories/x", json={"z_dim": 2}, headers=read).status_code == 403
    assert secured.delete("/memories/default", headers=read).status_code == 403
    assert secured.get("/stats", headers=read).json()["size"] == 1


def test_dashboard_token_sets_an_http_only_cookie(secured) -> None:
    r = secured.get("/?token=r-secret")
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "zmem_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "r-secret" not in cookie  # an HMAC of the token, not the token
    assert secured.get("/stats").status_code == 200  # the TestClient keeps the cookie
    assert secured.post("/episodes", json=EP).status_code == 403


def test_a_write_token_cookie_still_only_reads(secured) -> None:
    r = secured.get("/?token=w-secret")
    assert r.status_code == 200 and "w-secret" not in r.headers["set-cookie"]
    assert secured.get("/stats").status_code == 200
    for method, path, body in [
        ("POST", "/episodes", EP),
        ("PUT", "/memories/x", {"z_dim": 2}),
        ("DELETE", "/memories/default", None),
    ]:
        r = secured.request(method, path, json=body)
        assert r.status_code == 403 and "Authorization" in r.json()["detail"], (method, path)
    assert secured.post("/episodes", json=EP, params={"token": "w-secret"}).status_code == 403
    assert secured.get("/stats").json()["size"] == 0  # nothing written


def test_only_a_write_token_opens_the_dashboard_read_only(make_client) -> None:
    c = make_client(token="only-w", min_size=1)
    assert c.get("/").status_code == 401
    assert c.get("/?token=only-w").status_code == 200
    assert c.get("/stats").status_code == 200
    assert c.post("/episodes", json=EP).status_code == 403
    assert c.post("/episodes", json=EP, headers=bearer("only-w")).status_code == 200


def test_a_read_token_alone_is_refused_at_start(tmp_path) -> None:
    from zmem_service.http.app import create_app
    from zmem_service.settings import ServiceSettings

    with pytest.raises(ValueError, match="read token without a write token"):
        create_app(ServiceSettings(data_dir=tmp_path, read_token="r"))


@pytest.mark.e2e
def test_tokens_from_files_and_never_in_the_log(tmp_path) -> None:
    import httpx

    from ..server import Server

    (tmp_path / "w").write_text("file-write-token\n")
    (tmp_path / "r").write_text("file-read-token\n")
    srv = Server(
        tmp_path / "data",
        "--token-file",
        str(tmp_path / "w"),
        "--read-token-file",
        str(tmp_path / "r"),
        env={"ZMEM_LOG_LEVEL": "info"},
    )
    srv.args += ["--log-level", "info", "--access-log"]
    srv.start()
    try:
        assert httpx.get(srv.url + "/stats").status_code == 401
        assert httpx.get(srv.url + "/stats", headers=bearer("file-read-token")).status_code == 200
        assert httpx.get(srv.url + "/?token=file-read-token").status_code == 200
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "GET /stats 200" in log
    assert "file-read-token" not in log and "file-write-token" not in log


def test_the_schema_and_its_page_need_a_token_too(secured) -> None:
    assert secured.get("/openapi.json").status_code == 401
    assert secured.get("/docs").status_code == 401
    schema = secured.get("/openapi.json", headers=bearer("r-secret"))
    assert schema.status_code == 200 and "/memories/{name}/neighbors" in schema.json()["paths"]
    assert secured.get("/docs", headers=bearer("r-secret")).status_code == 200
