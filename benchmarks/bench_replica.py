"""Replica lag under load, and what following the feed costs the service.

    python -m benchmarks.bench_replica [--writers 8] [--rate 1000] [--seconds 10] [--d 32]

`--writers` processes post small batches at `--rate` episodes/s in total (paced, not
as fast as they can). Phase 1 runs them alone; phase 2 runs them again with a
replica in this process following the feed. Lag per acknowledged batch = the time
the replica published a state holding its last seq minus the time the writer got
the acknowledgement (negative: the replica had it first). Service CPU is utime +
stime from /proc/<pid>/stat over each phase, per acknowledged episode, scaled to
`--rate`; the difference is what the replica's feed costs. On a small shared
machine the figures carry the noise of whatever else runs there.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.server import Server
from zmem_client import ZMemClient
from zmem_core import wire

SAFETENSORS = {"content-type": wire.SAFETENSORS}


def writer(url: str, rank: int, rate: float, batch: int, d: int, seconds: float, go: Any, out: Any) -> None:
    rng = np.random.default_rng(rank)
    acks: list[tuple[int, float]] = []
    period = batch / rate
    with httpx.Client(base_url=url, timeout=30) as http:
        out.put("ready")
        go.wait()
        start = time.monotonic() + rng.uniform(0, period)  # spread the writers over a period
        i = 0
        while True:
            due = start + i * period
            if due > start + seconds:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            z = rng.standard_normal((batch, d)).astype(np.float32)
            ones = np.ones(batch, np.float32)
            body = wire.encode({"z": z, "soft_bind": ones * 0.5, "cone_vol": ones, "lambda_bind": ones}, {})
            r = http.post("/episodes", content=body, headers=SAFETENSORS)
            r.raise_for_status()
            acks.append((int(r.json()["last_seq"]), time.monotonic()))
            i += 1
    out.put((start, acks))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(srv: Server, args: argparse.Namespace, follow: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    per_writer = args.rate / args.writers
    procs = [
        ctx.Process(target=writer, args=(srv.url, r, per_writer, args.batch, args.d, args.seconds, go, out))
        for r in range(args.writers)
    ]
    for p in procs:
        p.start()
    published: list[tuple[float, int]] = []
    mem = None
    if follow:
        mem = ZMemClient(srv.url, replica=True, max_lag=300.0)
        rep = mem.replica
        assert rep is not None
        rep.sync(30)
        apply_page = rep._apply_page

        def observed(*a: Any) -> None:  # note when each state is published
            apply_page(*a)
            published.append((time.monotonic(), rep.state.next_seq))

        rep._apply_page = observed  # type: ignore[method-assign]
    for _ in procs:
        assert out.get(timeout=300) == "ready"  # every writer has done its imports
    assert srv.proc is not None
    cpu0 = cpu_seconds(srv.proc.pid)
    go.set()
    reports = [out.get(timeout=args.seconds + 300) for _ in procs]
    cpu1 = cpu_seconds(srv.proc.pid)
    for p in procs:
        p.join(30)
    acks = [a for _, part in reports for a in part]
    t0 = min(start for start, _ in reports)
    t1 = max(t for _, t in acks)
    episodes = len(acks) * args.batch
    # Service CPU per episode, scaled to the asked rate: comparable across phases even when
    # a loaded machine lets the writers fall short of it.
    result: dict[str, Any] = {"cpu": (cpu1 - cpu0) / episodes * args.rate, "rate": episodes / (t1 - t0)}
    if mem is not None:
        assert mem.replica is not None
        mem.replica.sync(30)
        times = np.array([t for t, _ in published])
        seqs = np.array([s for _, s in published])
        lags = []
        for last_seq, t_ack in acks:
            i = int(np.searchsorted(seqs, last_seq + 1))  # first state holding last_seq
            lags.append(times[i] - t_ack)
        result["lag_ms"] = np.array(lags) * 1000
        result["pages"] = mem.replica.pages
        mem.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--rate", type=float, default=1000.0, help="episodes/s, all writers together")
    ap.add_argument("--batch", type=int, default=5, help="episodes per request")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--d", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data", "--capacity", "50000").start()
        try:
            alone = phase(srv, args, follow=False)
            followed = phase(srv, args, follow=True)
        finally:
            srv.stop()
    lag = followed["lag_ms"]
    print(
        f"\nreplica lag, {args.writers} writers, {args.rate:.0f} episodes/s asked "
        f"({args.batch} per request), d={args.d}, {args.seconds:.0f} s per phase"
    )
    print(f"{'':50} {'value':>10}")
    rows = [
        ("episodes/s acknowledged, writers alone", f"{alone['rate']:.0f}"),
        ("episodes/s acknowledged, with a replica", f"{followed['rate']:.0f}"),
        ("replica lag p50 (ms)", f"{np.percentile(lag, 50):.1f}"),
        ("replica lag p99 (ms)", f"{np.percentile(lag, 99):.1f}"),
        ("replica lag max (ms)", f"{lag.max():.1f}"),
        ("feed pages applied", f"{followed['pages']}"),
        (f"service CPU at {args.rate:.0f}/s, writers alone (cores)", f"{alone['cpu']:.3f}"),
        (f"service CPU at {args.rate:.0f}/s, with a replica (cores)", f"{followed['cpu']:.3f}"),
        ("  following the feed (% of one core)", f"{100 * (followed['cpu'] - alone['cpu']):.1f}"),
    ]
    for name, value in rows:
        print(f"{name:50} {value:>10}")


if __name__ == "__main__":
    main()
