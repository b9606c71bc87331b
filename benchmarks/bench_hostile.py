"""Hostile loads at full size against a real server: worst /healthz latency and peak RSS.

    python -m benchmarks.bench_hostile [--max-memory-bytes 4294967296] [--decode-sizes 64K,256K,512K,1M,4M]
        [--decode-seconds 3] [--decode-rate 4] [--only decode]

Loads (issue 9, items 1 and 4), one after another on one server:
- heads: 8 connections each sending a 100 MiB header;
- write: a 30 MiB JSON episodes body;
- answer: a read-token-sized neighbours query whose JSON answer is at max_response_floats
  (2^24 floats: 256 rows × k 1024 × d 64), asked as JSON;
- decode (issue 24, the size below which a body is parsed whole by a native parser), each
  body sent 4 times a second (or as fast as it is answered) for a few seconds, so that a
  faster parser is not sent more of them: per size, the bodies that cost the most to parse
  per byte, `{"episodes": [1,1,…]}` (one-digit numbers) and `{"episodes": ["",…]}` (empty
  strings), refused after parsing (more episodes than max_batch), and a valid episodes body
  (d = 64) for the time a request takes; then empty arrays `[[],[],…]`, 2^16 of them and
  as many as the service's count of arrays, objects and members takes.
While each runs, /healthz is polled every 20 ms. Prints, per load, the answer's status,
how long it took (per request for the decode loads), the worst /healthz latency and the
server's peak RSS (VmRSS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import safetensors.numpy

from tests.server import Server
from zmem_core.limits import MAX_BATCH
from zmem_service.http.codecs import json_values_cap


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


HEAD = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (100 << 20) + b"\r\n\r\n"


def big_head(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        with contextlib.suppress(OSError):
            s.sendall(HEAD)
        with contextlib.suppress(OSError):
            return s.recv(64).split(b"\r\n")[0].decode()
    return "closed"


def size_arg(text: str) -> list[int]:
    """`64K,1M` as bytes."""
    units = {"K": 1 << 10, "M": 1 << 20}
    return [int(part[:-1]) * units[part[-1]] if part[-1] in units else int(part) for part in text.split(",")]


def repeated(unit: str, size: int) -> bytes:
    """`{"episodes": [unit,unit,…]}` of about `size` bytes."""
    return ('{"episodes": [' + ",".join([unit] * max(1, (size - 16) // (len(unit) + 1))) + "]}").encode()


def valid_episodes(size: int, rng: np.random.Generator, d: int = 64) -> bytes:
    """A valid episodes body of about `size` bytes (at least one episode)."""
    n = max(1, size // (d * 12 + 70))
    z = rng.standard_normal((n, d)).round(6).tolist()
    return json.dumps(
        {"episodes": [{"z": r, "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for r in z]}
    ).encode()


def measure(srv: Server, pid: int, load: Callable[[], str]) -> tuple[str, float, float, int]:
    done, result = threading.Event(), []
    peak, worst = rss(pid), 0.0

    def run() -> None:
        try:
            result.append(load())
        finally:
            done.set()

    t0 = time.perf_counter()
    threading.Thread(target=run).start()
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        while not done.is_set():
            t = time.perf_counter()
            c.get("/healthz")
            worst = max(worst, time.perf_counter() - t)
            peak = max(peak, rss(pid))
            time.sleep(0.02)
    return (result[0] if result else "error"), time.perf_counter() - t0, worst, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-memory-bytes", type=int, default=4 << 30)
    ap.add_argument("--decode-sizes", type=size_arg, default=size_arg("64K,256K,512K,1M,4M"))
    ap.add_argument("--decode-seconds", type=float, default=3.0, help="how long each decode load is sent")
    ap.add_argument("--decode-rate", type=float, default=4.0, help="decode bodies sent per second, at most")
    ap.add_argument("--only", choices=("all", "decode"), default="all")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((10_000, 256)).round(6)
    eps = [{"z": row, "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for row in z.tolist()]
    body = json.dumps({"episodes": eps}).encode()
    zq = rng.standard_normal((5000, 64)).astype(np.float32)
    ones = np.ones(5000, np.float32)
    seed_rows = safetensors.numpy.save(
        {"z": zq, "soft_bind": ones / 2, "cone_vol": ones, "lambda_bind": ones}
    )
    query = json.dumps({"z": zq[:256].tolist(), "k": 1024}).encode()
    json_h = {"content-type": "application/json"}

    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(
            Path(tmp) / "data",
            *(
                "--max-memory-bytes",
                str(args.max_memory_bytes),
                "--capacity",
                "20000",
                "--durability",
                "none",
            ),
        ).start()
        assert srv.proc is not None
        pid = srv.proc.pid
        try:
            httpx.post(
                srv.url + "/memories/q/episodes",
                content=seed_rows,
                headers={"content-type": "application/x-safetensors"},
            )
            idle = rss(pid)

            def heads() -> str:
                out: list[str] = []
                threads = [threading.Thread(target=lambda: out.append(big_head(srv.port))) for _ in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return ", ".join(sorted(set(out)))

            def write() -> str:
                return str(
                    httpx.post(srv.url + "/episodes", content=body, headers=json_h, timeout=600).status_code
                )

            def answer() -> str:
                r = httpx.post(srv.url + "/memories/q/neighbors", content=query, headers=json_h, timeout=600)
                return f"{r.status_code} ({len(r.content) >> 20} MiB)"

            def sent_for(payload: bytes, path: str = "/episodes") -> Callable[[], str]:
                def load() -> str:
                    statuses, n, busy, start = set(), 0, 0.0, time.perf_counter()
                    with httpx.Client(timeout=600) as c:
                        while not n or time.perf_counter() - start < args.decode_seconds:
                            time.sleep(max(0.0, start + n / args.decode_rate - time.perf_counter()))
                            sent = time.perf_counter()
                            r = c.post(srv.url + path, content=payload, headers=json_h)
                            busy += time.perf_counter() - sent
                            statuses.add(str(r.status_code))
                            n += 1
                    return f"{'/'.join(sorted(statuses))} ×{n}, {1000 * busy / n:.1f} ms each"

                return load

            rows = (
                []
                if args.only == "decode"
                else [
                    ("8 × 100 MiB header", heads),
                    ("30 MiB JSON write", write),
                    ("2^24-float JSON answer", answer),
                ]
            )
            cap = json_values_cap(MAX_BATCH)  # arrays, objects and members a body may hold
            for size in args.decode_sizes:
                label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
                rows.append((f"{label} JSON [1,1,…]", sent_for(repeated("1", size))))
                rows.append((f'{label} JSON ["",…]', sent_for(repeated('""', size))))
                rows.append(
                    (f"{label} JSON episodes", sent_for(valid_episodes(size, rng), "/memories/d64/episodes"))
                )
            for arrays in (2**16 - 3, cap - 3):  # the body's object, its member and its list count too
                rows.append(
                    (f"{arrays} × [] ({3 * arrays >> 10} KiB)", sent_for(repeated("[]", 3 * arrays + 16)))
                )
            print(f"server idle RSS {idle >> 20} MiB; --max-memory-bytes {args.max_memory_bytes >> 20} MiB")
            print(f"{'load':<26} {'answer':<32} {'took s':>7} {'worst /healthz s':>17} {'peak RSS MiB':>13}")
            for name, load in rows:
                status, took, worst, peak = measure(srv, pid, load)
                print(f"{name:<26} {status:<32} {took:>7.2f} {worst:>17.3f} {peak >> 20:>13}")
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
