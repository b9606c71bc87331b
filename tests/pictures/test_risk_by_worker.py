"""risk.png per worker (one colour each, ?worker= for one) and the map's stated colour range."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib.axes import Axes

from zmem_service.memory import Memory
from zmem_service.pictures import plots
from zmem_service.pictures.plots import WORKER_COLOURS, render_map, render_risk

from .test_pictures_api import png_size, record_queries, render_arguments, write

Q = 400


def series() -> tuple[np.ndarray, np.ndarray]:
    """Q recorded risks from three workers taking turns; w2 spikes in the last fifth."""
    rng = np.random.default_rng(0)
    risk = 0.5 + 0.02 * rng.normal(size=Q)
    worker = np.array([f"w{i % 3}" for i in range(Q)], dtype=object)
    risk[(worker == "w2") & (np.arange(Q) >= 320)] = 0.9
    return risk, worker


@pytest.fixture
def scatters(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every Axes.scatter call of a render: its x values, colour and label."""
    seen: list[dict[str, Any]] = []
    real = Axes.scatter

    def spy(self: Axes, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({"x": np.asarray(x), "color": kwargs.get("color"), "label": kwargs.get("label")})
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "scatter", spy)
    return seen


def test_each_worker_gets_a_colour_of_its_own(scatters: list[dict[str, Any]]) -> None:
    risk, worker = series()
    png = render_risk(risk, title="t", worker=worker, scale=0.5, dpi=30)
    assert png_size(png) == (360, 150)
    per_worker, spikes = scatters[:3], scatters[3]
    assert [s["label"] for s in per_worker] == ["w0: 134 queries", "w1: 133 queries", "w2: 133 queries"]
    assert [s["color"] for s in per_worker] == list(WORKER_COLOURS[:3])
    assert "tab:red" not in WORKER_COLOURS and "C3" not in WORKER_COLOURS  # red is for spikes
    for s, name in zip(per_worker, ["w0", "w1", "w2"], strict=True):
        np.testing.assert_array_equal(s["x"], np.flatnonzero(worker == name))
    assert set(worker[spikes["x"]]) == {"w2"}
    assert png != render_risk(risk, title="t", scale=0.5, dpi=30)  # without names: one line


def test_only_one_workers_queries_keep_their_place_and_colour(scatters: list[dict[str, Any]]) -> None:
    risk, worker = series()
    png = render_risk(risk, title="t", worker=worker, only="w1", scale=0.5, dpi=30)
    mine, spikes = scatters
    np.testing.assert_array_equal(mine["x"], np.flatnonzero(worker == "w1"))  # at their query index
    assert mine["color"] == WORKER_COLOURS[1]  # as in the picture of all workers
    assert spikes["x"].size == 0 and spikes["label"] == "spikes of worker 'w1': 0 (0.0%)"
    render_risk(risk, title="t", worker=worker, only="w2", scale=0.5, dpi=30)
    assert scatters[-1]["label"] == "spikes of worker 'w2': 27 (20.3%)"
    assert png != render_risk(risk, title="t", worker=worker, only="w2", scale=0.5, dpi=30)


def test_a_worker_without_queries_or_queries_without_names_are_said() -> None:
    risk, worker = series()
    nobody = render_risk(risk, title="t", worker=worker, only="ghost", dpi=30)
    unnamed = render_risk(risk, title="t", only="w1", dpi=30)
    assert png_size(nobody) == png_size(unnamed) == (360, 150)
    assert nobody != unnamed
    assert nobody == plots._message(plots.RISK_SIZE, 30, "t", "no recorded queries from worker 'ghost'")
    assert unnamed == plots._message(plots.RISK_SIZE, 30, "t", "the recorded queries carry no worker names")
    with pytest.raises(ValueError, match="worker"):
        render_risk(risk, title="t", worker=worker[:10])


