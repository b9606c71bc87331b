"""Exact k nearest neighbours: the contract, its one margin rule and its one certificate (numpy).

The contract: for query rows q and base rows x (float32), the k rows of smallest squared
L2 distance, nearest first, equal distances by the lower seq, equal to a float64 brute
force (`brute_force`). So an answer depends only on the rows and their seqs, never on
slot order. The CPU search here (`exact_knn`: FAISS or numpy candidates) and the torch
search (`zmem_core.knn_torch`: GEMM or faiss-gpu candidates) both run it the same way:

1. Candidates. A float32 search keeps, per query row, the c = k + `margin(k)` rows of
   smallest *approximate* distance; every other row's approximate distance is ≥ the
   largest kept, `last`.
2. Exact re-rank. The candidates' distances are recomputed from float64 differences and
   ordered by (d2, seq); the first k are the answer.
3. Certificate (`certify`). If every approximate distance is within E of the exact one,
   a row outside the candidates is at exact distance ≥ last − E. When the k-th exact
   distance (rounded up for the float64 re-rank's own error) is below last − E, no row
   outside can come before or tie with the answer: the row is *certified*.
4. Rescue. Uncertified rows get a full float64 scan (`brute_force` here, `full_scan` in
   torch): huge tie groups, near-ties within E, data far from the origin, tiny or huge z's.

The bound E. Every float32 candidate search computes the distance either directly,
Σ(xᵢ − qᵢ)², or as ‖x‖² − 2⟨x, q⟩ + ‖q‖² (a GEMM: FAISS's BLAS path, torch's addmm,
faiss-gpu). With u the unit roundoff of the product's precision (2⁻²⁴ for float32, more
for TF32 or bf16) and γₙ = nu/(1 − nu), each of ‖x‖², ⟨x, q⟩ and ‖q‖² is off by at most
γ_d times ‖x‖², ‖x‖‖q‖ (Cauchy–Schwarz on Σ|xᵢqᵢ|) and ‖q‖², and combining them costs
two more roundings of terms bounded by the same sum, so the relative part is at most
γ_{d+2}·(‖x‖ + ‖q‖)²; the direct form is within γ_{d+2}·‖x − q‖², which is smaller since
‖x − q‖ ≤ ‖x‖ + ‖q‖. That model of rounding holds only for normal numbers: a product
that underflows (coordinates near 1e-23 have squares near 1e-46, below float32's smallest
normal 2⁻¹²⁶) is off by an absolute amount instead, up to 2⁻¹²⁶ each when the hardware
flushes subnormals to zero (FTZ/DAZ), and there are at most 4d products and 3
combinations. So, with a factor of two for safety (which also covers the float32
‖x‖² a caller may pass as the norm, and a centred query rounded to float32):

    E = 2 (d + 3) u (‖x‖max + ‖q‖)²  +  8 (d + 3) · 2⁻¹²⁶

The bound assumes no intermediate overflows; every intermediate is at most
(‖x‖max + ‖q‖)² (times 1 + γ), so the certificate also requires that to be below half
of float32's max. The service accepts z's of squared norm up to float32's max / 4, where
that can fail: such rows are rescued, never trusted. Without the absolute term, a
relative-only bound certified wrong neighbours for 1e-23-sized z's, whose approximate
distances all round to 0.

The margin. For continuous data in d dimensions the squared distance to the j-th
neighbour grows like j^(2/d), so the relative gap between the k-th and the (k + m)-th is
about (2/d)·m/k: a margin proportional to k keeps the certified fraction independent of
k, and a floor keeps small k (whose k-th distance fluctuates most) and small duplicate
groups certified. `margin(k) = max(16, k // 4)` leaves a relative gap of about 1/(2d),
far above E/d2 ≈ 4(d + 3)u for data near the origin (d ≲ 1000); correctness never
depends on it, only how often the rescue runs, and a wider margin costs every search
(FAISS's selection and the re-rank grow with it). The same rule sizes the auto-σ
search window's first pass.

FAISS is imported inside the functions that use it: it is not in the base install.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

F32_ROUNDOFF = 2.0**-24
"""Unit roundoff of a float32 product (round to nearest)."""
F32_TINY = float(np.finfo(np.float32).tiny)  # 2⁻¹²⁶, the smallest normal float32
F32_MAX = float(np.finfo(np.float32).max)
F64_ROUNDOFF = 2.0**-53
SMALL_QUERY_ROWS = 16
"""Up to this many query rows, FAISS runs single-threaded (a pool costs more than it saves); from
it, a product over the transposed base takes at least this many rows at once (`knn_certified`)."""
BLAS_QUERY_ROWS = 8
"""From this many query rows, FAISS forms the distances by one matrix product (BLAS); below it,
row by row. The product's cost hardly depends on the rows (about 1.5 ms for 8 rows over
50,000 × 32, 2.2 ms for 16, one thread); the row-wise scan costs ~0.3 ms a row. FAISS's own
switch (`distance_compute_blas_threshold`, 128,000 in this build) compares another size and
left batches of hundreds of rows on the row-wise scan. Either way the distances are float32
products that the certificate bounds (both ways of forming them)."""
GEMM_QUERY_ROWS = 2
"""From this many query rows up to SMALL_QUERY_ROWS, a caller that keeps the base rows' squared
norms (`base_sqnorm`) gets its candidates from one numpy product instead (`_gemm_candidates`;
with the base transposed, `base_t`, at any number of rows), while SMALL_QUERY_ROWS rows of
scores fit in BLOCK_ELEMENTS (up to 262,144 base rows; a larger base goes to FAISS).
FAISS's row-wise scan reads the whole base once per query row (~0.26 ms a row over 50,000 × 32,
bound by the cache's bandwidth) and its BLAS path costs 0.35 ms a row at 2 rows, 0.21 at 4; one
product reads the base once for the batch: from the base transposed (`base_t`), 0.19 ms a row
at 2 rows, 0.11 at 4, 0.08 at 8 and 16; from the rows' layout 0.20, 0.14, 0.13 and 0.11 (one
thread, selection included; benchmarks/bench_knn_small.py). A concurrent service's batches
are mostly this small."""
CHUNK_ROWS = 4096
"""Base rows per product in `_gemm_candidates` (with 16 query rows, a 256 KiB block)."""
CHUNK_COLUMNS = 2048
"""Base columns per product in `_gemm_candidates` when the caller keeps the base transposed
(`base_t`: each [d + 1, 2048] block is 264 KiB at d = 32, and its product lands in the scores'
own layout). Over 50,000 × 32, one thread: 0.27 ms a batch at 1 query row, 0.32 at 5, 0.37 at
8, against 0.25, 0.49 and 0.72 from the rows' own layout (whose products come out [rows,
queries] and must be turned)."""
PARALLEL_QUERY_ROWS = 64
"""From this many query rows, a search by the product (`knn_certified`: candidates, re-rank and
certificate) is split by query rows over `threads` threads, each part at least
SMALL_QUERY_ROWS rows (`_split`): numpy's products and selections run outside the GIL. B=256
over 50,000 × 32 from the transposed base, the candidates alone: 14 ms (22 ms of CPU) on 2
threads, against 20.7 ms on one and FAISS's BLAS path's 15.5 ms (31.5 ms of CPU) on two; at
32 rows a second thread costs more than it saves."""
SAMPLE_STEP = 32
"""The candidate selection samples every SAMPLE_STEP-th score of a row to find a threshold
that about 4c scores are below, then sorts out only those (`_smallest`)."""
BLOCK_ELEMENTS = 1 << 22
"""Bound on the elements of one float64 [query rows, base rows] block in a full scan (~32 MiB)."""


def margin(k: int) -> int:
    """Candidates kept beyond k for the exact re-rank (see the module docstring)."""
    return max(16, k // 4)


def candidate_count(k: int, n: int) -> int:
    """How many of n base rows the candidate search keeps for k neighbours."""
    return min(n, k + margin(k))


def faiss_threads(rows: int, threads: int) -> int:
    """FAISS threads for `rows` query rows with `threads` available.

    Never more threads than query rows: FAISS was seen to return wrong neighbours on large
    data when it splits fewer queries over more threads."""
    return 1 if rows <= SMALL_QUERY_ROWS else max(1, min(threads, rows))


def certify(kth: Any, last: Any, base_sqnorm_max: Any, query_sqnorm: Any, dim: int, roundoff: float) -> Any:
    """Which query rows' candidate lists provably hold the exact top k: bool [B].

    kth [B]: the k-th smallest exact (float64 re-rank) squared distance among the
    candidates; last [B]: the largest approximate squared distance kept, every row left
    out having one at least as large; base_sqnorm_max: ≥ every base row's ‖x‖² (the rows
    as the candidate search saw them, e.g. centred); query_sqnorm [B]: ‖q‖² likewise;
    roundoff: the unit roundoff of the candidate search's products. All float64; numpy
    arrays or torch tensors alike (operators only, so no host synchronisation on CUDA).
    NaN or infinite inputs certify nothing.
    """
    scale = (base_sqnorm_max**0.5 + query_sqnorm**0.5) ** 2
    error = 2.0 * (dim + 3) * roundoff * scale + 8.0 * (dim + 3) * F32_TINY
    kth_up = kth * (1.0 + 4.0 * (dim + 2) * F64_ROUNDOFF)  # the re-rank's own float64 rounding
    return (kth_up < last - error) & (scale < F32_MAX / 2)


def rerank(
    xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, cand: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 distances of candidate rows cand int64 [B, c ≥ k] of xb float32 [N, d] to
    xq float32 [B, d] → (d2 float64 [B, k], rows int64 [B, k]), nearest first, ties by seq [N]."""
    diff = xb[cand].astype(np.float64) - xq[:, None, :].astype(np.float64)
    d2 = (diff * diff).sum(-1)  # the brute force's own expression: bit-equal distances
    if len(cand) == 1:  # the common single query: no broadcasting, one take
        order = np.lexsort((seq[cand[0]], d2[0]))[:k]
        return d2[:, order], cand[:, order]
    order = np.lexsort((seq[cand], d2), axis=-1)[:, :k]
    each = np.arange(len(cand))[:, None]  # (indexing, not take_along_axis: a few µs less a call)
    return d2[each, order], cand[each, order]


