"""How often each verdict is right on synthetic runs with known truths (not run in CI: long).

For every scenario of ``benchmarks.verdict_scenarios`` and seeds 0..S−1, judges the run
with ``diagnostics.evaluate`` (what ``GET …/diagnostics`` answers) and counts, per verdict,
the passes against the scenario's truth; then prints, per verdict, the false-fail rate on
runs whose truth is a pass and the catch rate on runs whose truth is a fail.

    python -m benchmarks.calibrate_verdicts [--seeds 10] [--only NAME ...] [--why]

``--why`` prints the reading of every run that disagrees with its truth.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

from benchmarks.verdict_scenarios import SCENARIOS, run
from zmem_service.diagnostics.criteria import evaluate

VERDICTS = ("density", "reliability", "convergence", "kernel")


def judge(name: str, seed: int) -> dict[str, dict[str, Any]]:
    r = run(name, seed)
    result = evaluate(
        r["z"],
        r["soft_bind"],
        r["lambda_bind"],
        r["queries"],
        min_size=r["min_size"],
        sigma=r["sigma"],
        k=r["k"],
        risk_target=r["risk_target"],
        worker=r["worker"],
    )
    return {c["name"]: c for c in result["criteria"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None, help="scenario names (default: all)")
    ap.add_argument("--why", action="store_true", help="print the readings of the disagreements")
    args = ap.parse_args()
    names = args.only or list(SCENARIOS)
    t0 = time.monotonic()
    # verdict → truth → [passed count, runs]
    totals: dict[str, dict[bool, list[int]]] = defaultdict(lambda: {True: [0, 0], False: [0, 0]})
    print(f"| scenario | set | {' | '.join(VERDICTS)} |")
    print("|---|---|" + "---|" * len(VERDICTS))
    for name in names:
        sc = SCENARIOS[name]
        passes: dict[str, int] = defaultdict(int)
        nulls: dict[str, int] = defaultdict(int)
        wrong: list[str] = []
        for seed in range(args.seeds):
            got = judge(name, seed)
            for v in VERDICTS:
                p = got[v]["passed"]
                passes[v] += p is True
                nulls[v] += p is None
                if v in sc.truth:
                    totals[v][sc.truth[v]][0] += p is True
                    totals[v][sc.truth[v]][1] += 1
                    if p is not sc.truth[v]:
                        wrong.append(f"  seed {seed} {v} ({p}, truth {sc.truth[v]}): {got[v]['reading']}")
        cells = []
        for v in VERDICTS:
            cell = f"{passes[v]}/{args.seeds} pass"
            if v in sc.truth:
                right = passes[v] if sc.truth[v] else args.seeds - passes[v]
                cell += f" (truth {'pass' if sc.truth[v] else 'fail'}: {right}/{args.seeds} right)"
            if nulls[v]:
                cell += f", {nulls[v]} null"
            cells.append(cell)
        print(f"| {name} | {sc.family} | " + " | ".join(cells) + " |", flush=True)
        if args.why:
            for line in wrong:
                print(line)
    print()
    print("| verdict | good runs passed (false-fail rate) | bad runs caught (catch rate) |")
    print("|---|---|---|")
    for v in VERDICTS:
        good, bad = totals[v][True], totals[v][False]
        g = f"{good[0]}/{good[1]} ({1 - good[0] / good[1]:.0%} false fails)" if good[1] else "n/a"
        b = f"{bad[1] - bad[0]}/{bad[1]} ({(bad[1] - bad[0]) / bad[1]:.0%} caught)" if bad[1] else "n/a"
        print(f"| {v} | {g} | {b} |")
    print(f"\n{len(names)} scenarios × {args.seeds} seeds in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
