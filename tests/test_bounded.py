"""Memory stays bounded by --max-memory-bytes under scaled-down hostile loads (exports, stats,
zip-bomb imports, 128-character ids, recorded queries); `benchmarks/bench_memory.py` runs the
full sizes."""

from __future__ import annotations

import pytest

from benchmarks.bench_memory import MIB, run

EXPORTS_AT_ONCE = 2  # the default --max-concurrent-exports


@pytest.mark.e2e
@pytest.mark.slow
def test_rss_stays_within_the_budget_plus_a_stated_overhead() -> None:
    """The bound: idle RSS + the budget + one copy of the buffer per export being built
    (EXPORTS_AT_ONCE) + 64 MiB for requests in flight. Every memory is filled to its budget
    with 128-character ids first; ids are counted at their real cost, so the fill stops there."""
    budget = 24 * MIB
    r = run(budget, readers=12, bombs=2, bomb_rows=16 * budget // 128)
    bound = r["idle_rss"] + budget * (1 + EXPORTS_AT_ONCE) + 64 * MIB
    print(
        f"\nRSS idle {r['idle_rss'] / MIB:.0f} MiB, filled {r['filled_rss'] / MIB:.0f} MiB, "
        f"peak {r['peak_rss'] / MIB:.0f} MiB; bound {bound / MIB:.0f} MiB ({r['rows']} episodes)"
    )
    assert r["alive"]
    assert r["rows"] > 0
    assert r["filled_rss"] - r["idle_rss"] < 2 * budget  # what the budget counts is what it costs
    assert r["peak_rss"] < bound
    assert set(r["codes"]) <= {200, 503, 507}  # 503: exports past the queue; 507: the bombs


def test_recorded_queries_stop_growing_at_the_budget(make_client) -> None:
    """Read-only clients recording queries can't grow memory past --max-memory-bytes: each
    memory's query log stops growing where the budget runs out and keeps its newest rows."""
    budget = 600_000
    client = make_client(max_memory_bytes=budget, capacity=1000, min_size=1, recorded_queries=100_000)
    ep = {"z": [0.0, 1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
    for name in ("a", "b", "c"):
        assert client.post(f"/memories/{name}/episodes", json={"episodes": [ep] * 10}).status_code == 200
    rows = {"risk": [0.5] * 5000, "wsum": [1.0] * 5000, "n_eff": [3.0] * 5000}
    for _ in range(6):
        for name in ("a", "b", "c"):
            assert client.post(f"/memories/{name}/queries", json=rows).status_code == 200
            q = client.post(f"/memories/{name}/neighbors", json={"z": [[0.0, 1.0]] * 100, "record": True})
            assert q.status_code == 200
    stats = [client.get(f"/memories/{name}/stats").json() for name in ("a", "b", "c")]
    assert sum(s["bytes"] for s in stats) <= budget
    assert 0 < stats[0]["recorded_queries"] < 30_000  # capped below the 30,600 recorded
    assert client.post("/memories/c/queries", json=rows).status_code == 200  # still answered
    assert [client.get(f"/memories/{n}/stats").json()["bytes"] for n in "abc"] == [s["bytes"] for s in stats]
    assert client.get("/memories/a/diagnostics").status_code == 200