def brute_force(xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 scan of every row of xb float32 [N, d] for xq float32 [B, d], 1 ≤ k ≤ N
    → (d2 float64 [B, k], rows int64 [B, k]), nearest first, ties by the lower seq [N].

    The reference answer, and the rescue for rows whose certificate fails."""
    n = len(xb)
    xb64 = xb.astype(np.float64)
    block = max(1, BLOCK_ELEMENTS // max(1, xb.size))
    out_d2 = np.empty((len(xq), k), np.float64)
    out_rows = np.empty((len(xq), k), np.int64)
    for start in range(0, len(xq), block):
        q = xq[start : start + block].astype(np.float64)
        d2 = ((q[:, None, :] - xb64[None]) ** 2).sum(-1)
        for i, row in enumerate(d2, start):
            # Only rows at most the k-th distance can be in the answer: sort those by (d2, seq).
            near = np.flatnonzero(row <= np.partition(row, k - 1)[k - 1]) if k < n else np.arange(n)
            best = near[np.lexsort((seq[near], row[near]))[:k]]
            out_d2[i], out_rows[i] = row[best], best
    return out_d2, out_rows


def exact_knn(
    xb: np.ndarray,
    seq: np.ndarray,
    xq: np.ndarray,
    k: int,
    *,
    base_sqnorm_max: float | None = None,
    base_sqnorm: np.ndarray | None = None,
    base_t: np.ndarray | None = None,
    threads: int = 1,
    use_faiss: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of xb float32 [N, d] (seq int64 [N], distinct) to each row of
    xq float32 [B, d], 1 ≤ k ≤ N, exactly: (d2 float32 [B, k], rows int64 [B, k]), nearest
    first, equal float64 distances by the lower seq; d2 is the float64 distance, cast.
    xq may also be float64: a query centred exactly (rows stored minus an `exact_center`,
    the query minus it in float64); the candidate search then takes it rounded to float32.

    Steps 1–3 by `knn_certified`, then uncertified rows by `brute_force` (step 4).
    """
    d2, rows, certified = knn_certified(
        xb,
        seq,
        xq,
        k,
        base_sqnorm_max=base_sqnorm_max,
        base_sqnorm=base_sqnorm,
        base_t=base_t,
        threads=threads,
        use_faiss=use_faiss,
    )
    bad = np.flatnonzero(~certified)
    if len(bad):
        d2[bad], rows[bad] = brute_force(xb, seq, xq[bad], k)
    return d2.astype(np.float32), rows


def knn_certified(
    xb: np.ndarray,
    seq: np.ndarray,
    xq: np.ndarray,
    k: int,
    *,
    base_sqnorm_max: float | None = None,
    base_sqnorm: np.ndarray | None = None,
    base_t: np.ndarray | None = None,
    threads: int = 1,
    use_faiss: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1–3 of the module docstring: (d2 float64 [B, k], rows int64 [B, k], certified
    bool [B]); the rows where `certified` is true are exact. Arguments as for `exact_knn`.

    Candidates by FAISS (`use_faiss` None: when installed; `threads` for it, see
    `faiss_threads`) or by a numpy float32 product (`_gemm_candidates`: without FAISS; for
    GEMM_QUERY_ROWS to SMALL_QUERY_ROWS query rows when `base_sqnorm` is given; from
    GEMM_QUERY_ROWS rows when `base_t` is, split over `threads` from PARALLEL_QUERY_ROWS rows),
    the product only while SMALL_QUERY_ROWS rows of scores fit in BLOCK_ELEMENTS (N up to
    262,144; past it FAISS, when installed).
    `base_sqnorm_max`: a bound ≥ every row's ‖x‖² when the caller keeps one (else computed
    here, O(N·d)); `base_sqnorm` float32 [N]: every row's ‖x‖² (its float64 sum, rounded),
    when the caller keeps them; `base_t` float32 [d + 1, N], rows contiguous: the rows
    transposed with those norms as the last row, when the caller keeps that too (`base_sqnorm`
    is then its last row, and the small batches' product reads it: `_gemm_candidates`).
    """
    n, dim = xb.shape
    c = candidate_count(k, n)
    if c == n or len(xq) == 0:  # every row is a candidate: nothing to certify
        d2, rows = rerank(xb, seq, xq, np.broadcast_to(np.arange(n), (len(xq), n)), k)
        return d2, rows, np.ones(len(xq), bool)
    if use_faiss is None:
        use_faiss = _faiss() is not None
    if use_faiss and len(xq) == 1 and base_sqnorm_max is not None:
        single = _single_query(xb, seq, xq, k, c, base_sqnorm_max)
        if single is not None:
            return single
    if base_t is not None:
        base_sqnorm = base_t[-1]
    product = (
        base_sqnorm is not None
        and len(xq) >= GEMM_QUERY_ROWS
        and (base_t is not None or len(xq) <= SMALL_QUERY_ROWS)  # from the rows' layout: small only
        # Blocks of scores of SMALL_QUERY_ROWS rows at least (a base too large for that: FAISS).
        and min(len(xq), SMALL_QUERY_ROWS) * n <= BLOCK_ELEMENTS
    )
    parts = min(threads, len(xq) // SMALL_QUERY_ROWS)  # each part still takes the product
    # Only the transposed base's product splits: it is what a service asks for (BLAS on one
    # thread); a caller without FAISS keeps the one product it had (BLAS's own threads).
    if product and base_t is not None and parts > 1 and len(xq) >= PARALLEL_QUERY_ROWS:
        if base_sqnorm_max is None:
            base_sqnorm_max = float(np.einsum("nd,nd->n", xb, xb, dtype=np.float64).max())
        search = functools.partial(
            knn_certified,
            xb,
            seq,
            k=k,
            base_sqnorm_max=base_sqnorm_max,
            base_sqnorm=base_sqnorm,
            base_t=base_t,
            threads=1,  # a part never splits again: the pool's threads would wait on themselves
            use_faiss=use_faiss,
        )
        d2, rows, certified = _split(search, xq, parts)
        return d2, rows, certified
    if use_faiss and not product:
        approx, cand = _faiss_candidates(xb, xq, c, threads, base_sqnorm)
    else:
        approx, cand = _gemm_candidates(xb, xq, c, base_sqnorm, base_t)
    missing = (cand < 0).any(axis=1)  # FAISS's "no result" (-1) never becomes a row
    if missing.any():
        cand = np.where(cand < 0, 0, cand)
    d2, rows = rerank(xb, seq, xq, cand, k)
    if base_sqnorm_max is None:
        base_sqnorm_max = float(np.einsum("nd,nd->n", xb, xb, dtype=np.float64).max())
    q2 = np.einsum("bd,bd->b", xq, xq, dtype=np.float64)
    if len(xq) == 1:  # the common single query: the certificate on Python floats is cheaper
        ok = certify(float(d2[0, -1]), float(approx[0, -1]), base_sqnorm_max, float(q2[0]), dim, F32_ROUNDOFF)
        return d2, rows, np.array([ok and not bool(np.asarray(missing)[0])])
    last = approx[:, -1].astype(np.float64)
    return d2, rows, certify(d2[:, -1], last, base_sqnorm_max, q2, dim, F32_ROUNDOFF) & ~missing


def _single_query(
    xb: np.ndarray, seq: np.ndarray, xq: np.ndarray, k: int, c: int, base_sqnorm_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps 1–3 for one query row with FAISS candidates, in as few numpy calls as they take (a
    training step's query: after FAISS has swept the base through the caches, each call costs
    several microseconds). The same distances, order and certificate as the general path; None
    when FAISS returned fewer than c rows (the general path handles that)."""
    approx, cand = _faiss_candidates(xb, xq, c, 1)
    rows = cand[0]
    if rows.min() < 0:
        return None
    q64 = xq[0].astype(np.float64)
    diff = xb.take(rows, axis=0).astype(np.float64)
    diff -= q64
    d2 = (diff * diff).sum(-1)  # the brute force's own expression: bit-equal distances
    order = np.lexsort((seq[rows], d2))[:k]
    d2 = d2[order]
    ok = certify(
        float(d2[-1]), float(approx[0, -1]), base_sqnorm_max, float(q64 @ q64), xb.shape[1], F32_ROUNDOFF
    )
    return d2[None], rows[order][None], np.array([bool(ok)])


def exact_center(z: np.ndarray, bits: int = 8) -> np.ndarray:
    """A centre c float32 [d] for rows z float32 [n ≥ 1, d] such that z − c is exact in float32
    (`knn_torch.exact_center`'s rule, in numpy).

    Per coordinate: the mean rounded to `bits` significant bits where every z − c is then
    exact, else 0. Searching rows stored as z − c with queries centred in float64 gives the
    same float64 distances as the raw rows (bit for bit), while the float32 candidate search
    and its error bound see norms of the spread, not of the offset: without it, data far from
    the origin fail the certificate and take the full scan.
    """
    mean = z.astype(np.float64).mean(axis=0)
    mantissa, exponent = np.frexp(mean)
    c = np.ldexp(np.round(mantissa * 2.0**bits), exponent - bits).astype(np.float32)
    return np.where(centres_exactly(z, c) & np.isfinite(c), c, np.float32(0))


def centres_exactly(z: np.ndarray, center: np.ndarray) -> np.ndarray:
    """bool [d]: per coordinate, whether z − center is exact in float32 for every row of z."""
    with np.errstate(over="ignore", invalid="ignore"):
        return ((z - center).astype(np.float64) == z.astype(np.float64) - center.astype(np.float64)).all(
            axis=0
        )


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_candidates(
    xb: np.ndarray, xq: np.ndarray, c: int, threads: int, base_sqnorm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(approximate d2 float32 [B, c], rows int64 [B, c]) by `faiss.knn`, ascending; its BLAS
    path takes the rows' squared norms from `base_sqnorm` when given (else it sums them)."""
    faiss = _faiss()
    faiss.omp_set_num_threads(faiss_threads(len(xq), threads))
    xq, xb = np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(xb, np.float32)
    approx = np.empty((len(xq), c), np.float32)
    cand = np.empty((len(xq), c), np.int64)
    # `faiss.knn` without its wrapper: a tenth of a single query's time goes to it otherwise.
    ptr = faiss.swig_ptr
    cvar = faiss.cvar
    blas = cvar.distance_compute_blas_threshold  # put back after: other callers keep FAISS's own
    cvar.distance_compute_blas_threshold = 0 if len(xq) >= BLAS_QUERY_ROWS else 2**31 - 1
    try:
        norms = () if base_sqnorm is None else (ptr(np.ascontiguousarray(base_sqnorm, np.float32)),)
        faiss.knn_L2sqr(ptr(xq), ptr(xb), xb.shape[1], len(xq), len(xb), c, ptr(approx), ptr(cand), *norms)
    finally:
        cvar.distance_compute_blas_threshold = blas
    return approx, cand


def _gemm_candidates(
    xb: np.ndarray,
    xq: np.ndarray,
    c: int,
    base_sqnorm: np.ndarray | None = None,
    base_t: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(approximate d2 float64 [B, c], rows int64 [B, c]) by float32 products, ascending.

    Per row, ‖x‖² − 2⟨x, q⟩ in float32 (the base's product with −2q, exact scaling, plus the
    rows' norms), then ‖q‖² added in float64: the certificate's model of a GEMM distance, one
    rounding fewer. The product reads `base_t` float32 [d + 1, N] (the base transposed over
    its norms, rows contiguous) when the caller keeps it (`_scores_t`, the cheaper), else xb
    with `base_sqnorm` or norms summed here (`_scores`). Blocks of query rows keep the scores
    under BLOCK_ELEMENTS."""
    n = len(xb)
    if base_t is not None:
        scores = functools.partial(_scores_t, base_t)
    else:
        if base_sqnorm is None:
            base_sqnorm = np.einsum("nd,nd->n", xb, xb, dtype=np.float64).astype(np.float32)
        scores = functools.partial(_scores, xb, base_sqnorm)
    xq32 = np.asarray(xq, np.float32)
    q2 = np.einsum("bd,bd->b", xq, xq, dtype=np.float64)
    block = max(1, BLOCK_ELEMENTS // max(1, n))
    approx = np.empty((len(xq), c), np.float64)
    cand = np.empty((len(xq), c), np.int64)
    for start in range(0, len(xq), block):
        rows = xq32[start : start + block]
        with np.errstate(over="ignore", invalid="ignore"):  # near float32's max: the certificate refuses
            score = scores(rows)
        picked = _smallest(score, c)
        each = np.arange(len(rows))[:, None]
        kept = score[each, picked]
        order = np.argsort(kept, axis=1)
        stop = start + len(rows)
        cand[start:stop] = picked[each, order]
        approx[start:stop] = kept[each, order] + q2[start:stop, None]
    return approx, cand


POOL_NAME = "zmem-knn"
"""The name prefix of `_pool`'s threads."""


def _split(
    search: Callable[[np.ndarray], tuple[np.ndarray, ...]], xq: np.ndarray, threads: int
) -> tuple[np.ndarray, ...]:
    """search(xq), with xq's rows split over `threads` threads (this one and `_pool`'s), the
    parts' answers joined in order. On one of the pool's own threads it runs inline: a part
    waiting on parts queued behind it would wait forever."""
    if threading.current_thread().name.startswith(POOL_NAME):
        return search(xq)
    parts = np.array_split(xq, threads)
    asked = [_pool(threads - 1).submit(search, part) for part in parts[1:]]
    done = [search(parts[0])] + [f.result() for f in asked]
    return tuple(np.concatenate(each) for each in zip(*done, strict=True))


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The threads that share large searches with the caller's (`_split`)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=POOL_NAME)


# A forked child (a training worker, a data loader) has none of the parent's threads, so the
# parent's pool would take its work and never run it: the child makes its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _scores_t(base_t: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 [B, N]: ‖x‖² − 2⟨x, q⟩ for query rows float32 [B, d] against base_t [d + 1, N]
    (the rows transposed over their norms): one product of [−2q | 1] with each CHUNK_COLUMNS
    block, straight into the scores' layout. The norm joins the product as one more term, a
    rounding the certificate's bound already counts (the GEMM form's "two more roundings")."""
    dim, n = len(base_t) - 1, base_t.shape[1]
    q = np.empty((len(rows), dim + 1), np.float32)
    np.multiply(rows, np.float32(-2.0), out=q[:, :dim])
    q[:, dim] = 1.0
    score = np.empty((len(rows), n), np.float32)
    for a in range(0, n, CHUNK_COLUMNS):
        b = min(n, a + CHUNK_COLUMNS)
        np.matmul(q, base_t[:, a:b], out=score[:, a:b])
    return score


def _scores(xb: np.ndarray, base_sqnorm: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 [B, N]: ‖x‖² − 2⟨x, q⟩ for query rows float32 [B, d] against xb [N, d]. The query
    rows are padded (`_width`) to the widths the products' kernels take at once. The base is
    taken in chunks of CHUNK_ROWS rows, whose [chunk, rows] products stay in the cache while
    they are turned into the scores' [rows, N] layout (turning the whole product at once
    costs more than the product)."""
    n, dim = xb.shape
    width = _width(len(rows))
    q = np.zeros((dim, width), np.float32)
    q[:, : len(rows)] = rows.T
    q *= np.float32(-2.0)
    score = np.empty((len(rows), n), np.float32)
    part = np.empty((min(n, CHUNK_ROWS), width), np.float32)
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        np.matmul(xb[a:b], q, out=part[: b - a])
        score[:, a:b] = part[: b - a].T[: len(rows)]  # a small block: cheap to turn
    score += base_sqnorm
    return score


def _width(rows: int) -> int:
    """Query rows padded for the product: to a multiple of 4 when that adds one row, or above
    8 rows. The products' kernels take 4 query rows at once, and a remainder of 1 or 2 rows
    costs less than padding it (per batch over 50,000 × 32: 2 rows 0.29 ms, 3 rows 0.43 and
    4 rows 0.36, 5 rows 0.49 and 8 rows 0.72, 13 rows 1.13 and 16 rows 1.03)."""
    padded = -(-rows // 4) * 4
    return padded if padded - rows == 1 or rows > 8 else rows


def _smallest(score: np.ndarray, c: int) -> np.ndarray:
    """Column indices int64 [B, c] of the c smallest of each row of score [B, N] (c < N), any
    order; NaN counts as the largest. A threshold from every SAMPLE_STEP-th score, at
    about 4c scores, leaves a few hundred to sort; a row with fewer below it is sorted whole."""
    n = score.shape[1]
    j = -(-4 * c // SAMPLE_STEP)
    sampled = n // SAMPLE_STEP > j
    if sampled:
        threshold = np.partition(score[:, ::SAMPLE_STEP], j, axis=1)[:, j]
    out = np.empty((len(score), c), np.int64)
    for i, row in enumerate(score):
        near = np.flatnonzero(row <= threshold[i]) if sampled else None
        if near is None or len(near) < c:
            out[i] = np.argpartition(row, c - 1)[:c]
        else:
            out[i] = near[np.argpartition(row[near], c - 1)[:c]] if len(near) > c else near
    return out
