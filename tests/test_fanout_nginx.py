"""Replicas following the changes feed through a real nginx with the shipped fan-out config
(`docker/nginx/zmem-fanout.conf.template`), and the compose profile that runs it.

Through the cache, after `sync()`, every replica holds exactly the service's export, across
writes, ring wraps, a DELETE and re-create, and an import; followers at one position share one
upstream request; and a page cached for a token's holder never reaches a caller without it."""

from __future__ import annotations

import concurrent.futures
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from zmem_client import ZMemClient

from .nginx import TEMPLATE, Nginx, render
from .server import Server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fanout-write-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
D = 5


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Server, Nginx]]:
    (tmp_path / "token").write_text(TOKEN)
    token = str(tmp_path / "token")
    srv = Server(tmp_path / "data", "--capacity", "300", "--min-size", "10", "--token-file", token)
    srv.start()
    proxy = Nginx(tmp_path / "nginx", f"127.0.0.1:{srv.port}")
    try:
        proxy.start()
        yield srv, proxy
    finally:
        proxy.stop()
        srv.stop()


def record(mem: ZMemClient, rng: np.random.Generator, n: int) -> None:
    z = rng.standard_normal((n, D)).astype(np.float32)
    for i in range(n):
        mem.record(z[i], soft_bind=float(rng.uniform()), cone_vol=0.5, lambda_bind=0.1)
    mem.flush(timeout=60)


def assert_mirrors(service: ZMemClient, replicas: list[ZMemClient]) -> None:
    export = service.export()
    for mem in replicas:
        assert mem.replica is not None
        mem.replica.sync(60)
        got = mem.replica.export()
        np.testing.assert_array_equal(got["seq"], export["seq"])
        np.testing.assert_array_equal(got["z"], export["z"])


@pytest.mark.e2e
def test_replicas_through_the_cache_mirror_the_service(stack: tuple[Server, Nginx]) -> None:
    srv, proxy = stack
    rng = np.random.default_rng(0)
    memory = f"m{uuid.uuid4().hex[:6]}"
    service = ZMemClient(srv.url, memory=memory, token=TOKEN)
    replicas = [
        ZMemClient(proxy.url, memory=memory, token=TOKEN, replica=True, max_lag=120) for _ in range(3)
    ]
    try:
        record(service, rng, 50)
        for mem in replicas:  # a first query starts each replica
            mem.risk(np.zeros(D, np.float32))
        assert_mirrors(service, replicas)
        record(service, rng, 400)  # past capacity: the ring wraps, rows are evicted
        assert_mirrors(service, replicas)
        assert httpx.delete(f"{srv.url}/memories/{memory}", headers=AUTH).status_code == 204
        record(service, rng, 30)  # made again: a new generation
        assert_mirrors(service, replicas)
        record(service, rng, 25)
        body = httpx.get(f"{srv.url}/memories/{memory}/export", headers=AUTH).content
        assert httpx.delete(f"{srv.url}/memories/{memory}", headers=AUTH).status_code == 204
        r = httpx.post(
            f"{srv.url}/memories/{memory}/import",
            content=io.BytesIO(body).read(),
            headers={**AUTH, "content-type": "application/octet-stream"},
        )
        assert r.status_code in (200, 201), r.text
        assert_mirrors(service, replicas)
        for mem in replicas:
            assert mem.replica is not None and mem.replica.feed_errors == 0
    finally:
        for mem in [service, *replicas]:
            mem.close()


@pytest.mark.e2e
def test_a_cached_page_never_reaches_a_caller_without_the_token(stack: tuple[Server, Nginx]) -> None:
    srv, proxy = stack
    with ZMemClient(srv.url, memory="guarded", token=TOKEN) as mem:
        record(mem, np.random.default_rng(1), 20)
    url = f"{proxy.url}/memories/guarded/changes?after=0&limit=100"
    feed = {"accept": "application/x-safetensors"}
    first = httpx.get(url, headers={**feed, **AUTH})
    again = httpx.get(url, headers={**feed, **AUTH})
    assert first.status_code == again.status_code == 200
    assert again.headers["x-cache-status"] == "HIT" and again.content == first.content
    assert httpx.get(url, headers=feed).status_code == 401
    assert httpx.get(url, headers={**feed, "authorization": "Bearer wrong"}).status_code == 401
    fresh = httpx.get(url, headers={**feed, **AUTH, "cache-control": "no-cache"})
    assert fresh.status_code == 200 and fresh.headers["x-cache-status"] == "BYPASS"


@pytest.mark.e2e
def test_followers_at_one_position_share_one_upstream_request(stack: tuple[Server, Nginx]) -> None:
    """Twenty long polls at the newest position, at once: one goes upstream, the others wait
    for its answer (the cache lock), and all get the page a write then makes."""
    srv, proxy = stack
    with ZMemClient(srv.url, memory="shared", token=TOKEN) as mem:
        record(mem, np.random.default_rng(2), 20)
        url = f"{proxy.url}/memories/shared/changes?after=20&limit=100&wait=5"
        headers = {"accept": "application/x-safetensors", **AUTH}
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            polls = [pool.submit(httpx.get, url, headers=headers, timeout=30) for _ in range(20)]
            time.sleep(1.0)
            record(mem, np.random.default_rng(3), 1)
            answers = [p.result() for p in polls]
    assert all(a.status_code == 200 for a in answers)
    assert len({a.content for a in answers}) == 1  # one page, shared
    statuses = sorted(a.headers["x-cache-status"] for a in answers)
    assert statuses.count("MISS") == 1, statuses


def test_the_compose_profile_runs_stock_nginx_with_the_shipped_config() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["zmem-fanout"]
    assert svc["profiles"] == ["fanout"] and svc["image"].startswith("nginx:")
    mount = "./docker/nginx/zmem-fanout.conf.template:/etc/nginx/templates/zmem-fanout.conf.template:ro"
    assert mount in svc["volumes"]
    env = svc["environment"]
    assert env["ZMEM_UPSTREAM"] == "zmem:8000" and env["ZMEM_LISTEN"].endswith("8080")
    assert svc["depends_on"] == ["zmem"] and svc["ports"][0].startswith("127.0.0.1:")
    rendered = render(env["ZMEM_UPSTREAM"], env["ZMEM_LISTEN"], env["ZMEM_CACHE_DIR"])
    assert "${ZMEM_" not in rendered and "$request_uri" in rendered  # nginx's own variables kept
    assert "proxy_cache_lock on" in TEMPLATE.read_text()
