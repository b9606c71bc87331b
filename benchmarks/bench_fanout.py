"""Many followers of the changes feed: what they cost the service, direct and through nginx.

    python -m benchmarks.bench_fanout [--followers 0,8,100,400] [--seconds 10] [--rate 1000]

For each number of followers, twice (straight to `zmem serve`, then through a real nginx
with the shipped fan-out config, `docker/nginx/zmem-fanout.conf.template`), for `--seconds`:

- light followers in a process of their own (asyncio, plain HTTP/1.1 on kept-alive
  connections): long polls from the newest seq with the generation, as a caught-up replica
  makes them (`wait=10`, at most one request per 50 ms after a complete page), without the
  kNN; each page's lag is the time since the service acknowledged its last row;
- a writer posting `--rate` episodes a second in batches of 10 (write latency per batch);
- a `risk()` caller, B=1, 50 a second (latency per call), and `/healthz` every 100 ms (max);
- the service process's CPU time (from /proc).

One table: write p50/p99, risk() p50/p99, /healthz max, service CPU (% of one core), follower
lag p99, pages followers got, and where the rest of the machine's CPU went (nginx's processes,
the followers' process). Ratios against the no-follower row of the same run matter; the
followers share this machine's cores with the service.

`--nice N` runs nginx and the followers at that niceness: a model of followers and their
cache on other machines (a cache per rack), on a box that has only the one set of cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.nginx import Nginx
from tests.server import Server
from zmem_client import ZMemClient
from zmem_core import wire

D = 16


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PACE = 0.05
"""Seconds between a follower's requests after a complete page, as the replica paces them."""


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> tuple[int, bytes]:
    """One GET on a kept-alive connection, in plain HTTP/1.1: a light client, so that what the
    followers cost this machine is mostly what the service and nginx cost, not httpx's."""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: zmem\r\nAccept: {wire.SAFETENSORS}\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = bytearray()
    while size := int((await reader.readline()).split(b";")[0], 16):
        body += await reader.readexactly(size)
        await reader.readline()
    await reader.readline()
    return status, bytes(body)


async def follow(url: str, n: int, start_after: int, until: float, acks: Any, out: Any) -> None:
    lags: list[float] = []
    pages = 0
    host, port = httpx.URL(url).host, httpx.URL(url).port

    async def one() -> None:
        nonlocal pages
        after, generation = start_after, ""
        reader = writer = None
        while time.monotonic() < until:
            sent = time.monotonic()
            target = f"/changes?after={after}&limit=10000&wait=10"
            if generation:
                target += f"&generation={generation}"
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                status, body = await asyncio.wait_for(get(reader, writer, target), 40)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(PACE)
                continue
            if status != 200:
                await asyncio.sleep(PACE)
                continue
            _, meta = wire.decode(body)
            pages += 1
            generation = meta["generation"]
            last = meta.get("last_seq")
            if last is not None:
                acked = acks[int(last)] if int(last) < len(acks) else 0.0
                if acked:
                    lags.append(time.time() - acked)
                after = int(last)
            if meta["complete"]:
                await asyncio.sleep(max(0.0, PACE - (time.monotonic() - sent)))
        if writer is not None:
            writer.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    out.put({"lags": lags, "pages": pages, "cpu": time.process_time() - cpu0})


