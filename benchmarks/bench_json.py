"""JSON by the service: a neighbour answer encoded (`codecs.encode_json`) and request bodies
decoded (`codecs.parse_json`), next to the stdlib and the native parsers.

    python -m benchmarks.bench_json [--b 256] [--k 64] [--d 32] [--iters 20] [--sizes 64K,256K,1M,4M]

The answer is what `POST /neighbors` sends as JSON: `z` float32 B×k×d, `risk_target` and `d2`
float32 B×k, `seq` int64 B×k, and the small fields. Rows: the service's encoder, and
`json.dumps` of the same answer as lists in one call (what the slab loop did per slab).
Prints the median and best time of each and the answer's size.

The bodies are `POST /episodes` bodies of about each size: episodes of d = 64 (z rounded to
6 digits), and one-digit numbers, the slowest to parse per byte (the time a native parser
holds the GIL for a body of that size, at worst). Columns:
the service's parse (whole by pydantic_core up to `codecs.NATIVE_BYTES`, in steps above),
the stepwise parser (`jsonchunks.loads`), `json.loads`, `pydantic_core.from_json` and
`orjson.loads`, each in one call; medians in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import orjson
import pydantic_core

from zmem_service.http import jsonchunks
from zmem_service.http.codecs import encode_json, json_values_cap, parse_json


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
    parser.add_argument("--sizes", default="64K,256K,1M,4M", help="decoded body sizes")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, k, d = args.b, args.k, args.d
    arrays: dict[str, np.ndarray] = {
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
    decode(args.sizes, args.iters, rng)


def decode(sizes: str, iters: int, rng: np.random.Generator, d: int = 64) -> None:
    cap = json_values_cap(10_000)
    columns: dict[str, Callable[[bytes], object]] = {
        "service": lambda body: parse_json(body, cap),
        "stepwise": lambda body: jsonchunks.loads(body.decode()),
        "json.loads": lambda body: json.loads(body.decode()),
        "pydantic_core": pydantic_core.from_json,
        "orjson": orjson.loads,
    }
    print(f"\nJSON bodies: episodes (d={d}) and one-digit numbers (the slowest per byte); median ms")
    print(f"{'body':<22}" + "".join(f" {name:>13}" for name in columns))
    units = {"K": 1 << 10, "M": 1 << 20}
    for size in sizes.split(","):
        nbytes = int(size[:-1]) * units[size[-1]]
        n = max(1, nbytes // (d * 12 + 70))
        z = rng.standard_normal((n, d)).round(6).tolist()
        eps = [{"z": row, "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for row in z]
        bodies = {
            f"{size} {n} episodes": json.dumps({"episodes": eps}).encode(),
            f"{size} [1,1,…]": ('{"episodes": [' + ",".join(["1"] * (nbytes // 2 - 8)) + "]}").encode(),
        }
        for name, body in bodies.items():
            assert all(parse(body) == json.loads(body) for parse in columns.values())
            times = [1000 * timed(partial(parse, body), iters)[0] for parse in columns.values()]
            print(f"{name:<22}" + "".join(f" {t:>13.2f}" for t in times))


if __name__ == "__main__":
    main()
