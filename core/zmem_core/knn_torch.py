"""Exact k nearest neighbours in torch (CPU or CUDA tensors), ties by the lower seq.

The contract, the margin rule and the certificate are `zmem_core.knn`'s (see its
docstring); this module runs them on tensors. It serves the client's replica and the
service's faiss-gpu option (the service's own torch search is `zmem_core.knn_grouped`,
which uses `full_scan` from here), and imports only torch (and FAISS, lazily, for CPU
candidates).

How a search runs, for query rows q:

The base rows are stored minus a centre c (`center`), and the query is centred in
float64, so when every stored row equals z − c exactly (`exact_center` picks such a
c) the distances are those of the raw z's: the answer then does not depend on the
centre, and equals a float64 brute force over the raw z's. Centring keeps the
certificate's error bound small where z's sit far from the origin.

1. Candidates. Approximate squared distances ‖x‖² − 2⟨x, q⟩ (+ ‖q‖²) by one float32
   matrix product over the base, in blocks of rows to bound memory; the
   `candidate_count(k, N)` smallest of each query row are kept. Equal approximate
   distances are ordered by the lower seq (the selection key packs both), so
   bit-identical rows (duplicated z's) resolve as the exact search would.
2. Exact re-rank. The candidates' distances are recomputed from float64 differences and
   ordered by (d2, seq); the first k are the answer.
3. Certificate: `zmem_core.knn.certify` on the float64 k-th distance, with the unit
   roundoff of the matmul precision in force (`unit_roundoff`: TF32 or bf16 widen it).
4. Rescue. Uncertified rows are answered by a full exact scan: float64 differences to
   every base row, then the k smallest by (d2, seq) with fixed shapes.

Host synchronisation: steps 1–3 use fixed shapes and never read a device value on
the host. Deciding whether any row needs step 4 does (one boolean). So
`exact_knn(..., rescue=...)` lets the caller choose: the default rescues on the CPU
and, on CUDA, never synchronises: an uncertified row then keeps its step-2 answer
(exact except for ties and float32-level near-ties at the k-th place that the
margin missed); `knn_certified` returns the certificate for callers that want to
count or act on it. The service's faiss-gpu path reads its answer on the host anyway
and rescues.
"""

from __future__ import annotations

import torch

from .knn import F32_ROUNDOFF, candidate_count, certify, faiss_threads

BLOCK_ELEMENTS = 1 << 24
"""Bound on the elements of one temporary block ([query rows, base rows] scores, or
[query rows, candidates, d] differences): about 128 MiB of int64/float64."""

_SEQ_SPAN = (1 << 32) - 1


def unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 matrix product on `device` under torch's current settings."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "high" if precision == "highest" else precision
    return {"highest": F32_ROUNDOFF, "high": 2.0**-11}.get(precision, 2.0**-8)


