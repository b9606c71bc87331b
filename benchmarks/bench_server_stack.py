"""Per-request cost of the HTTP server stack: plain uvicorn (httptools, h11) vs zmem's guarded protocol.

    python -m benchmarks.bench_server_stack [--rounds 6] [--per-round 300]

Each stack serves the same app in its own process; one keep-alive `http.client`
connection per stack sends `GET /healthz` and a B=1 safetensors `POST /neighbors`
(d=32, k=64 over 5,000 rows). Stacks take turns in rounds so background load
hits them alike. Prints p50/p90 per request in microseconds.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.numpy

from tests.server import free_port

STACKS = ("uvicorn-httptools", "uvicorn-h11", "guarded")


def run_server(stack: str, port: int, data_dir: str) -> None:
    import uvicorn

    from zmem_service.http.app import create_app
    from zmem_service.http.server import serve
    from zmem_service.settings import ServiceSettings

    settings = ServiceSettings(
        port=port, data_dir=Path(data_dir), durability="none", capacity=5000, min_size=10, k=64
    )
    app = create_app(settings)
    if stack == "guarded":
        serve(app, settings, "warning")
    elif stack == "uvicorn-httptools":
        uvicorn.run(app, port=port, http="httptools", log_level="warning", access_log=False)
    else:
        uvicorn.run(
            app, port=port, http="h11", h11_max_incomplete_event_size=16384, log_level="warning",
            access_log=False,
        )  # fmt: skip


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on {port} not ready")


def timed(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, headers: dict
) -> float:
    for attempt in (0, 1):
        t0 = time.perf_counter()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if attempt:
                raise
            conn.close()  # the server closed it while it idled (keep-alive timeout): a new one
            continue
        resp.read()
        elapsed = time.perf_counter() - t0
        break
    assert resp.status == 200, resp.status
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=300)
    ap.add_argument("--run-server", nargs=3, metavar=("STACK", "PORT", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_server:
        stack, port, data_dir = args.run_server
        run_server(stack, int(port), data_dir)
        return

    rng = np.random.default_rng(0)
    z = rng.standard_normal((5000, 32)).astype(np.float32)
    soft, cone, lam = rng.uniform(0.1, 1, size=(3, 5000)).astype(np.float32)
    episodes = safetensors.numpy.save({"z": z, "soft_bind": soft, "cone_vol": cone, "lambda_bind": lam})
    query = safetensors.numpy.save({"z": z[:1]})
    st = {"content-type": "application/x-safetensors", "accept": "application/x-safetensors"}

    procs, conns = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for stack in STACKS:
                port = free_port()
                cmd = [sys.executable, "-m", "benchmarks.bench_server_stack", "--run-server"]
                procs.append(subprocess.Popen([*cmd, stack, str(port), f"{tmp}/{stack}"]))
                wait_ready(port)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                timed(conn, "POST", "/episodes", episodes, st)
                conns[stack] = conn
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for stack, conn in conns.items():
                    for name, method, path, body, headers in (
                        ("GET /healthz", "GET", "/healthz", None, {}),
                        ("POST /neighbors B=1", "POST", "/neighbors", query, st),
                    ):
                        samples = times.setdefault((stack, name), [])
                        for _ in range(args.per_round):
                            samples.append(timed(conn, method, path, body, headers))
        finally:
            for conn in conns.values():
                conn.close()
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    print(f"{'request':<22} {'stack':<18} {'p50 µs':>8} {'p90 µs':>8} {'n':>6}")
    for (stack, name), samples in sorted(times.items(), key=lambda kv: (kv[0][1], STACKS.index(kv[0][0]))):
        us = np.array(samples) * 1e6
        p50, p90 = np.percentile(us, [50, 90])
        print(f"{name:<22} {stack:<18} {p50:>8.0f} {p90:>8.0f} {len(us):>6}")


if __name__ == "__main__":
    main()
