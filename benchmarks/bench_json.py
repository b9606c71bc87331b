"""A JSON neighbour answer encoded by the service (`codecs.encode_json`), next to the stdlib floor.

    python -m benchmarks.bench_json [--b 256] [--k 64] [--d 32] [--iters 20]

The answer is what `POST /neighbors` sends as JSON: `z` float32 B×k×d, `risk_target` and `d2`
float32 B×k, `seq` int64 B×k, and the small fields. Rows: the service's encoder, and
`json.dumps` of the same answer as lists in one call (what the slab loop did per slab).
Prints the median and best time of each and the answer's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from zmem_service.http.codecs import encode_json


def timed(step: Callable[[], object], iters: int) -> tuple[float, float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, k, d = args.b, args.k, args.d
    arrays = {
        "z": rng.standard_normal((b, k, d)).astype(np.float32),
        "risk_target": rng.random((b, k)).astype(np.float32),
        "d2": rng.random((b, k)).astype(np.float32) * 40,
        "seq": rng.integers(1, 10**6, (b, k)).astype(np.int64),
    }
    meta = {"size": 50_000, "active": True, "k": k, "sigma": 1.0}
    limit = 1 << 30
    answer = encode_json(meta, arrays, limit)

    def stdlib() -> bytes:
        lists = {key: a.tolist() for key, a in arrays.items()}
        return json.dumps({**meta, **lists}, separators=(",", ":")).encode()

    assert json.loads(answer) == json.loads(stdlib())  # the same numbers, to the last digit
    print(f"JSON neighbour answer B={b} k={k} d={d}: {len(answer) / 2**20:.1f} MiB")
    print(f"{'encoder':<40} {'median ms':>10} {'best ms':>10}")
    for name, step in (
        ("service (codecs.encode_json)", lambda: encode_json(meta, arrays, limit)),
        ("stdlib json.dumps, one call", stdlib),
    ):
        median, best = timed(step, args.iters)
        print(f"{name:<40} {1000 * median:>10.1f} {1000 * best:>10.1f}")


if __name__ == "__main__":
    main()
