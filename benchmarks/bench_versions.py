"""Two versions of zmem side by side: risk(z) B=1 fwd+bwd over loopback, each tree's own client
and server, in alternating rounds, with the in-process floor measured between rounds, in one run.

    git worktree add --detach /tmp/zmem-old <commit>
    python -m benchmarks.bench_versions /tmp/zmem-old .

Each tree runs from its source folders (PYTHONPATH=<tree>/core:<tree>/service:<tree>/client:
<tree>/demo; folders an older tree lacks are skipped by Python), so
an old commit needs no install. Printed per tree: latency p50/p99, the ratio to the
floor, and the server's and the client's CPU per call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.server import Server

from .bench_concurrency import cpu_seconds
from .bench_risk import Data, fill, floor_step

# One tree's client: warms up, says "ready", waits for a line, then times `calls` steps.
CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from zmem_client import ZMemClient
torch.set_num_threads(1)
mem = ZMemClient(sys.argv[1], timeout=60)
qs = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 1, int(sys.argv[3]))) * 0.3).float()
def step(i):
    z = qs[i % 64].clone().requires_grad_(True)
    mem.risk(z).sum().backward()
for i in range(20):
    step(i)
print("ready", flush=True)
sys.stdin.readline()
r0, lat = resource.getrusage(resource.RUSAGE_SELF), []
for i in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    step(i)
    lat.append(time.perf_counter() - t0)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"lat": lat, "cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime}), flush=True)
"""


def tree_env(tree: str) -> dict[str, str]:
    return {"PYTHONPATH": f"{tree}/core:{tree}/service:{tree}/client:{tree}/demo"}


def one_round(tree: str, srv: Server, calls: int, d: int) -> tuple[list[float], float, float]:
    """(latencies, client CPU s, server CPU s) of `calls` steps by a fresh client of `tree`."""
    assert srv.proc is not None
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, srv.url, str(calls), str(d)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**tree_env(tree), "PATH": "/usr/bin:/bin"},
    )
    assert child.stdin is not None and child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the client of {tree} did not start")
    cpu0 = cpu_seconds(srv.proc.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    out = json.loads(child.stdout.readline())
    server_cpu = cpu_seconds(srv.proc.pid) - cpu0
    child.wait(60)
    return out["lat"], out["cpu"], server_cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs=2, help="the older and the newer source tree")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=200, help="calls per tree per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    trees = [str(Path(t).resolve()) for t in args.trees]
    data = Data.random(args.n, args.d)
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 1, args.d)) * 0.3).float()
    floor = floor_step(data, args.k, 1.0, queries, 1)
    with tempfile.TemporaryDirectory() as tmp:
        srvs = []
        try:
            for i, tree in enumerate(trees):
                srv = Server(
                    Path(tmp) / f"data{i}",
                    *("--capacity", str(args.n), "--k", str(args.k), "--durability", "none"),
                    env=tree_env(tree),
                )
                srvs.append(srv.start(timeout=120))
                fill(srv.url, data)
            lat: list[list[float]] = [[], []]
            client = [0.0, 0.0]
            server = [0.0, 0.0]
            floor_lat = []
            for _ in range(20):
                floor()
            for _ in range(args.rounds):
                for i, tree in enumerate(trees):
                    took, c, s = one_round(tree, srvs[i], args.calls, args.d)
                    lat[i] += took
                    client[i] += c
                    server[i] += s
                    for _ in range(args.calls // 2):
                        t0 = time.perf_counter()
                        floor()
                        floor_lat.append(time.perf_counter() - t0)
        finally:
            for srv in srvs:
                srv.stop()
    calls = args.rounds * args.calls
    fl = 1e3 * np.array(floor_lat)
    print(
        f"risk(z) B=1 fwd+bwd, N={args.n}, d={args.d}, k={args.k}, "
        f"{args.rounds} alternating rounds of {args.calls} calls per tree"
    )
    cols = f"{'p50 ms':>7} {'p99 ms':>7} {'× floor':>8} {'server CPU µs':>14} {'client CPU µs':>14}"
    print(f"{'path':56} {cols}")
    p50 = float(np.median(fl))
    name = "in-process floor (faiss 1 thread + kernel + bwd)"
    print(f"{name:56} {p50:7.3f} {np.percentile(fl, 99):7.3f} {1.0:8.2f}")
    for i, tree in enumerate(trees):
        ms = 1e3 * np.array(lat[i])
        print(
            f"{'risk(z) loopback, ' + tree:56} {np.median(ms):7.3f} {np.percentile(ms, 99):7.3f} "
            f"{np.median(ms) / p50:8.2f} {1e6 * server[i] / calls:14.0f} {1e6 * client[i] / calls:14.0f}"
        )


if __name__ == "__main__":
    main()
