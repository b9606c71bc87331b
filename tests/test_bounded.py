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


LOG_ROWS = 20_000  # --recorded-queries in these tests
LOG_BYTES = LOG_ROWS * 5 * 8  # risk, wsum, n_eff, ts and the worker's code as float64
EP = {"z": [0.0, 1.0], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}


def ring_bytes(make_client) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """What the budget counts for memory `a` (capacity 1000, z_dim 2, no ids, no query log)
    after 10 episodes and after 1000."""
    probe = make_client(capacity=1000, min_size=1, recorded_queries=0)
    probe.post("/memories/a/episodes", json={"episodes": [EP] * 10})
    ten = probe.get("/memories/a/stats").json()["bytes"]
    probe.post("/memories/a/episodes", json={"episodes": [EP] * 990})
    return ten, probe.get("/memories/a/stats").json()["bytes"]


def writes_under(make_client, budget: int, record: bool) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """The status of each write of a fixed sequence into memory `a` under `budget`, with or
    without read requests recording queries between them; and `a`'s bytes before and after
    those reads."""
    client = make_client(max_memory_bytes=budget, capacity=1000, min_size=1, recorded_queries=LOG_ROWS)
    codes = [client.post("/memories/a/episodes", json={"episodes": [EP] * 10}).status_code]
    bytes_before = client.get("/memories/a/stats").json().get("bytes", 0)
    if record:
        rows = {"risk": [0.5] * 1000, "wsum": [1.0] * 1000, "n_eff": [3.0] * 1000}
        for _ in range(15):  # more rows than the log keeps, a few at a time
            client.post("/memories/a/queries", json=rows)
            client.post("/memories/a/neighbors", json={"z": [[0.0, 1.0]] * 500, "record": True})
    bytes_after = client.get("/memories/a/stats").json().get("bytes", 0)
    codes.append(client.post("/memories/a/episodes", json={"episodes": [EP] * 990}).status_code)  # grows
    codes.append(client.post("/memories/a/episodes", json={"episodes": [EP] * 10}).status_code)  # FIFO
    return codes, [bytes_before, bytes_after]


@pytest.mark.parametrize("share", [0.4, 0.82, 1.0])
def test_recorded_queries_never_take_room_that_episodes_need(make_client, share: float) -> None:
    """Whether a write fits never depends on the queries recorded before it: each memory's
    log is counted at its full bound from its first rows on, so reads (a read token's or
    training's `record=True`) can't spend the budget a later write that grows the ring needs.
    The budgets leave room for the ring and `share` of the log; with room for the whole log,
    every write succeeds however much was recorded."""
    ten, full_ring = ring_bytes(make_client)
    budget = ten + int(share * LOG_BYTES) if share < 1 else full_ring + LOG_BYTES
    assert budget > full_ring  # the ring alone always fits
    quiet, _ = writes_under(make_client, budget, record=False)
    busy, (before, after) = writes_under(make_client, budget, record=True)
    assert busy == quiet
    assert after == before  # recording took nothing more from the budget
    if share == 1.0:
        assert busy == [200, 200, 200]


def test_each_memorys_recorded_queries_keep_their_own_bound(make_client) -> None:
    """Read-only clients recording queries can't grow memory past --max-memory-bytes: each
    memory's log keeps its last --recorded-queries rows, counted in the budget from the
    memory's first rows; a memory without rows takes that room with its first recorded query,
    or refuses it (507, nothing kept) when the budget has none."""
    ten, _ = ring_bytes(make_client)
    budget = 3 * (ten + LOG_BYTES) + 1000
    client = make_client(max_memory_bytes=budget, capacity=1000, min_size=1, recorded_queries=LOG_ROWS)
    for name in ("a", "b", "c"):
        assert client.post(f"/memories/{name}/episodes", json={"episodes": [EP] * 10}).status_code == 200
    counted = [client.get(f"/memories/{n}/stats").json()["bytes"] for n in "abc"]
    assert sum(counted) <= budget
    rows = {"risk": [0.5] * 5000, "wsum": [1.0] * 5000, "n_eff": [3.0] * 5000}
    for _ in range(6):
        for name in ("a", "b", "c"):
            assert client.post(f"/memories/{name}/queries", json=rows).status_code == 200
            q = client.post(f"/memories/{name}/neighbors", json={"z": [[0.0, 1.0]] * 100, "record": True})
            assert q.status_code == 200
    stats = [client.get(f"/memories/{name}/stats").json() for name in ("a", "b", "c")]
    assert [s["bytes"] for s in stats] == counted
    assert [s["recorded_queries"] for s in stats] == [LOG_ROWS] * 3  # the last LOG_ROWS of 30,600
    assert client.get("/memories/a/diagnostics").status_code == 200

    # `default` holds no rows: its log isn't counted until it keeps something, and doesn't fit.
    r = client.post("/queries", json=rows)
    assert r.status_code == 507 and "--max-memory-bytes" in r.json()["detail"]
    assert client.get("/stats").json()["recorded_queries"] == 0
    roomy = make_client(capacity=1000, min_size=1, recorded_queries=LOG_ROWS)
    assert roomy.post("/queries", json=rows).json() == {"recorded": 5000, "recorded_queries": 5000}
    assert roomy.get("/stats").json()["bytes"] == LOG_BYTES
