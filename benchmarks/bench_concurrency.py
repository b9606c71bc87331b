"""Many training processes at once: 8 workers, each with its own ZMemClient, hammering risk().

    python -m benchmarks.bench_concurrency [--workers 8] [--duration 10] [--n 50000] [--d 32]

One `zmem serve --durability none` holds n×d episodes. Each worker (a spawned
process, torch threads 1) calls `risk(z)` forward+backward in a loop for
`--duration` seconds: first with B=1 rows per call, then with B=`--batch`.
Printed per variant: total queries/s (query rows/s for the batched variant), each
worker's p50/p99 latency, the server's CPU per query (utime+stime of its
process from /proc/<pid>/stat, before and after, divided by the calls answered),
the workers' own CPU per query (getrusage in each worker: the client, the kernel's
forward and backward), and the rate the machine's cores allow at those two costs.
The targets of issue 10 are printed next to the figures; nothing asserts them.

Every answer is checked: a worker's answers to the same query agree call after call,
and after the load each query is asked again alone, with nothing else in flight, and
must get the bit-identical risk (batched or inline, an answer depends only on the
buffer). The server's CPU per query is printed against its floor (below).

Clients and server share this machine's cores, so the figures are those of one
box running both (as a training node would). `--light` adds a variant whose workers
send the same B=1 safetensors query over a plain socket and compute nothing (no torch):
a model of workers on other machines, whose CPU doesn't compete with the server's; each
of its answers is checked bit for bit against the same request sent alone afterwards.
`--url URL --pid PID` measures an already running server instead (e.g. one under a profiler).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier

import numpy as np

TARGET_QPS = 2000
TARGET_CPU_US = 400
Results = mp.Queue  # (rank, start, end, latencies, cpu seconds, answers, mismatches) from each worker
QUERIES = 64  # distinct queries per worker, asked in turn


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def on_cpu_seconds(pid: int) -> float:
    """Time the threads of process `pid` now alive have run, in seconds, to the nanosecond
    (/proc/<pid>/task/*/schedstat; `cpu_seconds` counts in clock ticks of 10 ms)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total / 1e9


def worker(url: str, rank: int, rows: int, d: int, duration: float, barrier: Barrier, out: Results) -> None:
    import torch

    from zmem_client import ZMemClient

    torch.set_num_threads(1)
    rng = np.random.default_rng(100 + rank)
    queries = torch.from_numpy(rng.standard_normal((QUERIES, rows, d)) * 0.3).float()
    times = []
    answers: dict[int, torch.Tensor] = {}
    mismatches = 0
    with ZMemClient(url, timeout=60) as mem:
        for i in range(5):  # warm-up: connection, first allocations
            mem.risk(queries[i].clone().requires_grad_(True)).sum().backward()
        barrier.wait()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        deadline = start + duration
        i = 0
        while True:
            t0 = time.monotonic()
            if t0 >= deadline:
                break
            q = queries[i % len(queries)].clone().requires_grad_(True)
            risk = mem.risk(q, squeeze=False)
            risk.sum().backward()
            times.append(time.monotonic() - t0)
            seen = answers.setdefault(i % len(queries), risk.detach())
            mismatches += not torch.equal(seen, risk.detach())
            i += 1
        end = time.monotonic()
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    got = np.stack([answers[j].numpy() for j in sorted(answers)]) if answers else np.zeros((0, rows))
    out.put((rank, start, end, np.array(times), cpu, got, mismatches))


def light_request(rank: int, j: int, d: int) -> bytes:
    """Light worker `rank`'s query `j`: a whole B=1 safetensors `POST /neighbors`, recorded."""
    from zmem_core import wire

    z = np.random.default_rng(1000 * rank + j).standard_normal((1, d)).astype(np.float32) * 0.3
    body = wire.encode({"z": z}, {"record": True})
    kind = wire.SAFETENSORS
    head = (
        f"POST /neighbors HTTP/1.1\r\nhost: zmem\r\ncontent-type: {kind}\r\naccept: {kind}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def light_ask(sock: socket.socket, request: bytes) -> bytes:
    """Send `request` on a kept-alive connection and read its answer's body (content-length)."""
    sock.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(65536)
    head, body = got.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return body


def light_worker(
    url: str, rank: int, rows: int, d: int, duration: float, barrier: Barrier, out: Results
) -> None:
    """A worker that only asks (see the module docstring): the same Result tuple as `worker`, its
    answers' bodies by query index."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = [light_request(rank, j, d) for j in range(QUERIES)]
    answers: dict[int, bytes] = {}
    mismatches = 0
    times = []
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for j in range(5):
            light_ask(sock, requests[j])
        barrier.wait()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        deadline = start + duration
        i = 0
        while (t0 := time.monotonic()) < deadline:
            body = light_ask(sock, requests[i % QUERIES])
            times.append(time.monotonic() - t0)
            mismatches += answers.setdefault(i % QUERIES, body) != body
            i += 1
        end = time.monotonic()
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    out.put((rank, start, end, np.array(times), cpu, answers, mismatches))


def exact_light(url: str, results: list[tuple], d: int) -> tuple[int, int]:
    """(answers checked, answers that differ): each light worker's answers against the same
    request sent alone afterwards, one at a time."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    checked = differ = 0
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        for rank, *_, answers, mismatches in results:
            for j, body in answers.items():
                checked += 1
                differ += light_ask(sock, light_request(rank, j, d)) != body
            differ += mismatches
    return checked, differ


def exact(url: str, results: list[tuple], rows: int, d: int) -> tuple[int, int]:
    """(answers checked, answers that differ) between the load's answers and each query asked
    alone afterwards, one at a time."""
    import torch

    from zmem_client import ZMemClient

    checked = differ = 0
    with ZMemClient(url, timeout=60) as mem:
        for rank, *_, got, mismatches in results:
            rng = np.random.default_rng(100 + rank)
            queries = torch.from_numpy(rng.standard_normal((QUERIES, rows, d)) * 0.3).float()
            for j, answer in enumerate(got):
                alone = mem.risk(queries[j], squeeze=False).numpy()
                checked += 1
                differ += not np.array_equal(alone, answer)
            differ += mismatches
    return checked, differ


@dataclass
class Result:
    rows: int
    workers: int
    calls: int
    wall: float
    server_cpu: float
    client_cpu: float
    latencies: list[np.ndarray]
    checked: int = 0
    differ: int = 0
    searches: dict[str, tuple[float, float]] | None = None  # where → (searches, queries) during the load
    light: bool = False  # workers that only ask (no torch), see the module docstring
    polled: float = 0.0  # seconds the service's loop spent busy polling during the load (--busy-poll)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall

    @property
    def cpu_us_per_call(self) -> float:
        return 1e6 * self.server_cpu / self.calls

    @property
    def client_cpu_us_per_call(self) -> float:
        return 1e6 * self.client_cpu / self.calls

    @property
    def bound_calls_per_s(self) -> float:
        """Calls/s this machine's cores allow at the measured server + client CPU per call."""
        return (os.cpu_count() or 1) * 1e6 / (self.cpu_us_per_call + self.client_cpu_us_per_call)


def run(url: str, pid: int, workers: int, rows: int, d: int, duration: float, light: bool = False) -> Result:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    out: Results = ctx.Queue()
    target = light_worker if light else worker
    procs = [
        ctx.Process(target=target, args=(url, r, rows, d, duration, barrier, out)) for r in range(workers)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    counts0, polled0 = search_counts(url), polled_seconds(url)
    cpu0 = cpu_seconds(pid)
    got = [out.get(timeout=duration + 300) for _ in procs]
    cpu1 = cpu_seconds(pid)
    counts1, polled1 = search_counts(url), polled_seconds(url)
    for p in procs:
        p.join(60)
    got.sort(key=lambda g: g[0])
    start = min(g[1] for g in got)
    end = max(g[2] for g in got)
    lat = [g[3] for g in got]
    client_cpu = sum(g[4] for g in got)
    checked, differ = exact_light(url, got, d) if light else exact(url, got, rows, d)
    searches = {w: (counts1[w][0] - counts0[w][0], counts1[w][1] - counts0[w][1]) for w in counts1}
    return Result(
        rows,
        workers,
        sum(len(t) for t in lat),
        end - start,
        cpu1 - cpu0,
        client_cpu,
        lat,
        checked,
        differ,
        searches,
        light,
        polled1 - polled0,
    )


def search_counts(url: str) -> dict[str, tuple[float, float]]:
    """The service's index searches and the queries they answered so far, by where they ran
    (`zmem_index_searches_total`, `zmem_index_queries_total` in /metrics)."""
    import httpx

    counts: dict[str, list[float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for i, family in enumerate(("zmem_index_searches_total{", "zmem_index_queries_total{")):
            if line.startswith(family):
                where = line.split('where="', 1)[1].split('"', 1)[0]
                counts.setdefault(where, [0.0, 0.0])[i] = float(line.rsplit(" ", 1)[1])
    return {w: (c[0], c[1]) for w, c in counts.items()}


def polled_seconds(url: str) -> float:
    """Seconds the service's event loop has spent busy polling (`zmem_busy_poll_seconds_total`)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("zmem_busy_poll_seconds_total "):
            return float(line.split()[1])
    return 0.0  # a service without busy polling


def report(res: Result, floor_us: float) -> list[str]:
    unit = "queries" if res.rows == 1 else f"calls of B={res.rows}"
    what = "light processes × POST /neighbors" if res.light else "processes × risk(z)"
    how = "(a plain socket, no torch)" if res.light else "fwd+bwd"
    lines = [
        f"\n{res.workers} {what} B={res.rows} {how}, {res.wall:.1f} s: "
        f"{res.calls} {unit}, load average {os.getloadavg()[0]:.1f}",
        f"{'':34} {'figure':>12}  target",
    ]
    qps_target = f"≥ {TARGET_QPS:,} q/s" if res.rows == 1 else ""
    cpu_target = f"≤ {TARGET_CPU_US} µs" if res.rows == 1 else ""
    lines.append(f"{'total calls/s':34} {res.calls_per_s:12,.0f}  {qps_target}")
    if res.rows > 1:
        lines.append(f"{'total query rows/s':34} {res.calls_per_s * res.rows:12,.0f}")
    lines.append(f"{'server CPU per call (µs)':34} {res.cpu_us_per_call:12,.0f}  {cpu_target}")
    if res.rows == 1:
        ratio = res.cpu_us_per_call / floor_us
        lines.append(f"{'  × the server CPU floor':34} {ratio:12.2f}  ≤ 1.0×")
    if res.rows > 1:
        lines.append(f"{'server CPU per query row (µs)':34} {res.cpu_us_per_call / res.rows:12,.1f}")
    verdict = "every answer exact" if res.differ == 0 else f"{res.differ} MISMATCHES"
    lines.append(f"{'answers checked against lone asks':34} {res.checked:12,}  {verdict}")
    for where, (searches, queries) in (res.searches or {}).items():
        per = queries / searches if searches else 0.0
        lines.append(
            f"{'searches on the ' + where + ' (calls each)':34} {searches:12,.0f}  {per:.2f} calls per search"
        )
    lines.append(f"{'server CPU busy (cores)':34} {res.server_cpu / res.wall:12.2f}")
    lines.append(f"{'  of which busy polling (cores)':34} {res.polled / res.wall:12.2f}")
    lines.append(f"{'worker CPU per call (µs)':34} {res.client_cpu_us_per_call:12,.0f}")
    lines.append(f"{'worker CPU busy (cores)':34} {res.client_cpu / res.wall:12.2f}")
    lines.append(
        f"{'cores / (server + worker CPU)':34} {res.bound_calls_per_s:12,.0f}  calls/s this machine allows"
    )
    lines.append(f"{'worker':>8} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for rank, t in enumerate(res.latencies):
        p50, p99 = np.percentile(t * 1000, [50, 99]) if len(t) else (float("nan"), float("nan"))
        lines.append(f"{rank:8d} {len(t):7d} {p50:8.2f} {p99:8.2f}")
    every = np.concatenate(res.latencies) * 1000
    if len(every):
        p50, p99 = np.percentile(every, [50, 99])
        lines.append(f"{'all':>8} {len(every):7d} {p50:8.2f} {p99:8.2f}")
    return lines


def floors(
    url: str, pid: int, n: int, d: int, k: int, calls: int = 500, rounds: int = 5
) -> tuple[list[str], float]:
    """What a query can't cost less than here, measured one call at a time before the load:
    the server's CPU for a request that does no search (GET /healthz over one keep-alive
    connection; the lowest of `rounds` rounds of `calls`, so that a noisy moment doesn't
    raise the floor), and one FAISS search of the same size in this process (1 thread; the
    lowest median of `rounds` rounds, likewise)."""
    import http.client

    import faiss

    from .bench_risk import Data

    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def healthz() -> None:
        conn.request("GET", "/healthz")
        conn.getresponse().read()

    for _ in range(50):
        healthz()
    per_round = []
    for _ in range(rounds):
        cpu0 = on_cpu_seconds(pid)
        for _ in range(calls):
            healthz()
        per_round.append(1e6 * (on_cpu_seconds(pid) - cpu0) / calls)
    http_us = min(per_round)
    conn.close()
    z = Data.random(n, d).z
    faiss.omp_set_num_threads(1)
    q = z[:1] + np.float32(0.01)
    for _ in range(20):
        faiss.knn(q, z, k)
    medians = []
    for _ in range(rounds):
        took = []
        for _ in range(calls):
            t0 = time.perf_counter()
            faiss.knn(q, z, k)
            took.append(time.perf_counter() - t0)
        medians.append(1e6 * float(np.median(took)))
    search_us = min(medians)
    return [
        f"\nfloors, one call at a time ({calls} calls each)          µs",
        f"{'server CPU per GET /healthz (HTTP stack, no search)':52} {http_us:7,.0f}  "
        f"(lowest of {rounds} rounds: {', '.join(f'{r:.0f}' for r in per_round)})",
        f"{'faiss.knn B=1, 1 thread, in-process (p50)':52} {search_us:7,.0f}  "
        f"(lowest of {rounds} rounds: {', '.join(f'{r:.0f}' for r in medians)})",
        f"{'sum: the server CPU floor of one query here':52} {http_us + search_us:7,.0f}",
    ], http_us + search_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per variant")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256, help="rows per call of the batched variant (0: skip)")
    ap.add_argument("--knn-threads", type=int, default=0, help="the server's --knn-threads (0 = all cores)")
    ap.add_argument("--url", help="measure this running server instead of starting one (needs --pid)")
    ap.add_argument("--pid", type=int, help="the running server's process id")
    ap.add_argument("--light", action="store_true", help="add the light workers' variant (B=1)")
    args = ap.parse_args()
    variants = [1] + ([args.batch] if args.batch else [])

    if args.url:
        if args.pid is None:
            ap.error("--url needs --pid (the server's process, for its CPU time)")
        floor, floor_us = floors(args.url, args.pid, args.n, args.d, args.k)
        results = [run(args.url, args.pid, args.workers, rows, args.d, args.duration) for rows in variants]
        if args.light:
            results.append(run(args.url, args.pid, args.workers, 1, args.d, args.duration, light=True))
    else:
        from .bench_risk import Data, fill, start_server

        with tempfile.TemporaryDirectory() as tmp:
            srv = start_server(tmp, args.n, args.k, args.knn_threads)
            try:
                fill(srv.url, Data.random(args.n, args.d))
                assert srv.proc is not None
                floor, floor_us = floors(srv.url, srv.proc.pid, args.n, args.d, args.k)
                results = [
                    run(srv.url, srv.proc.pid, args.workers, rows, args.d, args.duration) for rows in variants
                ]
                if args.light:
                    results.append(
                        run(srv.url, srv.proc.pid, args.workers, 1, args.d, args.duration, light=True)
                    )
            finally:
                srv.stop()
    print(
        f"\nzmem serve --durability none, N={args.n}, d={args.d}, k={args.k}, CPU, "
        f"{os.cpu_count()} cores shared by server and workers"
    )
    for line in floor:
        print(line)
    for res in results:
        for line in report(res, floor_us):
            print(line)


if __name__ == "__main__":
    main()
