"""risk(z) forward+backward: the service over loopback next to the in-process floor, same data, one run.

    python -m benchmarks.bench_risk [--n 50000] [--d 32] [--k 64] [--iters 300] [--batch 256]

Every path is measured in the same process and the same run, in interleaved rounds
(a round of each path in turn), so that a busy machine slows them alike and the
ratios hold even when the absolute times don't. Rows:

- in-process floor, B=1: `faiss.knn` with one OpenMP thread, the neighbours' z and
  risk targets gathered as tensors, `zmem_client.kernel_risk`, backward;
- `ZMemClient.risk(z)` B=1 over loopback, forward+backward (and forward only);
- the same at B=`--batch` rows per call, next to the in-process batched floor
  (`faiss.knn` at the service's `--knn-threads` + kernel + backward);
- the seed's in-process `memory_risk` (tests/seed_reference.py), which restacks its
  deque into tensors on every call, and the same math with the tensors cached;
- `GET /healthz` over the same httpx client: the HTTP round trip alone;
- the client's local replica, where the client has one (`replica_paths`).

The targets are printed next to the figures (p99/p50: how steady each path is, the service's
beside the in-process floor's); nothing asserts them. The last line says what the client's
and the service's busy polling did (`zmem_core.busy`): polling that kept backing off
means the run's cores were shared.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from tests.seed_reference import SeedMemory
from tests.server import Server
from zmem_client import ZMemClient, kernel_risk
from zmem_core.knn import BLAS_QUERY_ROWS

Step = Callable[[], object]


@dataclass
class Data:
    """The buffer every path holds: z float32 [n, d] and the seed's three scalars per row."""

    z: np.ndarray
    soft: np.ndarray
    cone: np.ndarray
    lam: np.ndarray

    @classmethod
    def random(cls, n: int, d: int, seed: int = 0) -> Data:
        rng = np.random.default_rng(seed)
        z = (rng.standard_normal((n, d)) * 0.3).astype(np.float32)
        soft, cone, lam = rng.uniform(size=(3, n)).astype(np.float32)
        return cls(z, soft, cone, lam)

    @property
    def risk_target(self) -> np.ndarray:
        """The service's default weights: a·(1 − soft) + b·log(cone + eps) + c·lam."""
        r = 1.0 * (1.0 - self.soft.astype(np.float64)) + 0.2 * np.log(self.cone + 1e-8) + 0.05 * self.lam
        return r.astype(np.float32)


def fill(url: str, data: Data, memory: str = "default") -> None:
    """Write the buffer to the service (in arrival order) and wait until it is all in."""
    with ZMemClient(url, memory=memory, batch_size=4096, timeout=60) as mem:
        for i in range(len(data.z)):
            mem.record(data.z[i], soft_bind=data.soft[i], cone_vol=data.cone[i], lambda_bind=data.lam[i])
        mem.flush()


