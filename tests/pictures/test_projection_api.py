"""`?projection=risk` on the map, the trail and the diagnostics, alone and with `?basis=NAME`."""

from __future__ import annotations

from fastapi.testclient import TestClient

from .test_pictures_api import write


def test_the_risk_projection_is_a_view_of_its_own(client: TestClient) -> None:
    write(client, 200, base="/memories/a", seed=1)
    write(client, 200, base="/memories/b", seed=2)
    for route in ("map.png", "trail.png"):
        pca = client.get(f"/memories/a/{route}?dpi=30")
        risk = client.get(f"/memories/a/{route}?dpi=30&projection=risk")
        both = client.get(f"/memories/a/{route}?dpi=30&projection=risk&basis=b")
        assert pca.status_code == risk.status_code == both.status_code == 200
        assert len({pca.headers["etag"], risk.headers["etag"], both.headers["etag"]}) == 3
        assert client.get(f"/memories/a/{route}?dpi=30&projection=risk").headers["x-cache"] == "HIT"
        r = client.get(f"/memories/a/{route}?projection=tsne")
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "projection"]


def test_diagnostics_quote_islands_on_the_map_they_are_asked_for(client: TestClient) -> None:
    write(client, 300, base="/memories/a", seed=1)
    write(client, 300, base="/memories/b", seed=2)
    own = client.get("/memories/a/diagnostics").json()
    risk = client.get("/memories/a/diagnostics?projection=risk&basis=b").json()
    assert [c["name"] for c in risk["criteria"]] == ["density", "reliability", "convergence", "kernel"]
    density = {c["name"]: c for c in risk["criteria"]}["density"]
    assert "risk map of 'b'" in density["reading"]
    assert "on the PCA map" in {c["name"]: c for c in own["criteria"]}["density"]["reading"]
    assert client.get("/memories/a/diagnostics?basis=nobody").status_code == 404
    assert client.get("/memories/a/diagnostics?projection=tsne").status_code == 422