def children(pid: int) -> list[int]:
    """`pid` and its child processes (nginx's master and workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(k) for k in kids)]


def nginx_cpu_seconds(nginx: list[int]) -> dict[int, float]:
    """CPU seconds of nginx's processes now: its master (`nginx[0]`) and the children it has
    now (its cache loader comes and goes)."""
    out = {}
    for pid in children(nginx[0]) if nginx else []:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile
            out[pid] = cpu_seconds(pid)
    return out


def followers_process(
    url: str, n: int, start_after: int, until_wall: float, acks: Any, out: Any, nice: int = 0
) -> None:
    os.nice(nice)
    until = time.monotonic() + (until_wall - time.time())
    asyncio.run(follow(url, n, start_after, until, acks, out))


def run(
    srv: Server, url: str, followers: int, seconds: float, rate: int, acks: Any, nginx: list[int], nice: int
) -> dict[str, Any]:
    """One row of the table; `acks` (shared memory, by seq) gets each row's acknowledgement time;
    `nginx`: its processes (their CPU is counted), `nice`: the followers' niceness."""
    rng = np.random.default_rng(followers)
    http = httpx.Client(base_url=srv.url, timeout=30)
    newest = http.get("/changes", params={"after": 0, "limit": 1}, headers={"accept": wire.SAFETENSORS})
    head = wire.decode(newest.content)[1]["next_seq"] - 1
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    until = time.time() + seconds
    args = (url, followers, head, until, acks, out, nice)
    proc = ctx.Process(target=followers_process, args=args, daemon=True)
    if followers:
        proc.start()
        time.sleep(1.0)  # followers connected and polling
    writes: list[float] = []
    risks: list[float] = []
    health: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        batch = 10
        interval = batch / rate
        while not stop.is_set():
            t0 = time.perf_counter()
            z = rng.standard_normal((batch, D)).astype(np.float32)
            episodes = [
                {"z": row.tolist(), "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.1} for row in z
            ]
            r = http.post("/episodes", json={"episodes": episodes})
            writes.append(time.perf_counter() - t0)
            if r.status_code == 200:
                now = time.time()
                first, last = r.json()["first_seq"], r.json()["last_seq"]
                acks[first : last + 1] = [now] * (last - first + 1)
            stop.wait(max(0.0, interval - (time.perf_counter() - t0)))

    def risker() -> None:
        with ZMemClient(srv.url, timeout=30) as mem:
            while not stop.is_set():
                t0 = time.perf_counter()
                mem.risk(rng.standard_normal(D).astype(np.float32))
                risks.append(time.perf_counter() - t0)
                stop.wait(0.02)

    def healthz() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                h.get("/healthz")
                health.append(time.perf_counter() - t0)
                stop.wait(0.1)

    assert srv.proc is not None
    cpu0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
    nginx0 = nginx_cpu_seconds(nginx)
    threads = [threading.Thread(target=f, daemon=True) for f in (writer, risker, healthz)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, until - time.time()))
    stop.set()
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    cpu = (cpu_seconds(srv.proc.pid) - cpu0) / took
    nginx_cpu = sum(t - nginx0.get(p, 0.0) for p, t in nginx_cpu_seconds(nginx).items()) / took
    got: dict[str, Any] = {"lags": [], "pages": 0}
    if followers:
        got = out.get(timeout=60)
        proc.join(30)
    http.close()
    ms = lambda xs, q: f"{np.percentile(np.array(xs) * 1e3, q):.1f}" if xs else "-"  # noqa: E731
    return {
        "write p50": ms(writes, 50),
        "write p99": ms(writes, 99),
        "risk p50": ms(risks, 50),
        "risk p99": ms(risks, 99),
        "healthz max": ms(health, 100),
        "cpu %": f"{100 * cpu:.0f}",
        "nginx cpu %": f"{100 * nginx_cpu:.0f}" if url != srv.url else "-",
        "follow cpu %": f"{100 * got['cpu'] / seconds:.0f}" if followers else "-",
        "lag p99 ms": ms(got["lags"], 99),
        "pages": str(got["pages"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--followers", default="0,8,100,400")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1000, help="episodes written per second")
    ap.add_argument("--nice", type=int, default=0, help="niceness of nginx and the followers (see above)")
    args = ap.parse_args()
    counts = [int(x) for x in args.followers.split(",")]
    rows: list[tuple[str, dict[str, Any]]] = []
    # Acknowledgement times by seq, in shared memory: the followers read them without a round trip.
    acks = mp.get_context("spawn").RawArray("d", 1000 + 2 * len(counts) * int(args.rate * (args.seconds + 5)))
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data", "--durability", "none", "--capacity", "50000", "--min-size", "10")
        srv.start()
        proxy = Nginx(Path(tmp) / "nginx", f"127.0.0.1:{srv.port}").start()
        assert proxy.proc is not None
        nginx = children(proxy.proc.pid)
        for pid in nginx:
            os.setpriority(os.PRIO_PROCESS, pid, args.nice)
        try:
            with ZMemClient(srv.url) as mem:
                for z in np.random.default_rng(0).standard_normal((500, D)).astype(np.float32):
                    mem.record(z, soft_bind=0.5, cone_vol=1.0, lambda_bind=0.1)
            for n in counts:
                for where, url in (("direct", srv.url), ("nginx", proxy.url)):
                    if n == 0 and where == "nginx":
                        continue
                    row = run(srv, url, n, args.seconds, args.rate, acks, nginx, args.nice)
                    rows.append((f"{n} followers, {where}", row))
                    print(f"{rows[-1][0]}: {json.dumps(rows[-1][1])}", flush=True)
        finally:
            proxy.stop()
            srv.stop()
    keys = list(rows[0][1])
    cores = os.cpu_count()
    print(
        f"\nchanges-feed followers, {args.rate} episodes/s written, {args.seconds:g} s each, {cores} cores"
        + (f", nginx and the followers at nice {args.nice}" if args.nice else "")
    )
    print(f"{'':26}" + "".join(f"{k:>13}" for k in keys))
    for name, row in rows:
        print(f"{name:26}" + "".join(f"{row[k]:>13}" for k in keys))


if __name__ == "__main__":
    main()