def with_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded queries that name their worker: w0, w1, w2 in turn."""
    real = Memory.recorded_queries

    def named(self: Memory) -> dict[str, np.ndarray]:
        cols = real(self)
        cols["worker"] = np.array([f"w{i % 3}" for i in range(cols["risk"].size)], dtype=object)
        return cols

    monkeypatch.setattr(Memory, "recorded_queries", named)


def test_risk_png_worker_draws_that_workers_queries(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(client, 100)
    record_queries(client, 60)
    with_workers(monkeypatch)
    seen = render_arguments(monkeypatch)
    everyone = client.get("/risk.png?dpi=30")
    one = client.get("/risk.png?dpi=30&worker=w1")
    other = client.get("/memories/default/risk.png?dpi=30&worker=w2")
    assert {r.status_code for r in (everyone, one, other)} == {200}
    assert png_size(one.content) == (360, 150)
    assert len({everyone.content, one.content, other.content}) == 3
    assert seen[0]["only"] is None and list(seen[0]["worker"][:3]) == ["w0", "w1", "w2"]
    assert seen[1]["only"] == "w1"
    again = client.get("/risk.png?dpi=30&worker=w1")
    assert again.headers["x-cache"] == "HIT" and again.content == one.content
    assert client.get(f"/risk.png?worker={'x' * 65}").status_code == 422


def test_risk_png_worker_without_named_queries_says_so(client: TestClient) -> None:
    write(client, 100)
    record_queries(client, 60)
    r = client.get("/risk.png?dpi=30&worker=w1")
    assert r.status_code == 200
    assert r.content == plots._message(
        plots.RISK_SIZE,
        30,
        "default: kernel risk of the last 60 recorded queries",
        "the recorded queries carry no worker names",
    )


def test_the_map_says_the_range_its_colours_span(monkeypatch: pytest.MonkeyPatch) -> None:
    titles: list[str] = []
    real = Axes.set_title

    def spy(self: Axes, label: str, *args: Any, **kwargs: Any) -> Any:
        titles.append(label)
        return real(self, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_title", spy)
    rng = np.random.default_rng(0)
    n = 500
    soft = 0.02 + 0.34 * rng.uniform(size=n)  # a run that never binds well: yellow is 0.36 here
    render_map(
        rng.normal(size=(n, 4)),
        soft,
        np.ones(n),
        soft,
        1 - soft,
        title="t",
        dpi=20,
        clim={"lambda_bind": (0.0, 1.0)},
    )
    lo, hi = np.percentile(soft, [1, 99])
    assert (
        titles[0]
        == f"z-memory: soft_bind\ncolours: purple {lo:.3g} … yellow {hi:.3g} (1st–99th percentile shown)"
    )
    assert titles[2] == "z-memory: lambda_bind\ncolours: purple 0 … yellow 1 (fixed)"


@pytest.mark.e2e
def test_each_client_s_recorded_queries_carry_its_worker_through_a_real_server(tmp_path) -> None:
    """`risk()` from a plain client and from a replica names the client's worker with each
    recorded query (the query's `worker`; the replica's posted records), so a real server's
    `risk.png?worker=` draws that worker's queries; a worker that asked nothing gets the
    picture saying so."""
    import httpx
    import torch

    from zmem_client import ZMemClient

    from ..server import Server

    srv = Server(tmp_path / "data", "--min-size", "1", "--k", "8").start()
    try:
        rng = np.random.default_rng(0)
        with ZMemClient(srv.url, worker="writer") as mem:
            for z in rng.normal(size=(200, 4)).astype(np.float32):
                mem.record(z, soft_bind=0.5, cone_vol=1.0, lambda_bind=0.1)
        for worker, replica in (("w0", False), ("w1", True)):
            with ZMemClient(srv.url, worker=worker, replica=replica) as mem:
                for z in rng.normal(size=(30, 4)).astype(np.float32):
                    mem.risk(torch.from_numpy(z))
                mem.flush(timeout=30)  # the replica's records are posted
        title = "default: kernel risk of the last 60 recorded queries"
        for worker in ("w0", "w1", "w9"):
            r = httpx.get(f"{srv.url}/risk.png", params={"dpi": 30, "worker": worker}, timeout=60)
            assert r.status_code == 200
            nobody = plots._message(plots.RISK_SIZE, 30, title, f"no recorded queries from worker {worker!r}")
            unnamed = plots._message(plots.RISK_SIZE, 30, title, "the recorded queries carry no worker names")
            assert r.content != unnamed
            assert (r.content == nobody) == (worker == "w9"), worker
    finally:
        srv.stop()
