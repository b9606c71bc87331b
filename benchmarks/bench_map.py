"""/map.png at 50,000 entries (first render, cached), and neighbours latency while a
dashboard polls the map every 100 ms.

    python -m benchmarks.bench_map [--n 50000] [--d 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from tests.server import Server
from zmem_client import ZMemClient


def median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, args.d)) * 3
    z = (centres[rng.integers(0, 8, args.n)] + rng.standard_normal((args.n, args.d)) * 0.5).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data", "--capacity", str(args.n), "--durability", "none").start()
        try:
            with ZMemClient(srv.url, batch_size=4096, timeout=60) as mem:
                for i in range(args.n):
                    mem.record(
                        z[i], soft_bind=rng.uniform(), cone_vol=rng.uniform(), lambda_bind=rng.uniform()
                    )
                mem.flush()
                http = httpx.Client(base_url=srv.url, timeout=60)
                t0 = time.perf_counter()
                http.get("/risk.png")  # starts the render process
                start_ms = (time.perf_counter() - t0) * 1000
                t0 = time.perf_counter()
                first = http.get("/map.png")
                first_ms = (time.perf_counter() - t0) * 1000
                etag = first.headers["etag"]
                cached = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    http.get("/map.png")
                    cached.append(time.perf_counter() - t0)
                revalidated = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    assert http.get("/map.png", headers={"if-none-match": etag}).status_code == 304
                    revalidated.append(time.perf_counter() - t0)

                def neighbors_for(seconds: float) -> list[float]:
                    out = []
                    deadline = time.perf_counter() + seconds
                    while time.perf_counter() < deadline:
                        q = z[rng.integers(args.n)]
                        t0 = time.perf_counter()
                        mem.neighbors(q)
                        out.append(time.perf_counter() - t0)
                    return out

                quiet = neighbors_for(args.seconds)
                stop = threading.Event()
                renders = {"n": 0}

                def poll() -> None:
                    poller = httpx.Client(base_url=srv.url, timeout=60)
                    seed = 0
                    while not stop.is_set():
                        # A new seed each time: every poll is a fresh render, the worst case.
                        poller.get("/map.png", params={"seed": seed})
                        seed += 1
                        renders["n"] += 1
                        stop.wait(0.1)

                poller = threading.Thread(target=poll)
                poller.start()
                busy_uncached = neighbors_for(args.seconds)
                stop.set()
                poller.join()
                stop.clear()

                def poll_cached() -> None:
                    poller = httpx.Client(base_url=srv.url, timeout=60)
                    while not stop.is_set():
                        poller.get("/map.png", headers={"if-none-match": etag})
                        stop.wait(0.1)

                poller = threading.Thread(target=poll_cached)
                poller.start()
                busy_cached = neighbors_for(args.seconds)
                stop.set()
                poller.join()
        finally:
            srv.stop()

    print(f"\n/map.png, N={args.n}, d={args.d} (8 clusters)")
    print(f"{'':44} {'ms':>9}")
    print(f"{'start of the render process (first picture)':44} {start_ms:9.1f}")
    print(f"{'first render':44} {first_ms:9.1f}")
    print(f"{'cached (200, same ETag)':44} {median_ms(cached):9.2f}")
    print(f"{'revalidated (If-None-Match → 304)':44} {median_ms(revalidated):9.2f}")
    print("\nneighbors(z) latency, k=64, single query")
    print(f"{'':44} {'median ms':>9} {'p99 ms':>9} {'calls':>7}")
    for name, t in (
        ("alone", quiet),
        ("while polling map every 100 ms (304s)", busy_cached),
        (f"while re-rendering the map every 100 ms ({renders['n']} renders)", busy_uncached),
    ):
        print(f"{name:44} {median_ms(t):9.2f} {np.percentile(t, 99) * 1000:9.2f} {len(t):7}")


if __name__ == "__main__":
    main()
