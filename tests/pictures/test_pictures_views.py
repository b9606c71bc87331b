"""Pictures that compare: fixed colour limits, another memory's PCA basis, one trail path per
worker; and the render queue: bounded, abandoned renders dropped (in process)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from zmem_service.pictures.cache import PictureCache

from .test_pictures_api import count_calls, episodes, on_app_loop, png_size, render_arguments, write


def write_workers(client: TestClient, n: int, workers: list[str], *, base: str = "") -> None:
    eps = episodes(n)
    for i, e in enumerate(eps):
        e["worker"] = workers[i % len(workers)]
    assert client.post(f"{base}/episodes", json={"episodes": eps}).status_code == 200


def test_fixed_colour_limits_change_the_map_and_key_the_cache(client: TestClient) -> None:
    write(client, 200)
    plain = client.get("/map.png?dpi=30")
    fixed = client.get("/map.png?dpi=30&clim=soft_bind:0:1&clim=risk_target:-1:2")
    assert fixed.status_code == 200 and png_size(fixed.content) == (360, 300)
    assert fixed.content != plain.content
    assert fixed.headers["x-cache"] == "MISS"
    again = client.get("/map.png?dpi=30&clim=risk_target:-1:2&clim=soft_bind:0:1")  # order doesn't matter
    assert again.headers["x-cache"] == "HIT" and again.content == fixed.content
    assert client.get("/trail.png?dpi=30&clim=density:1:100").status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "map.png?clim=soft_bind:1:0",
        "map.png?clim=soft_bind:0",
        "map.png?clim=nope:0:1",
        "map.png?clim=soft_bind:a:1",
        "map.png?clim=soft_bind:0:inf",
        "map.png?clim=density:1:10",
        "trail.png?clim=soft_bind:0:1",
        "trail.png?clim=density:0:10",
    ],
)
def test_bad_colour_limits_are_422_naming_clim(client: TestClient, query: str) -> None:
    write(client, 50)
    r = client.get(f"/{query}")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["loc"] == ["query", "clim"]


def test_another_memorys_basis_puts_two_maps_on_shared_axes(client: TestClient) -> None:
    write(client, 200, base="/memories/a", seed=1)
    write(client, 200, base="/memories/b", seed=2)
    own = client.get("/memories/a/map.png?dpi=30")
    in_b = client.get("/memories/a/map.png?dpi=30&basis=b")
    assert in_b.status_code == 200 and in_b.content != own.content
    # b in its own basis and b in b's basis are the same axes
    assert client.get("/memories/b/map.png?dpi=30&basis=b").status_code == 200
    assert client.get("/memories/a/trail.png?dpi=30&basis=b").status_code == 200
    # the key follows the basis memory: a write to b changes a's picture in b's basis
    etag = in_b.headers["etag"]
    write(client, 50, base="/memories/b", seed=3)
    assert client.get("/memories/a/map.png?dpi=30&basis=b").headers["etag"] != etag
    assert client.get("/memories/a/map.png?dpi=30").headers["x-cache"] == "HIT"


def test_an_unknown_basis_is_404_and_another_z_dim_422(client: TestClient) -> None:
    write(client, 50)
    r = client.get("/map.png?basis=nobody")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    other = [{"z": [0.0, 1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}]
    assert client.post("/memories/two/episodes", json={"episodes": other}).status_code == 200
    for route in ("map.png", "trail.png"):
        r = client.get(f"/{route}?basis=two")
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"] == ["query", "basis"]
        assert "z_dim 2" in r.json()["detail"]


def test_trail_draws_one_path_per_worker_and_filters(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_workers(client, 300, ["w0", "w1", "w2"])
    seen = render_arguments(monkeypatch)
    all_workers = client.get("/trail.png?dpi=30")
    one = client.get("/trail.png?dpi=30&worker=w1")
    nobody = client.get("/trail.png?dpi=30&worker=ghost")
    assert {r.status_code for r in (all_workers, one, nobody)} == {200}
    assert len({all_workers.content, one.content, nobody.content}) == 3
    assert list(seen[0]["worker"][:3]) == ["w0", "w1", "w2"]
    assert seen[1]["only"] == "w1"


def test_trail_paths_never_join_two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plot draws each worker's points as its own line: check the lines' vertices."""
    from matplotlib.axes import Axes

    from zmem_service.pictures.plots import render_trail

    lines: list[np.ndarray] = []
    real_plot = Axes.plot

    def spy(self: Axes, *args: Any, **kwargs: Any) -> Any:
        lines.append(np.column_stack([np.asarray(args[0]), np.asarray(args[1])]))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 2))
    z[:, 0] += np.arange(60) % 3 * 100.0  # worker i's points sit near x = 100·i
    worker = np.array([f"w{i % 3}" for i in range(60)], dtype=object)
    render_trail(z, worker=worker, title="t", dpi=20)
    assert len(lines) == 3
    for line in lines:
        assert np.ptp(line[:, 0]) < 50  # one worker's points only
        assert len(line) == 20


