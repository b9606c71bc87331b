"""risk(z) forward+backward over loopback vs the seed's in-process memory_risk, same data.

    python -m benchmarks.bench_risk [--n 50000] [--d 32] [--k 64] [--iters 300]

Prints p50/p99 latency per call: the client's local replica (`replica=True`), the
network path, and the seed in-process. The seed's `memory_risk` restacks its deque of
dicts into tensors on every call (that is its design); "seed, tensors cached" is
the same math with the stacking hoisted out, the floor of any in-process version.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.seed_reference import SeedMemory
from tests.server import Server
from zmem_client import ZMemClient


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(fn, iters: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256, help="rows of the batched query row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((args.n, args.d)) * 0.3).astype(np.float32)
    soft, cone, lam = rng.uniform(size=(3, args.n)).astype(np.float32)

    seed = SeedMemory(mem_size=args.n, mem_k=args.k)
    for i in range(args.n):
        seed.append(torch.from_numpy(z[i]).unsqueeze(0), soft[i], cone[i], lam[i])

    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(
            Path(tmp) / "data", "--capacity", str(args.n), "--k", str(args.k), "--durability", "none"
        ).start()
        try:
            with ZMemClient(srv.url, batch_size=4096, timeout=30) as mem:
                for i in range(args.n):
                    mem.record(z[i], soft_bind=soft[i], cone_vol=cone[i], lambda_bind=lam[i])
                mem.flush()
                queries = torch.from_numpy(rng.standard_normal((args.iters, 1, args.d)) * 0.3).float()
                it = iter(range(10**9))

                def step(client_risk=mem.risk) -> None:  # type: ignore[no-untyped-def]
                    q = queries[next(it) % args.iters].clone().requires_grad_(True)
                    client_risk(q).backward()

                timed(step, 20)  # warm-up
                rows = [("zmem client risk(z), loopback", percentiles(timed(step, args.iters)))]
                seq_times = timed(lambda: mem.risk(queries[0], record=False), args.iters)
                rows.append(("  forward only", percentiles(seq_times)))
                big = torch.from_numpy(rng.standard_normal((args.batch, args.d)) * 0.3).float()
                bt = timed(lambda: mem.risk(big.clone().requires_grad_(True)).sum().backward(), 30)
                p50, p99 = percentiles(bt)
                rows.append((f"zmem client risk(z), B={args.batch} (per call)", (p50, p99)))
            with ZMemClient(srv.url, timeout=30, replica=True) as local:
                assert local.replica is not None
                local.replica.sync()
                timed(lambda: step(local.risk), 20)  # warm-up
                replica_rows = [
                    (
                        "zmem replica risk(z), in-process",
                        percentiles(timed(lambda: step(local.risk), args.iters)),
                    )
                ]
                rt = timed(lambda: local.risk(big.clone().requires_grad_(True)).sum().backward(), 30)
                replica_rows.append((f"zmem replica risk(z), B={args.batch} (per call)", percentiles(rt)))
            rows = replica_rows + rows
        finally:
            srv.stop()

    def seed_step() -> None:
        q = queries[next(it) % args.iters].clone().requires_grad_(True)
        seed.memory_risk(q).backward()

    seed_iters = max(10, args.iters // 10)
    rows.append(
        (f"seed memory_risk, in-process ({seed_iters} calls)", percentiles(timed(seed_step, seed_iters)))
    )
    Z, s_, c_, l_ = seed._mem_tensors("cpu")
    r = seed._mem_risk_targets(s_, c_, l_)

    def cached_step() -> None:
        q = queries[next(it) % args.iters].clone().requires_grad_(True)
        d2 = torch.sum((Z - q.squeeze(0)) ** 2, dim=-1)
        vals, idx = torch.topk(d2, k=args.k, largest=False)
        w = torch.exp(-vals / 2.0)
        w = w / (w.sum() + 1e-8)
        torch.sum(w * r[idx]).backward()

    rows.append(("seed, tensors cached, in-process", percentiles(timed(cached_step, args.iters))))
    print(f"\nrisk(z) forward+backward, N={args.n}, d={args.d}, k={args.k}, torch threads=1")
    print(f"{'':50} {'p50 ms':>9} {'p99 ms':>9}")
    for name, (p50, p99) in rows:
        print(f"{name:50} {p50:9.3f} {p99:9.3f}")


if __name__ == "__main__":
    main()
