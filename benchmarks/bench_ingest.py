"""Sustained ingest with concurrent writers: durable (group commit) vs --durability none.

    python -m benchmarks.bench_ingest [--writers 8] [--seconds 5] [--d 32]

Each writer is a process posting safetensors batches with ids as fast as it can;
the table gives acknowledged episodes per second. On a 2-core machine the writers
and the server share the cores, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from tests.server import Server
from zmem_core import wire

SAFETENSORS = {"content-type": wire.SAFETENSORS}


def writer(
    url: str, rank: int, per_request: int, d: int, seconds: float, go: mp.Event, out: mp.Queue
) -> None:
    rng = np.random.default_rng(rank)
    z = rng.standard_normal((per_request, d)).astype(np.float32)
    ones = np.ones(per_request, np.float32)
    acked, sent = 0, 0
    with httpx.Client(base_url=url, timeout=30) as http:
        go.wait()  # all writers start together, after their imports
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            ids = [f"{rank}-{sent + i}" for i in range(per_request)]
            body = wire.encode(
                {"z": z, "soft_bind": ones * 0.5, "cone_vol": ones, "lambda_bind": ones}, {"id": ids}
            )
            r = http.post("/episodes", content=body, headers=SAFETENSORS)
            r.raise_for_status()
            acked += r.json()["accepted"]
            sent += per_request
    out.put(acked)


def run(durability: str, writers: int, per_request: int, d: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data", "--durability", durability, "--capacity", "1000000").start()
        try:
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()
            go = ctx.Event()
            procs = [
                ctx.Process(target=writer, args=(srv.url, r, per_request, d, seconds, go, out))
                for r in range(writers)
            ]
            for p in procs:
                p.start()
            time.sleep(5)  # let every writer import and connect
            go.set()
            total = sum(out.get(timeout=seconds + 120) for _ in procs)
            for p in procs:
                p.join()
            return total / seconds
        finally:
            srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--d", type=int, default=32)
    args = ap.parse_args()
    print(f"\ningest: {args.writers} writer processes, {args.seconds:.0f} s each, d={args.d}")
    print(f"{'episodes/request':>17} {'durability':>11} {'episodes/s':>12}")
    for per_request in (1, 256):
        for durability in ("full", "none"):
            rate = run(durability, args.writers, per_request, args.d, args.seconds)
            print(f"{per_request:>17} {durability:>11} {rate:>12,.0f}")


if __name__ == "__main__":
    main()
