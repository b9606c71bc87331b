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
