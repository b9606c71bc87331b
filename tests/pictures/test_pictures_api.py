"""The picture and diagnostics routes, in process: PNGs, ETags, validation, caching, threads."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from zmem_service.pictures.cache import PictureCache
from zmem_service.querylog import QueryLog

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PICTURES = ("map.png", "trail.png", "risk.png")


def png_size(body: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails the test on anything else."""
    assert body[:8] == PNG_SIGNATURE
    assert body[12:16] == b"IHDR"
    width, height = struct.unpack(">II", body[16:24])
    return width, height


def episodes(n: int, *, d: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """n episodes around 4 cluster centres, soft_bind higher near the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(4, d))
    offsets = rng.normal(size=(n, d))
    z = centres[rng.integers(0, 4, size=n)] + offsets
    near = np.exp(-np.linalg.norm(offsets, axis=1) / d)
    return [
        {
            "z": z[i].tolist(),
            "soft_bind": float(near[i]),
            "cone_vol": float(0.1 + near[i]),
            "lambda_bind": float(1 - near[i]),
        }
        for i in range(n)
    ]


def write(client: TestClient, n: int, *, base: str = "", seed: int = 0) -> None:
    r = client.post(f"{base}/episodes", json={"episodes": episodes(n, seed=seed)})
    assert r.status_code == 200, r.text


def record_queries(client: TestClient, n: int, *, base: str = "", seed: int = 1) -> None:
    """n queries' kernel numbers, computed as a client would from the neighbours and posted."""
    z = np.random.default_rng(seed).normal(scale=5.0, size=(n, 8))
    r = client.post(f"{base}/neighbors", json={"z": z.tolist()})
    assert r.status_code == 200, r.text
    nb = r.json()
    w = np.exp(-np.array(nb["d2"]) / (2 * nb["sigma"] ** 2))
    wsum = w.sum(axis=1)
    w2 = (w * w).sum(axis=1)
    body = {
        "risk": ((w * np.array(nb["risk_target"])).sum(axis=1) / (wsum + 1e-8)).tolist(),
        "wsum": wsum.tolist(),
        "n_eff": np.divide(wsum * wsum, w2, out=np.zeros_like(wsum), where=w2 > 0).tolist(),  # (Σw)²/Σw²
    }
    assert client.post(f"{base}/queries", json=body).status_code == 200


def count_calls(
    monkeypatch: pytest.MonkeyPatch, name: str, before: Callable[[], None] = lambda: None
) -> list[str]:
    """Count what the cache hands to its render process by function name (`render_map`,
    `evaluate`, …); returns the names of the threads that handed it over."""
    real = PictureCache._run
    threads: list[str] = []

    def wrapper(self: PictureCache, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn.__name__ == name:
            threads.append(threading.current_thread().name)
            before()
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(PictureCache, "_run", wrapper)
    return threads


def render_arguments(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of each render the cache hands to its render process, in order."""
    real = PictureCache._run
    seen: list[dict[str, Any]] = []

    def spy(self: PictureCache, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(PictureCache, "_run", spy)
    return seen


def on_app_loop(client: TestClient, work: Callable[[httpx.AsyncClient], Any]) -> Any:
    """Run `work(async_client)` on the app's own event loop, so its requests are concurrent."""

    async def main() -> Any:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await work(ac)

    assert client.portal is not None
    return client.portal.call(main)


# -- pictures ---------------------------------------------------------------------------


def test_map_is_a_1200x1000_png_and_repeats_byte_identical(client: TestClient) -> None:
    write(client, 300)
    first, second = client.get("/map.png"), client.get("/map.png")
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/png"
    assert first.headers["cache-control"] == "no-cache"
    assert png_size(first.content) == (1200, 1000)
    assert second.content == first.content
    assert second.headers["etag"] == first.headers["etag"]


def test_parameters_change_the_picture(client: TestClient) -> None:
    write(client, 300)
    plain = client.get("/map.png")
    assert png_size(client.get("/map.png?dpi=50").content) == (600, 500)
    assert client.get("/map.png?max_points=50").content != plain.content
    assert client.get("/map.png?max_points=50&seed=1").content != client.get("/map.png?max_points=50").content


def test_trail_and_risk_are_pngs(client: TestClient) -> None:
    write(client, 300)
    record_queries(client, 50)
    assert png_size(client.get("/trail.png?last=100").content) == (1200, 1000)
    assert png_size(client.get("/risk.png").content) == (1200, 500)


def test_an_empty_memory_gives_valid_pngs(client: TestClient) -> None:
    for picture in PICTURES:
        r = client.get(f"/{picture}")
        assert r.status_code == 200, picture
        png_size(r.content)


def test_matching_if_none_match_gives_304_without_a_body(client: TestClient) -> None:
    write(client, 100)
    etag = client.get("/map.png").headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        r = client.get("/map.png", headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b""
        assert r.headers["etag"] == etag
    assert client.get("/map.png", headers={"If-None-Match": '"other"'}).status_code == 200


def test_a_write_changes_the_etag(client: TestClient) -> None:
    write(client, 100)
    old = {p: client.get(f"/{p}").headers["etag"] for p in ("map.png", "trail.png")}
    write(client, 10, seed=5)
    for picture, etag in old.items():
        r = client.get(f"/{picture}", headers={"If-None-Match": etag})
        assert r.status_code == 200, picture
        assert r.headers["etag"] != etag


def test_recorded_queries_change_the_risk_picture(client: TestClient) -> None:
    write(client, 100)
    empty = client.get("/risk.png").headers["etag"]
    record_queries(client, 20)
    some = client.get("/risk.png").headers["etag"]
    record_queries(client, 20, seed=2)
    assert len({empty, some, client.get("/risk.png").headers["etag"]}) == 3


def test_writes_leave_the_risk_picture_alone(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    write(client, 100)
    record_queries(client, 20)
    calls = count_calls(monkeypatch, "render_risk")
    etag = client.get("/risk.png").headers["etag"]
    write(client, 10, seed=6)
    assert client.get("/risk.png", headers={"If-None-Match": etag}).status_code == 304
    assert len(calls) == 1


def test_the_risk_picture_follows_a_full_series(make_client: Callable[..., TestClient]) -> None:
    """At its length limit a new query changes the series but not its length."""
    client = make_client(capacity=1000, min_size=10)
    write(client, 100)
    client.app.state.zmem.memory("default").queries = QueryLog(5)  # type: ignore[attr-defined]
    record_queries(client, 5)
    before = client.get("/risk.png").headers["etag"]
    record_queries(client, 1, seed=7)
    assert client.get("/risk.png").headers["etag"] != before


def test_a_recreated_memory_is_not_served_the_old_picture(client: TestClient) -> None:
    write(client, 100, base="/memories/m")
    old = client.get("/memories/m/map.png").headers["etag"]
    assert client.delete("/memories/m").status_code == 204
    write(client, 100, base="/memories/m", seed=3)  # the same version as before the delete
    assert client.get("/memories/m/map.png").headers["etag"] != old


def test_root_and_named_paths(client: TestClient) -> None:
    write(client, 100)
    write(client, 100, base="/memories/other", seed=4)
    for picture in PICTURES:
        root = client.get(f"/{picture}")
        assert client.get(f"/memories/default/{picture}").content == root.content
    assert client.get("/memories/other/map.png").content != client.get("/map.png").content
    assert client.get("/memories/other/diagnostics").json()["size"] == 100


@pytest.mark.parametrize(
    "query",
    [
        "map.png?max_points=0",
        "map.png?max_points=50001",
        "map.png?dpi=9",
        "map.png?dpi=301",
        "map.png?seed=-1",
        "map.png?max_points=many",
        "trail.png?last=0",
        "trail.png?last=100001",
        "trail.png?dpi=1000",
        "risk.png?dpi=0",
    ],
)
def test_bad_parameters_are_422_problems(client: TestClient, query: str) -> None:
    r = client.get(f"/{query}")
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 422
    assert body["errors"][0]["loc"] == ["query", query.split("?")[1].split("=")[0]]


@pytest.mark.parametrize("route", [*PICTURES, "diagnostics"])
def test_an_unknown_memory_is_a_404_problem(client: TestClient, route: str) -> None:
    r = client.get(f"/memories/nope/{route}")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert "nope" in r.json()["detail"]


# -- diagnostics ------------------------------------------------------------------------


def test_diagnostics_shape(client: TestClient) -> None:
    write(client, 300)
    record_queries(client, 120)
    body = client.get("/diagnostics").json()
    assert body["size"] == 300
    names = [c["name"] for c in body["criteria"]]
    assert names == ["density", "reliability", "convergence", "kernel"]
    for criterion in body["criteria"]:
        assert criterion["passed"] in (True, False)
        assert isinstance(criterion["values"], dict)
        assert criterion["reading"]
    assert body["criteria"][2]["values"]["recorded_queries"] == 120


def test_diagnostics_of_an_empty_memory_are_not_judged(client: TestClient) -> None:
    body = client.get("/diagnostics").json()
    assert body["size"] == 0
    assert [c["passed"] for c in body["criteria"]] == [None, None, None, None]


def test_diagnostics_follow_writes_and_recorded_queries(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(client, 100)
    calls = count_calls(monkeypatch, "evaluate")
    client.get("/diagnostics")
    client.get("/diagnostics")
    assert len(calls) == 1
    record_queries(client, 10)
    assert client.get("/diagnostics").json()["criteria"][2]["values"]["recorded_queries"] == 10
    write(client, 10, seed=9)
    assert client.get("/diagnostics").json()["size"] == 110
    assert len(calls) == 3


# -- caching and threads ----------------------------------------------------------------


def test_concurrent_requests_for_one_picture_render_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(client, 300)
    threads = count_calls(monkeypatch, "render_map", before=lambda: time.sleep(0.3))

    async def work(ac: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(*(ac.get("/map.png?dpi=40") for _ in range(8)))

    responses = on_app_loop(client, work)
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.content for r in responses}) == 1
    assert len(threads) == 1
    assert client.get("/map.png?dpi=40").content == responses[0].content  # from the cache
    assert len(threads) == 1


def test_a_slow_render_leaves_the_event_loop_free(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(client, 100)
    started, release = threading.Event(), threading.Event()

    def stall() -> None:
        started.set()
        release.wait(10)

    threads = count_calls(monkeypatch, "render_trail", before=stall)

    async def work(ac: httpx.AsyncClient) -> float:
        trail = asyncio.create_task(ac.get("/trail.png"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        health = await asyncio.wait_for(ac.get("/healthz"), 5)
        waited = time.monotonic() - t0
        assert health.status_code == 200
        assert not trail.done()
        release.set()
        assert (await trail).status_code == 200
        return waited

    try:
        assert on_app_loop(client, work) < 1.0
    finally:
        release.set()
    assert threads == [threads[0]]
    assert threads[0].startswith("zmem-pictures")


def test_the_cache_is_bounded(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    write(client, 100)
    cache = client.app.state.pictures = PictureCache(max_entries=2)  # type: ignore[attr-defined]
    calls = count_calls(monkeypatch, "render_map")
    try:
        for dpi in (20, 21, 22, 20):  # 20 was evicted by 22
            client.get(f"/map.png?dpi={dpi}")
        assert len(calls) == 4
        client.get("/map.png?dpi=22")
        assert len(calls) == 4
    finally:
        cache.close()


def test_a_failed_render_is_not_cached(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    write(client, 100)

    def broken(self: PictureCache, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(PictureCache, "_run", broken)
    with pytest.raises(RuntimeError, match="boom"):  # the TestClient re-raises what gave a 500
        client.get("/map.png")
    monkeypatch.undo()
    assert client.get("/map.png").status_code == 200


# -- dashboard --------------------------------------------------------------------------


def test_the_dashboard_is_html(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    for element in ('id="map"', 'id="trail"', 'id="risk"', 'id="diagnostics"'):
        assert element in r.text
