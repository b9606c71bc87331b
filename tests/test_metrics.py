"""/metrics by Prometheus's conventions: units in the names, gauges read at scrape time, the
process's own metrics and the build's version."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zmem_core import __version__
from zmem_service.settings import ServiceSettings

EPISODES = {"episodes": [{"z": [0.1, 0.2], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1}] * 3}


def scrape(client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:  # type: ignore[no-untyped-def]
    """Sample name → {labels: value} of one /metrics answer."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_have_units_state_process_and_build(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(durability="none", capacity=100, min_size=1)
    assert client.post("/memories/a/episodes", json=EPISODES).status_code == 200
    assert client.post("/memories/b/episodes", json=EPISODES).status_code == 200
    assert client.post("/memories/a/neighbors", json={"z": [0.1, 0.2]}).status_code == 200
    seen = scrape(client)
    assert seen["zmem_memory_size_episodes"][(("memory", "a"),)] == 3
    assert seen["zmem_memory_capacity_episodes"][(("memory", "b"),)] == 100
    assert seen["zmem_memory_bytes"][(("memory", "a"),)] > 0
    assert seen["zmem_memory_budget_bytes"][()] == ServiceSettings().max_memory_bytes
    assert seen["zmem_episodes_accepted_total"][(("memory", "a"),)] == 3
    route = (("method", "POST"), ("route", "/memories/{name}/neighbors"))
    assert seen["zmem_http_request_duration_seconds_count"][route] == 1
    assert seen["zmem_http_requests_total"][(*route[:1], route[1], ("status", "200"))] == 1
    assert seen["zmem_build_info"][(("version", __version__),)] == 1
    assert "process_resident_memory_bytes" in seen and "process_open_fds" in seen
    assert "python_gc_collections_total" in seen and "python_info" in seen
    for old in ("zmem_memory_size", "zmem_request_seconds_count", "zmem_requests_total", "zmem_ring_bytes"):
        assert old not in seen

    # A deleted memory leaves no series behind: the gauges are read from the memories that exist.
    assert client.delete("/memories/b").status_code == 204
    seen = scrape(client)
    for name in (
        "zmem_memory_size_episodes",
        "zmem_memory_capacity_episodes",
        "zmem_episodes_accepted_total",
    ):
        assert (("memory", "b"),) not in seen[name] and (("memory", "a"),) in seen[name], name


def test_an_answer_that_fails_to_go_out_counts_as_a_500(make_client, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """The hot path counts and logs a failure in sending its answer, as the middleware would."""
    from zmem_service.http import streaming

    client = make_client(durability="none", capacity=100, min_size=1)
    assert client.post("/memories/a/episodes", json=EPISODES).status_code == 200
    sent = streaming.Answer.__call__

    async def failing(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["path"].endswith("/neighbors"):
            raise RuntimeError("the transport failed")
        await sent(self, scope, receive, send)

    monkeypatch.setattr(streaming.Answer, "__call__", failing)
    with pytest.raises(RuntimeError, match="the transport failed"):  # the test client passes it on
        client.post("/memories/a/neighbors", json={"z": [0.1, 0.2]})
    monkeypatch.setattr(streaming.Answer, "__call__", sent)
    route = (("method", "POST"), ("route", "/memories/{name}/neighbors"))
    assert scrape(client)["zmem_http_requests_total"][(*route[:1], route[1], ("status", "500"))] == 1
    assert any("sending the answer" in r.getMessage() for r in caplog.records)