def exact_knn(
    base: torch.Tensor,
    seq: torch.Tensor,
    query: torch.Tensor,
    k: int,
    *,
    center: torch.Tensor | None = None,
    base_sqnorm: torch.Tensor | None = None,
    rescue: bool | None = None,
    faiss_candidates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest base rows of each query row, exactly.

    base float32 [N, d] (rows already minus `center` when it is given), seq int64 [N]
    (distinct), query float32 [B, d] (raw; centred here), 1 ≤ k ≤ N, all on one
    device; `base_sqnorm` float32 [N] = ‖base row‖² when the caller keeps it.
    → (d2 float32 [B, k]: squared distances from float64 differences, then cast;
    idx int64 [B, k]: rows of base), nearest first, equal d2 by the lower seq.

    `rescue`: answer uncertified query rows by a full exact scan (see the module
    docstring). None (default): on CPU tensors yes; on CUDA no, so that the call
    never synchronises with the host. `faiss_candidates`: on CPU tensors, find the candidates
    with FAISS when it is installed (faster than torch's matrix product and top-k for a few
    query rows); the re-rank, certificate and rescue are the same, so is the answer.
    Raises ValueError on shapes, dtypes or k.
    """
    if rescue is None:
        rescue = base.device.type != "cuda"
    found = faiss_knn_candidates(base, seq, query, k, center) if faiss_candidates else None
    if found is not None:
        cand, last = found
        d2, idx, certified = rerank_candidates(
            base, seq, query, cand, last, k, center=center, base_sqnorm=base_sqnorm, roundoff=F32_ROUNDOFF
        )
    else:
        d2, idx, certified = knn_certified(base, seq, query, k, center=center, base_sqnorm=base_sqnorm)
    if rescue:
        rescue_uncertified(base, seq, query, k, d2, idx, certified, center=center)
    return d2, idx


def knn_certified(
    base: torch.Tensor,
    seq: torch.Tensor,
    query: torch.Tensor,
    k: int,
    *,
    center: torch.Tensor | None = None,
    base_sqnorm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–3 only, with no host synchronisation: (d2 [B, k], idx [B, k], certified bool [B]).

    Rows where `certified` is true are exact; arguments as for `exact_knn`.
    """
    _check(base, seq, query, k, center, base_sqnorm)
    n = len(base)
    device = base.device
    b = len(query)
    if b == 0:
        empty = torch.empty((0, k), dtype=torch.int64, device=device)
        return empty.to(torch.float32), empty, torch.ones(0, dtype=torch.bool, device=device)
    if base_sqnorm is None:
        base_sqnorm = (base * base).sum(dim=1)
    c = candidate_count(k, n)
    if c == n:  # every row is a candidate: nothing to certify
        cand = torch.arange(n, device=device).expand(b, n)
        d2, idx = _rerank(base, seq, _centred(query, center), cand, k)
        return d2.to(torch.float32), idx, torch.ones(b, dtype=torch.bool, device=device)
    q = _centred(query, center).to(torch.float32)
    seq_key = (seq - seq.min()).clamp_(max=_SEQ_SPAN)
    cand, last = _candidates(base, base_sqnorm, seq_key, q, c)
    last = last.to(torch.float64) + (q.to(torch.float64) ** 2).sum(dim=1)
    return rerank_candidates(base, seq, query, cand, last, k, center=center, base_sqnorm=base_sqnorm)


def rerank_candidates(
    base: torch.Tensor,
    seq: torch.Tensor,
    query: torch.Tensor,
    cand: torch.Tensor,
    last: torch.Tensor,
    k: int,
    *,
    center: torch.Tensor | None = None,
    base_sqnorm: torch.Tensor | None = None,
    roundoff: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2–3 for candidates found elsewhere (e.g. by faiss-gpu): (d2, idx, certified).

    cand int64 [B, c ≥ k]: rows of base; last [B]: the largest approximate squared
    distance (‖x − q‖² on centred data, float32 GEMM) among each row's candidates, every
    other row's being at least as large. `roundoff`: the GEMM's unit roundoff (default:
    torch's matmul setting on this device). Other arguments as for `exact_knn`.
    """
    q64 = _centred(query, center)
    d2, idx = _rerank(base, seq, q64, cand, k)
    if base_sqnorm is None:
        base_sqnorm = (base * base).sum(dim=1)
    u = unit_roundoff(base.device) if roundoff is None else roundoff
    certified = certify(
        d2[:, k - 1],  # float64: a cast to float32 first would read 0 for tiny z's
        last.to(torch.float64),
        base_sqnorm.max().to(torch.float64),
        (q64 * q64).sum(dim=1),
        base.shape[1],
        u,
    )
    return d2.to(torch.float32), idx, certified


def faiss_knn_candidates(
    base: torch.Tensor, seq: torch.Tensor, query: torch.Tensor, k: int, center: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Step 1 by `faiss.knn` on CPU tensors: (cand [B, c], last [B] float64), or None where it
    doesn't apply (not CPU, faiss not installed, every row a candidate)."""
    n = len(base)
    c = candidate_count(k, n)
    if base.device.type != "cpu" or c == n or len(query) == 0:
        return None
    try:
        import faiss
    except ImportError:
        return None
    _check(base, seq, query, k, center, None)
    xq = _centred(query, center).to(torch.float32).contiguous().numpy()
    faiss.omp_set_num_threads(faiss_threads(len(xq), torch.get_num_threads()))
    approx, rows = faiss.knn(xq, base.contiguous().numpy(), c)
    if (rows < 0).any():  # FAISS's "no result": let the torch path answer
        return None
    return torch.from_numpy(rows), torch.from_numpy(approx[:, -1]).to(torch.float64)


def rescue_uncertified(
    base: torch.Tensor,
    seq: torch.Tensor,
    query: torch.Tensor,
    k: int,
    d2: torch.Tensor,
    idx: torch.Tensor,
    certified: torch.Tensor,
    *,
    center: torch.Tensor | None = None,
) -> None:
    """Step 4, in place: the rows of (d2, idx) not certified get a full exact scan.

    Reads `certified` on the host: a synchronisation on CUDA."""
    rows = (~certified).nonzero().flatten()
    if len(rows):
        d2[rows], idx[rows] = full_scan(base, seq, _centred(query[rows], center), k)


def full_scan(
    base: torch.Tensor, seq: torch.Tensor, q64: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest by float64 differences to every row, ties by the lower seq.

    q64: float64 [B, d], centred like the base.

    Fixed shapes (no host synchronisation); O(B·N·d) work, so the rescue, not the common path.
    """
    n, dim = base.shape
    seq_key = seq - seq.min()
    rows = max(1, BLOCK_ELEMENTS // max(1, n * dim))
    step = max(1, BLOCK_ELEMENTS // max(1, dim))
    out_d2, out_idx = [], []
    for start in range(0, len(q64), rows):
        qb = q64[start : start + rows]
        d2 = torch.cat(
            [
                ((base[i : i + step].to(torch.float64)[None] - qb[:, None]) ** 2).sum(dim=-1)
                for i in range(0, n, step)
            ],
            dim=1,
        )
        kth = d2.topk(k, dim=1, largest=False).values[:, -1:]
        # Rows strictly nearer than the k-th distance are all in (fewer than k of them);
        # the rest of the k are the lowest seqs among rows at exactly the k-th distance.
        key = torch.where(d2 == kth, seq_key, torch.iinfo(torch.int64).max)
        key = torch.where(d2 < kth, -1, key)
        cand = key.topk(k, dim=1, largest=False).indices
        d2_c = d2.gather(1, cand)
        order = _order_by(d2_c, seq[cand])
        out_d2.append(d2_c.gather(1, order).to(torch.float32))
        out_idx.append(cand.gather(1, order))
    return torch.cat(out_d2), torch.cat(out_idx)


def _candidates(
    base: torch.Tensor, base_sqnorm: torch.Tensor, seq_key: torch.Tensor, q: torch.Tensor, c: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The c smallest approximate distances by (‖x‖² − 2⟨x, q⟩, seq): (rows [B, c], the largest
    kept ‖x‖² − 2⟨x, q⟩ [B])."""
    n = len(base)
    step = max(c, BLOCK_ELEMENTS // len(q))
    keys, rows = [], []
    for start in range(0, n, step):
        block = base[start : start + step]
        score = torch.addmm(base_sqnorm[start : start + step], q, block.T, alpha=-2.0)
        key = _pack(score, seq_key[start : start + step])
        if len(block) > c:
            key, where = key.topk(c, dim=1, largest=False)
        else:
            where = torch.arange(len(block), device=base.device).expand_as(key)
        keys.append(key)
        rows.append(where + start)
    key, row = torch.cat(keys, dim=1), torch.cat(rows, dim=1)
    if key.shape[1] > c:
        key, where = key.topk(c, dim=1, largest=False)
        row = row.gather(1, where)
    return row, _unpack(key.max(dim=1).values)


def _pack(score: torch.Tensor, seq_key: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (float32 score, seq): the score's bits, made monotone, above the seq."""
    bits = score.contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(torch.int64) << 32) | seq_key


def _unpack(key: torch.Tensor) -> torch.Tensor:
    bits = (key >> 32).to(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)


def _rerank(
    base: torch.Tensor, seq: torch.Tensor, q64: torch.Tensor, cand: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 distances of the candidates, the k first by (d2, seq): (d2 float64 [B, k],
    idx int64 [B, k])."""
    c, dim = cand.shape[1], base.shape[1]
    rows = max(1, BLOCK_ELEMENTS // (c * dim))
    out_d2, out_idx = [], []
    for start in range(0, len(q64), rows):
        cb = cand[start : start + rows]
        diff = base[cb].to(torch.float64) - q64[start : start + rows, None]
        d2 = (diff * diff).sum(dim=-1)
        order = _order_by(d2, seq[cb])[:, :k]
        out_d2.append(d2.gather(1, order))
        out_idx.append(cb.gather(1, order))
    return torch.cat(out_d2), torch.cat(out_idx)


def _order_by(d2: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Column order sorting each row by (d2, seq): by seq, then stably by d2."""
    by_seq = seq.argsort(dim=1, stable=True)
    return by_seq.gather(1, d2.gather(1, by_seq).argsort(dim=1, stable=True))


def exact_center(z: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """A centre c [d] for rows z float32 [n ≥ 1, d] such that z − c is exact in float32.

    Per coordinate: the mean rounded to `bits` significant bits where every z − c is
    then exact, else 0 (centring only pays where data sit far from the origin, and
    there it is exact). Later rows can be tested with `centres_exactly`.
    """
    mean = z.to(torch.float64).mean(dim=0)
    mantissa, exponent = torch.frexp(mean)
    c = torch.ldexp(torch.round(mantissa * 2.0**bits), exponent - bits).to(torch.float32)
    ok = ((z - c).to(torch.float64) == z.to(torch.float64) - c.to(torch.float64)).all(dim=0)
    return torch.where(ok & c.isfinite(), c, 0.0)


def centres_exactly(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """bool [d]: per coordinate, whether z − center is exact in float32 for every row of z."""
    return ((z - center).to(torch.float64) == z.to(torch.float64) - center.to(torch.float64)).all(dim=0)


def _centred(query: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """The query rows minus the centre, in float64 (exact for float32 inputs of moderate range)."""
    q64 = query.to(torch.float64)
    return q64 if center is None else q64 - center.to(torch.float64)


def _check(
    base: torch.Tensor,
    seq: torch.Tensor,
    query: torch.Tensor,
    k: int,
    center: torch.Tensor | None,
    base_sqnorm: torch.Tensor | None,
) -> None:
    if base.dim() != 2 or base.dtype != torch.float32:
        raise ValueError(f"base must be float32 [N, d], got {base.dtype} {list(base.shape)}")
    n, dim = base.shape
    if query.dim() != 2 or query.dtype != torch.float32 or query.shape[1] != dim:
        raise ValueError(f"query must be float32 [B, {dim}], got {query.dtype} {list(query.shape)}")
    if seq.dtype != torch.int64 or tuple(seq.shape) != (n,):
        raise ValueError(f"seq must be int64 [{n}], got {seq.dtype} {list(seq.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the base's rows), got {k}")
    if center is not None and tuple(center.shape) != (dim,):
        raise ValueError(f"center must be [{dim}], got {list(center.shape)}")
    if base_sqnorm is not None and tuple(base_sqnorm.shape) != (n,):
        raise ValueError(f"base_sqnorm must be [{n}], got {list(base_sqnorm.shape)}")
    devices = {t.device for t in (base, seq, query, center, base_sqnorm) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
