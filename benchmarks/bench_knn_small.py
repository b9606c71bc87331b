"""Small batches of queries on the CPU index: the ways to find their candidates, per query row.

    python -m benchmarks.bench_knn_small [--n 50000] [--d 32] [--k 64] [--calls 300]

A service under concurrent load searches the queries of one event-loop turn together: batches
of 2 to 6 rows, mostly. Over the same base rows (normal, N × d, float32) and the same queries,
for B from 1 to 32, the CPU time per query row (process time, median of `--calls` calls,
one thread each, BLAS on one thread as in the service) of:

- FAISS's row-wise scan (`faiss.knn_L2sqr`, what it does below BLAS_QUERY_ROWS);
- FAISS's matrix-product path with the rows' norms given (what it does from there);
- one numpy product of the base with the batch (`knn._gemm_candidates`), from the rows' own
  layout with their norms given, and from the base transposed over its norms (`base_t`, as the
  index keeps it);
- the index's whole search as the service calls it (`FaissCpuIndex.search`: candidates,
  exact re-rank, certificate, on one thread here), which takes the product (from the
  transposed base) from GEMM_QUERY_ROWS rows and FAISS's scan for one.

Every B's answer from the index is checked against a float64 brute force (rows and distances).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from zmem_core import knn
from zmem_service.index import FaissCpuIndex

BATCHES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 32)


def cpu_us(step: Callable[[], object], calls: int) -> float:
    """Median process CPU time of one call, µs (after a few warm-up calls)."""
    for _ in range(5):
        step()
    took = []
    for _ in range(calls):
        start = time.process_time()
        step()
        took.append(time.process_time() - start)
    return 1e6 * float(np.median(took))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    threadpool_limits(1, user_api="blas")
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, args.d)).astype(np.float32)
    sqnorm64 = np.einsum("nd,nd->n", xb, xb, dtype=np.float64)
    sqnorm = sqnorm64.astype(np.float32)
    base_t = np.ascontiguousarray(np.vstack([xb.T, sqnorm[None]]))  # rows contiguous, as the index keeps it
    seq = np.arange(args.n, dtype=np.int64)
    index = FaissCpuIndex(args.d, 1)
    index.reserve(args.n)
    index.write(np.arange(args.n), xb, seq)
    c = knn.candidate_count(args.k, args.n)
    ptr = faiss.swig_ptr

    def faiss_way(xq: np.ndarray, blas: bool) -> Callable[[], object]:
        out_d = np.empty((len(xq), c), np.float32)
        out_i = np.empty((len(xq), c), np.int64)

        def step() -> None:
            before = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = 0 if blas else 2**31 - 1
            try:
                norms = (ptr(sqnorm),) if blas else ()
                faiss.knn_L2sqr(ptr(xq), ptr(xb), args.d, len(xq), args.n, c, ptr(out_d), ptr(out_i), *norms)
            finally:
                faiss.cvar.distance_compute_blas_threshold = before

        return step

    print(
        f"candidates for B query rows over N={args.n:,} × d={args.d}, k={args.k} (c={c}), one thread: "
        "CPU µs per query row"
    )
    print(
        f"{'B':>4} {'faiss scan':>11} {'faiss BLAS':>11} {'product':>9} {'product T':>10}"
        f" {'index search':>13}  path  exact"
    )
    for b in BATCHES:
        xq = rng.standard_normal((b, args.d)).astype(np.float32)
        scan = cpu_us(faiss_way(xq, blas=False), args.calls) / b
        blas = cpu_us(faiss_way(xq, blas=True), args.calls) / b
        product = cpu_us(lambda xq=xq: knn._gemm_candidates(xb, xq, c, sqnorm), args.calls) / b
        product_t = cpu_us(lambda xq=xq: knn._gemm_candidates(xb, xq, c, base_t=base_t), args.calls) / b
        search = cpu_us(lambda xq=xq: index.search(xq, args.k, args.n), args.calls) / b
        d2, rows = index.search(xq, args.k, args.n)
        ref_d2, ref_rows = knn.brute_force(xb, seq, xq, args.k)
        exact = np.array_equal(rows, ref_rows) and np.array_equal(d2, ref_d2.astype(np.float32))
        path = "scan" if b == 1 else "prod"  # the index keeps the transposed base: a product from 2 rows
        print(
            f"{b:>4} {scan:>11.1f} {blas:>11.1f} {product:>9.1f} {product_t:>10.1f} {search:>13.1f}"
            f"  {path:>4}  {'yes' if exact else 'NO'}"
        )


if __name__ == "__main__":
    main()
