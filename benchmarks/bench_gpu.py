"""The GPU benchmark of `benchmarks/gpu_check.sh`: one table.

    python -m benchmarks.bench_gpu [--device cuda] [--sizes 50000,1000000,10000000] [--d 32] [--k 64]
    python -m benchmarks.bench_gpu --self-test      # CPU, tiny sizes: checks this script's logic

Rows: server-side search time, i.e. one `TorchIndex.search` call as the searcher
thread makes it (query to the device, exact kNN, answer back to the host; CUDA
synchronised by that copy back), p50 and p99 over repeats, for B=1 and B=256 at each N,
eager (`--cuda-graphs off`), with how many query rows the device search certified; under
each, on CUDA, the same search replayed from CUDA graphs and one replay's device part run
under `torch.cuda.set_sync_debug_mode("error")`, then the previous path
(`knn_torch.exact_knn`); then `ZMemClient.risk` B=1 forward+backward over loopback against
a `zmem serve --device <device> --durability none` filled with episodes, and from a
replica on the device beside the same search and kernel run in-process. Each N's first
answer (8 query rows) is checked against a full exact scan before it is timed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str, str]


def percentiles(times: list[float]) -> tuple[str, str]:
    us = np.array(times) * 1e6
    return f"{np.percentile(us, 50):.0f}", f"{np.percentile(us, 99):.0f}"


def timed(fn: Callable[[], object], repeats: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def search_rows(device: str, sizes: list[int], d: int, k: int, repeats: int) -> list[Row]:
    from zmem_core.knn import F32_ROUNDOFF
    from zmem_core.knn_graphs import GraphedSearch
    from zmem_core.knn_grouped import grouped_knn, prepare_query
    from zmem_core.knn_torch import full_scan
    from zmem_service.torch_index import TorchEngine, cuda_engine

    # Eager first (the graphed rows follow, on CUDA): --cuda-graphs off, then on.
    engine = (
        cuda_engine(device, cuda_graphs=False)
        if device.startswith("cuda")
        else TorchEngine(device, "benchmark")
    )
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    for n in sizes:
        index = engine.new_index(d)
        index.reserve(n)
        step = 1 << 20
        for start in range(0, n, step):  # written as a memory would: batches into slots
            m = min(step, n - start)
            z = rng.standard_normal((m, d), dtype=np.float32)
            index.write(np.arange(start, start + m), z, np.arange(start, start + m) + 1)
        for b in (1, 256):
            zq = rng.standard_normal((b, d), dtype=np.float32)
            d2, slots = index.search(zq, k, n)  # also applies the queued writes
            base, seq, sqnorm = index._base.x[:n], index._base.seq[:n], index._base.sqnorm[:n]
            check = torch.from_numpy(zq[:8]).to(index.device).double() - index._center
            ref_d2, ref_slots = full_scan(base, seq, check, k)
            exact = np.array_equal(slots[:8], ref_slots.cpu().numpy()) and np.array_equal(
                d2[:8], ref_d2.cpu().numpy()
            )
            query = torch.from_numpy(prepare_query(zq.astype(np.float64) - index._center_host))
            certified = grouped_knn(index._base, query.to(index.device), k, n, roundoff=F32_ROUNDOFF)[2]
            note = f"certified {int(certified.sum())}/{b}, {'exact' if exact else 'MISMATCH'}"
            p50, p99 = percentiles(timed(lambda zq=zq, index=index, n=n: index.search(zq, k, n), repeats))
            rows.append((f"{engine.name} search, N={n:,}, B={b}", p50, p99, note))
            if index.device.type == "cuda":  # the same search replayed from CUDA graphs
                index._graphs = GraphedSearch(enabled=True)
                graphed = index.search(zq, k, n)
                same = np.array_equal(graphed[1], slots) and np.array_equal(graphed[0], d2)
                p50, p99 = percentiles(timed(lambda zq=zq, index=index, n=n: index.search(zq, k, n), repeats))
                why = f"eager: {index._graphs.failed}" if index._graphs.failed else "graphed"
                rows.append((f"  {why}, N={n:,}, B={b}", p50, p99, "same" if same else "MISMATCH"))
                rows.append(
                    (
                        f"  one replay under sync debug 'error', N={n:,}, B={b}",
                        "-",
                        "-",
                        replay_ok(index, query, k, n),
                    )
                )
                index._graphs = GraphedSearch(enabled=False)

            args = (base, seq, index.device, index._center, sqnorm)
            p50, p99 = percentiles(timed(lambda zq=zq, args=args: old_search(zq, k, *args), repeats))
            rows.append((f"  old knn_torch.exact_knn, N={n:,}, B={b}", p50, p99, ""))
        index.clear()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def replay_ok(index: object, query: torch.Tensor, k: int, n: int) -> str:
    """One graphed search's device part with `torch.cuda.set_sync_debug_mode("error")`: any host
    synchronisation in it raises."""
    import warnings

    graphs, base = index._graphs, index._base  # type: ignore[attr-defined]
    query = query.to(base.device)
    graphs.search(base, query, k, n)  # captured (and warmed) outside the check
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        graphs.search(base, query, k, n)
        return "no synchronisation"
    except RuntimeError as e:
        return f"MISMATCH: it synchronised: {str(e).splitlines()[0][:80]}"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("default")


def old_search(
    zq: np.ndarray,
    k: int,
    base: torch.Tensor,
    seq: torch.Tensor,
    device: torch.device,
    center: torch.Tensor,
    sqnorm: torch.Tensor,
) -> object:
    """The index's search before the grouped layout: `knn_torch.exact_knn`, answer to the host."""
    from zmem_core.knn_torch import exact_knn

    d2, idx = exact_knn(
        base, seq, torch.from_numpy(zq).to(device), k, center=center, base_sqnorm=sqnorm, rescue=True
    )
    return d2.cpu(), idx.cpu()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def risk_row(device: str, n: int, d: int, k: int, repeats: int, replica: bool = False) -> list[Row]:
    """risk() B=1 over loopback (and, with `replica`, from a replica on `device` beside the same
    search and kernel in-process), or a row saying why it is not available."""
    name = f"risk() B=1 fwd+bwd, loopback, N={n:,}"
    try:
        import httpx

        from zmem_client import ZMemClient
    except ImportError as e:
        return [(name, "-", "-", f"not available: {e}")]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        path = f"{ROOT / 'service'}:{ROOT / 'client'}:{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "PYTHONPATH": path}
        cmd = [sys.executable, "-m", "zmem_service.cli", "serve", "--device", device, "--durability", "none"]
        cmd += ["--port", str(port), "--data-dir", f"{tmp}/data", "--capacity", str(n), "--k", str(k)]
        cmd += ["--min-size", "1", "--log-level", "warning"]
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            ready: dict[str, object] = {}
            while not ready:
                if proc.poll() is not None or time.monotonic() > deadline:
                    last = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
                    return [(name, "-", "-", f"not available: zmem serve --device {device}: {last[0][:120]}")]
                try:
                    r = httpx.get(url + "/readyz", timeout=1)
                    ready = r.json() if r.status_code == 200 else {}
                except httpx.HTTPError:
                    time.sleep(0.1)
            rng = np.random.default_rng(1)
            z = rng.standard_normal((n, d), dtype=np.float32) * 0.3
            with ZMemClient(url, batch_size=4096, timeout=60) as mem:
                for i in range(n):
                    mem.record(z[i], soft_bind=0.5, cone_vol=0.3, lambda_bind=0.1)
                mem.flush()
                queries = torch.from_numpy(rng.standard_normal((64, 1, d), dtype=np.float32) * 0.3)
                it = iter(range(10**9))

                def step() -> None:
                    q = queries[next(it) % len(queries)].clone().requires_grad_(True)
                    mem.risk(q).backward()

                p50, p99 = percentiles(timed(step, repeats, warm=20))
                out = [(name, p50, p99, f"server knn: {ready.get('knn', '?')}")]
            if replica:
                out += replica_rows(url, device, n, d, k, repeats, queries)
            return out
        except Exception as e:  # the benchmark reports, never stops the table
            return [(name, "-", "-", f"not available: {type(e).__name__}: {str(e)[:120]}")]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def replica_rows(
    url: str, device: str, n: int, d: int, k: int, repeats: int, queries: torch.Tensor
) -> list[Row]:
    """`ZMemClient(replica=True, device=device)` risk() B=1 fwd+bwd, and the same search and kernel
    run in-process on the replica's own snapshot (the mirror's search, the gather, the kernel)."""
    from zmem_client import ZMemClient, kernel_risk

    with ZMemClient(url, replica=True, device=device, timeout=60) as mem:
        rep = mem.replica
        assert rep is not None
        rep.sync(60)
        dev = rep.device
        qs = queries.to(dev)
        it = iter(range(10**9))

        def replica_step() -> None:
            q = qs[next(it) % len(qs)].clone().requires_grad_(True)
            mem.risk(q).backward()

        st = rep.state
        z, rt, _, _ = st.window()
        sigma = float(st.settings["sigma"]) if st.settings and st.settings["sigma"] != "auto" else 1.0

        def in_process() -> None:
            q = qs[next(it) % len(qs)].clone().requires_grad_(True)
            _, idx = rep._mirror.search(st, q.detach(), k)
            kernel_risk(q, z[idx], rt[idx], sigma)[0].backward()

        def synced(step: Callable[[], None]) -> Callable[[], None]:
            if dev.type != "cuda":
                return step
            return lambda: (step(), torch.cuda.synchronize(dev))  # type: ignore[func-returns-value]

        rp50, rp99 = percentiles(timed(synced(replica_step), repeats, warm=20))
        fp50, fp99 = percentiles(timed(synced(in_process), repeats, warm=20))
        ratio = float(rp50) / max(1.0, float(fp50))
        uncertified = rep.uncertified
    return [
        (
            f"replica on {dev} risk() B=1 fwd+bwd",
            rp50,
            rp99,
            f"{ratio:.2f}× in-process; uncertified rows {uncertified}",
        ),
        (f"  same search + kernel in-process, N={n:,}", fp50, fp99, ""),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="50000,1000000,10000000")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--risk-n", type=int, default=50_000)
    ap.add_argument("--risk-repeats", type=int, default=300)
    ap.add_argument("--self-test", action="store_true", help="CPU, tiny sizes: checks this script's logic")
    args = ap.parse_args(argv)
    if args.self_test:
        args.device, args.sizes, args.repeats = "cpu", "2000,6000", 5
        args.risk_n, args.risk_repeats = 2000, 20
    if args.device == "cpu":
        torch.set_num_threads(1)  # steadier than a thread pool on a busy machine; one searcher thread anyway
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        where = f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    t0 = time.perf_counter()
    rows = search_rows(args.device, sizes, args.d, args.k, args.repeats)
    rows += risk_row(args.device, args.risk_n, args.d, args.k, args.risk_repeats, replica=True)
    if args.device.startswith("cuda"):  # the same machine's CPU service, for comparison
        for name, p50, p99, note in risk_row("cpu", args.risk_n, args.d, args.k, args.risk_repeats):
            rows.append((name.replace("risk()", "risk() --device cpu"), p50, p99, note))
    took = time.perf_counter() - t0
    print(f"\nzmem GPU check: {where}; d={args.d}, k={args.k}; times in µs ({took:.0f} s)")
    print(f"{'':44} {'p50 µs':>9} {'p99 µs':>9}  note")
    for name, p50, p99, note in rows:
        print(f"{name:44} {p50:>9} {p99:>9}  {note}")
    return 1 if any(note == "MISMATCH" for *_, note in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