def test_a_full_render_queue_answers_503_with_retry_after(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(client, 100)
    cache = client.app.state.pictures = PictureCache(max_queued=1)  # type: ignore[attr-defined]
    started, release = threading.Event(), threading.Event()

    def stall() -> None:
        started.set()
        release.wait(10)

    count_calls(monkeypatch, "render_map", before=stall)

    async def work(ac: httpx.AsyncClient) -> list[httpx.Response]:
        running = asyncio.create_task(ac.get("/map.png?dpi=20"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(ac.get("/map.png?dpi=21"))
        await asyncio.sleep(0.05)
        refused = await ac.get("/map.png?dpi=22")
        joined = asyncio.create_task(ac.get("/map.png?dpi=21"))  # same key: joins, not refused
        await asyncio.sleep(0.05)
        release.set()
        return [await running, await queued, refused, await joined]

    try:
        running, queued, refused, joined = on_app_loop(client, work)
    finally:
        release.set()
        cache.close()
    assert (running.status_code, queued.status_code, joined.status_code) == (200, 200, 200)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["content-type"] == "application/problem+json"


def test_a_render_whose_requesters_all_left_is_not_drawn(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(client, 100)
    started, release = threading.Event(), threading.Event()
    drawn: list[int] = []

    def stall() -> None:
        started.set()
        release.wait(10)

    real = PictureCache._run

    def spy(self: PictureCache, fn: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.append(kwargs["dpi"])
        if kwargs["dpi"] == 20:
            stall()
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(PictureCache, "_run", spy)

    async def work(ac: httpx.AsyncClient) -> httpx.Response:
        first = asyncio.create_task(ac.get("/map.png?dpi=20"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        gone = [asyncio.create_task(ac.get(f"/map.png?dpi={dpi}")) for dpi in (21, 22, 23)]
        await asyncio.sleep(0.05)
        for task in gone:  # the clients hang up while their renders are queued
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        kept = asyncio.create_task(ac.get("/map.png?dpi=24"))
        await asyncio.sleep(0.05)
        release.set()
        await first
        return await kept

    try:
        assert on_app_loop(client, work).status_code == 200
    finally:
        release.set()
    assert drawn == [20, 24]
    assert client.get("/map.png?dpi=21").headers["x-cache"] == "MISS"  # never drawn, so never cached


@pytest.mark.parametrize(
    "query",
    [
        "clim=soft_bind:1e308:1.7e308",
        "clim=risk_target:-1e308:1e308",
        "clim=risk_target:-inf:0",
        "clim=soft_bind:nan:1",
    ],
)
def test_colour_limits_beyond_any_drawable_scale_are_422(client: TestClient, query: str) -> None:
    r = client.get(f"/map.png?{query}")
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["loc"] == ["query", "clim"]