def start_server(tmp: str, n: int, k: int, knn_threads: int) -> Server:
    return Server(
        Path(tmp) / "data",
        "--capacity",
        str(n),
        "--k",
        str(k),
        "--durability",
        "none",
        "--knn-threads",
        str(knn_threads),
    ).start(timeout=120)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def interleaved(paths: dict[str, tuple[Step, int]], rounds: int, warmup: int = 5) -> dict[str, list[float]]:
    """Time each path's step `per_round` times per round, the paths taking turns round after round."""
    for step, _ in paths.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (step, per_round) in paths.items():
            out = times[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                step()
                out.append(time.perf_counter() - t0)
    return times


def cycling(queries: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A fresh leaf tensor (requires grad) per call, cycling through `queries`."""
    i = 0

    def nxt() -> torch.Tensor:
        nonlocal i
        q = queries[i % len(queries)].clone().requires_grad_(True)
        i += 1
        return q

    return nxt


def floor_step(data: Data, k: int, sigma: float, queries: torch.Tensor, threads: int) -> Step:
    """In-process: faiss.knn (`threads` OpenMP threads; its BLAS switch at the core's
    BLAS_QUERY_ROWS, as the service sets it) → gather as tensors → kernel → backward."""
    zt = torch.from_numpy(data.z)
    rt = torch.from_numpy(data.risk_target)
    nxt = cycling(queries)

    def step() -> None:
        q = nxt()  # [B, d]
        faiss.omp_set_num_threads(threads)
        faiss.cvar.distance_compute_blas_threshold = 0 if len(q) >= BLAS_QUERY_ROWS else 2**31 - 1
        _, idx = faiss.knn(q.detach().numpy(), data.z, k)
        rows = torch.from_numpy(idx)
        kernel_risk(q, zt[rows], rt[rows], sigma).sum().backward()

    return step


def client_step(mem: ZMemClient, queries: torch.Tensor, backward: bool = True) -> Step:
    nxt = cycling(queries)

    def step() -> None:
        q = nxt()
        if backward:
            mem.risk(q).sum().backward()
        else:
            with torch.no_grad():
                mem.risk(q, record=False)

    return step


def seed_steps(data: Data, k: int, queries: torch.Tensor) -> dict[str, Step]:
    seed = SeedMemory(mem_size=len(data.z), mem_k=k)
    for i in range(len(data.z)):
        seed.append(torch.from_numpy(data.z[i]).unsqueeze(0), data.soft[i], data.cone[i], data.lam[i])
    zs, soft, cone, lam = seed._mem_tensors("cpu")
    r = seed._mem_risk_targets(soft, cone, lam)
    nxt = cycling(queries)

    def seed_step() -> None:
        seed.memory_risk(nxt()).backward()

    def cached_step() -> None:
        q = nxt()
        d2 = torch.sum((zs - q.squeeze(0)) ** 2, dim=-1)
        vals, idx = torch.topk(d2, k=k, largest=False)
        w = torch.exp(-vals / 2.0)
        w = w / (w.sum() + 1e-8)
        torch.sum(w * r[idx]).backward()

    return {"seed": seed_step, "seed_cached": cached_step}


def replica_paths(url: str, queries: torch.Tensor, batched: torch.Tensor) -> dict[str, tuple[Step, int]]:
    """The client's local replica (`ZMemClient(url, replica=True)`): its B=1 and batched paths.

    The replica is synced first, so every call answers from the mirrored buffer."""
    mem = ZMemClient(url, replica=True, timeout=30)
    assert mem.replica is not None
    mem.replica.sync()
    return {"replica": (client_step(mem, queries), 10), "replica_batched": (client_step(mem, batched), 1)}


def busy_polling(mem: ZMemClient) -> str:
    """What the client's and the service's busy polling did (`zmem_core.busy`)."""
    wait = getattr(mem._source, "busy_wait", None)
    client = f"{wait.spells} spells, {wait.backoffs} backed off" if wait is not None else "none"
    metrics = mem._http.get("/metrics").text.splitlines()
    served = {
        line.split()[0]: float(line.split()[1]) for line in metrics if line.startswith("zmem_busy_poll_")
    }
    seconds, backoffs = (
        served.get("zmem_busy_poll_seconds_total", 0),
        served.get("zmem_busy_poll_backoffs_total", 0),
    )
    service = f"polled {seconds:.2f} s, {backoffs:.0f} backed off"
    return f"busy polling: the client's waits {client}; the service {service}"


@dataclass
class Row:
    name: str
    key: str
    ref: str | None = None  # the row whose p50 this one's ratio divides by
    target: str = ""


ROWS = [
    Row("in-process floor B=1: faiss.knn 1 thread + kernel + backward", "floor"),
    Row("ZMemClient.risk(z) B=1 loopback, fwd+bwd", "client", "floor", "≤ 2× floor"),
    Row("  forward only (record=False, no grad)", "client_fwd", "floor"),
    Row("  GET /healthz round trip (same httpx client)", "healthz", "floor"),
    Row("in-process batched floor B={B}: faiss.knn {T} thr + kernel + bwd", "floor_batched"),
    Row(
        "ZMemClient.risk(z) B={B} per call, fwd+bwd",
        "client_batched",
        "floor_batched",
        "≤ 1.3× batched floor",
    ),
    Row("seed memory_risk, in-process (restacks its deque)", "seed", "floor"),
    Row("seed math, tensors cached, in-process (torch topk)", "seed_cached", "floor"),
    Row("client replica B=1 fwd+bwd", "replica", "floor"),
    Row("client replica B={B} per call fwd+bwd", "replica_batched", "floor_batched"),
]


def table(times: dict[str, list[float]], batch: int, threads: int) -> list[str]:
    p = {key: percentiles(t) for key, t in times.items()}
    lines = [f"{'path':64} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} {'calls':>6} {'ratio':>7}  target"]
    for row in ROWS:
        if row.key not in p:
            continue
        p50, p99 = p[row.key]
        ratio = f"{p50 / p[row.ref][0]:6.2f}×" if row.ref and row.ref in p else ""
        name = row.name.format(B=batch, T=threads)
        spread = f"{p99 / p50:7.2f}"
        lines.append(
            f"{name:64} {p50:8.3f} {p99:8.3f} {spread} {len(times[row.key]):6d} {ratio:>7}  {row.target}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--iters", type=int, default=300, help="B=1 calls per path (spread over the rounds)")
    ap.add_argument("--batch", type=int, default=256, help="rows of the batched query")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument(
        "--knn-threads", type=int, default=os.cpu_count() or 1, help="the service's and the batched floor's"
    )
    ap.add_argument("--no-seed", action="store_true", help="skip the seed's rows (slow to build at large n)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = Data.random(args.n, args.d)
    rng = np.random.default_rng(1)
    queries = torch.from_numpy(rng.standard_normal((args.iters, 1, args.d)) * 0.3).float()
    batched = torch.from_numpy(rng.standard_normal((8, args.batch, args.d)) * 0.3).float()
    per_round = max(1, args.iters // args.rounds)
    threads = min(args.knn_threads, args.batch)

    paths: dict[str, tuple[Step, int]] = {
        "floor": (floor_step(data, args.k, 1.0, queries, 1), per_round),
        "floor_batched": (floor_step(data, args.k, 1.0, batched, threads), 1),
    }
    if not args.no_seed:
        seed = seed_steps(data, args.k, queries)
        paths["seed"] = (seed["seed"], 1)
        paths["seed_cached"] = (seed["seed_cached"], per_round)
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(tmp, args.n, args.k, args.knn_threads)
        try:
            fill(srv.url, data)
            with ZMemClient(srv.url, timeout=60) as mem:
                paths["client"] = (client_step(mem, queries), per_round)
                paths["client_fwd"] = (client_step(mem, queries, backward=False), per_round)
                paths["healthz"] = (lambda: mem._http.get("/healthz"), per_round)
                paths["client_batched"] = (client_step(mem, batched), 1)
                paths.update(replica_paths(srv.url, queries, batched))
                times = interleaved(paths, args.rounds)
                polling = busy_polling(mem)
        finally:
            srv.stop()

    print(
        f"\nrisk(z) forward+backward, CPU, N={args.n}, d={args.d}, k={args.k}, torch threads=1, "
        f"{args.rounds} interleaved rounds, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    for line in table(times, args.batch, threads):
        print(line)
    print(polling)


if __name__ == "__main__":
    main()
