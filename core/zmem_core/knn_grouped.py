"""Exact k nearest neighbours in torch over a group-aligned base: fixed shapes, no host sync.

The contract, the margin rule and the certificate are `zmem_core.knn`'s; this module is the
device search the service's torch index runs (CPU or CUDA tensors alike), laid out so that
one search is a short, fixed sequence of kernels whose shapes depend only on (B, k bucket,
capacity), never on the data.

Layout (`GroupedBase`): the rows (float32 [C, d], already minus the index's centre), their
seqs (int64 [C]) and squared norms (float32 [C]), with the capacity C a multiple of the group
size g. Empty slots have squared norm +inf, so their approximate distance is +inf and one
shape serves every fill. The largest squared norm (float64, 0-d) is kept on write, as the
certificate's bound on ‖x‖², and never recomputed per query.

The search (`grouped_knn`), per query row q (centred, float64, and its float32 copy):

1. Scores ‖x‖² − 2⟨x, q⟩ by one `addmm` with the stored norms, chunked over C so that
   B·chunk stays under `BLOCK_ELEMENTS` (one chunk at N = 50k even for B = 256).
2. The minimum per group of g rows (`amin`): with the GEMM, the only pass over B·C.
3. The c' = k_b + margin(k_b) groups of smallest minimum (`topk` on float32), where k_b is
   k rounded up to a power of two (`k_bucket`); their c'·g scores gathered and cut to the
   c' smallest. Every row left out has a score at least the largest kept, `last`: a row in
   a dropped group is ≥ its group's minimum ≥ every kept group's minimum, and the c' kept
   group minima are c' rows at most that. Over several chunks, each chunk keeps its c'
   and the union is cut to c' again (the same argument, chunk by chunk).
4. Exact float64 differences for those c' rows only; order by (d2, seq); the first k_b.
   Cutting to k afterwards is exact: ties are ordered by seq within the bucket too.
5. `knn.certify` on the k-th exact distance and `last` (+ ‖q‖²): the one bound, shared
   with every other path. Certified rows are exact.

No `nonzero`, `.item()` or copy to the host: the caller reads the answer when it wants it.
Uncertified rows (huge tie groups, near-ties within the bound, tiny or huge z's) are
answered by `rescue_uncertified`, which reads the device (the service runs it after its
one synchronisation per batch): a threshold pass over the scores keeps every row whose
score `certify` cannot separate from the k-th exact distance, re-ranked exactly; a full
scan only when that set passes `rescue_cap`. So duplicate-heavy memories stay cheap.

The query's host part (`prepare_query`): the centred float64 query, its float32 copy and
‖q‖², packed in one float64 array, so that one copy carries a batch to the device.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from . import knn_torch
from .knn import candidate_count, certify

GROUP = 32
"""Rows per group: the group minimum is taken over this many consecutive slots."""
BLOCK_ELEMENTS = 1 << 24
"""Bound on B·chunk, the elements of one float32 score block (64 MiB)."""
_GENERATIONS = itertools.count()
RESCUE_MIN_ROWS = 4096
"""The threshold pass re-ranks at least this many rows per query row before a full scan."""


def k_bucket(k: int) -> int:
    """k rounded up to a power of two: one fixed shape serves every k in a bucket."""
    return 1 << max(0, k - 1).bit_length()


def padded(slots: int, group: int = GROUP) -> int:
    """The capacity holding `slots` rows: a multiple of the group size."""
    return -(-slots // group) * group


def rescue_cap(k: int) -> int:
    """Rows the threshold pass may re-rank per query row before it takes a full scan instead."""
    return max(RESCUE_MIN_ROWS, 8 * candidate_count(k, 1 << 62))


class GroupedBase:
    """Rows on a device in the group-aligned layout of the module docstring.

    `x` float32 [C, d], `seq` int64 [C], `sqnorm` float32 [C] (+inf where empty),
    `sqnorm_max` float64 0-d (≥ every stored ‖x‖²), C = `capacity` a multiple of `group`.
    Writes take device tensors; nothing here reads a device value on the host. Only `grow`
    replaces the tensors (and takes a new `generation`, unique in the process); every other
    change is in place, so a captured CUDA graph stays valid until the next growth.
    """

    def __init__(self, dim: int, device: torch.device, group: int = GROUP) -> None:
        self.dim, self.device, self.group = dim, torch.device(device), group
        self.x = torch.zeros((0, dim), dtype=torch.float32, device=self.device)
        self.seq = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.sqnorm = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.sqnorm_max = torch.zeros((), dtype=torch.float64, device=self.device)
        self.lanes = torch.arange(group, device=self.device)
        self.generation = next(_GENERATIONS)

    @classmethod
    def over(
        cls,
        x: torch.Tensor,
        seq: torch.Tensor,
        sqnorm: torch.Tensor,
        sqnorm_max: torch.Tensor,
        lanes: torch.Tensor,
    ) -> GroupedBase:
        """A base over tensors someone else keeps (views, never written here): x float32 [C, d],
        seq int64 [C], sqnorm float32 [C], sqnorm_max float64 0-d, lanes = arange(g) on their
        device, C a multiple of g. For a window of rows that starts or ends inside a group, pass
        `head`/`tail` to `grouped_knn` rather than writing +inf into someone else's norms."""
        base = cls.__new__(cls)
        base.dim, base.device, base.group = x.shape[1], x.device, len(lanes)
        base.x, base.seq, base.sqnorm, base.sqnorm_max, base.lanes = x, seq, sqnorm, sqnorm_max, lanes
        base.generation = next(_GENERATIONS)
        return base

    @property
    def capacity(self) -> int:
        return len(self.x)

    def grow(self, slots: int) -> None:
        """Room for at least `slots` rows (padded to the group size), rows kept. Allocation errors
        (out of device memory) pass through, and then nothing changed."""
        cap = padded(slots, self.group)
        if cap <= self.capacity:
            return
        x = torch.zeros((cap, self.dim), dtype=torch.float32, device=self.device)
        seq = torch.zeros(cap, dtype=torch.int64, device=self.device)
        sqnorm = torch.full((cap,), torch.inf, dtype=torch.float32, device=self.device)
        n = self.capacity
        x[:n], seq[:n], sqnorm[:n] = self.x, self.seq, self.sqnorm
        self.x, self.seq, self.sqnorm = x, seq, sqnorm
        self.generation = next(_GENERATIONS)

    def write(self, slots: torch.Tensor, x: torch.Tensor, seq: torch.Tensor) -> None:
        """Rows x float32 [n, d] with seqs int64 [n] into slots int64 [n] (distinct, < capacity)."""
        if len(slots) == 0:
            return
        sq = (x * x).sum(dim=1)
        self.x[slots], self.seq[slots], self.sqnorm[slots] = x, seq, sq
        torch.maximum(self.sqnorm_max, sq.max().to(torch.float64), out=self.sqnorm_max)

    def empty(self, start: int, stop: int) -> None:
        """Slots [start, stop) become empty (their rows are no longer searched)."""
        self.sqnorm[start:stop] = torch.inf

    def shift(self, delta: torch.Tensor) -> None:
        """Every stored row plus delta [d] (a recentre, exact by the caller's choice of centre);
        the norms and their maximum are recomputed (a write, not a query, pays for it)."""
        live = self.sqnorm.isfinite()
        self.x += delta
        sq = (self.x * self.x).sum(dim=1)
        self.sqnorm.copy_(torch.where(live, sq, torch.inf))
        self.sqnorm_max.copy_(torch.where(live, sq, 0.0).max())


def query_width(d: int) -> int:
    """Columns of a `prepare_query` buffer for d-dimensional queries."""
    return d + (d + 1) // 2 + 1


def prepare_query(q64: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The host part of a search: q64 float64 [B, d] (centred) → float64 [B, w] holding q64, its
    float32 copy (packed two to a column, read back by a dtype view) and ‖q‖²; see `unpack_query`.
    `out`: a float64 [≥ B, w] array to write into (a pinned buffer kept between searches); the
    first B rows are returned."""
    b, d = q64.shape
    if out is None:
        buf = np.zeros((b, query_width(d)), np.float64)
    else:
        buf = out[:b]
        buf[:] = 0.0
    buf[:, :d] = q64
    buf.view(np.float32)[:, 2 * d : 3 * d] = q64.astype(np.float32)
    buf[:, -1] = np.einsum("bd,bd->b", q64, q64)
    return buf


def device_query(rows: torch.Tensor) -> torch.Tensor:
    """`prepare_query` made on rows' own device (float [B, d], not centred): a query already
    on the GPU is never copied to the host to be prepared."""
    b, d = rows.shape
    buf = torch.zeros((b, query_width(d)), dtype=torch.float64, device=rows.device)
    q64 = rows.to(torch.float64)
    buf[:, :d] = q64
    buf.view(torch.float32)[:, 2 * d : 3 * d] = rows.to(torch.float32)
    buf[:, -1] = (q64 * q64).sum(dim=1)
    return buf


def unpack_query(buf: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a `prepare_query` buffer on the device: (q64 [B, d], q32 [B, d], ‖q‖² [B])."""
    return buf[:, :dim], buf.view(torch.float32)[:, 2 * dim : 3 * dim], buf[:, -1]


def grouped_knn(
    base: GroupedBase,
    query: torch.Tensor,
    k: int,
    size: int,
    *,
    roundoff: float,
    head: int = 0,
    tail: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–5 of the module docstring, no host synchronisation.

    query: a `prepare_query` buffer on base's device; 1 ≤ k ≤ size; size: the number of
    non-empty slots (only compared with the candidate count, to mask empty slots that a
    nearly empty base puts among the candidates); roundoff: the unit roundoff of the
    float32 GEMM (`knn_torch.unit_roundoff`); head, tail (< the group size): slots at the
    base's start and end that are not rows whatever their norms say (a window of a buffer
    whose edges fall inside groups: two fills of B·g scores, nothing over B·C).
    → (d2 float64 [B, k_b], slots int64 [B, k_b], certified bool [B]), nearest first by
    (d2, seq), k_b = min(k_bucket(k), capacity); the first k columns are the answer where
    `certified` is true.
    """
    q64, q32, q2 = unpack_query(query, base.dim)
    cap, g, b = base.capacity, base.group, len(query)
    kb = min(k_bucket(k), cap)
    c = candidate_count(kb, cap)
    if c == cap:  # every slot is a candidate: the re-rank alone is exact
        cand = torch.arange(cap, device=base.device).expand(b, cap)
        vals = base.sqnorm.expand(b, cap)
        if head or tail:
            vals = _mask_edges(vals.clone(), 0, cap, cap, head, tail)
        certified = torch.ones(b, dtype=torch.bool, device=base.device)
    else:
        step = max(g, BLOCK_ELEMENTS // max(1, b) // g * g)
        found = [
            _chunk_candidates(base, q32, start, min(cap, start + step), c, head, tail)
            for start in range(0, cap, step)
        ]
        if len(found) == 1:
            vals, cand = found[0]
        else:
            vals, where = torch.cat([v for v, _ in found], dim=1).topk(c, dim=1, largest=False)
            cand = torch.cat([r for _, r in found], dim=1).gather(1, where)
        last = vals[:, -1] + q2  # float64 by promotion
    diff = base.x[cand] - q64[:, None]  # float64 by promotion: exact differences
    d2 = (diff * diff).sum(dim=2)
    if size < c:  # empty slots among the candidates: their stored x is not a row
        d2 = d2.masked_fill(vals == torch.inf, torch.inf)
    _, by_seq = base.seq[cand].sort(dim=1, stable=True)
    d2, by_d2 = d2.gather(1, by_seq).sort(dim=1, stable=True)
    slots = cand.gather(1, by_seq.gather(1, by_d2[:, :kb]))
    d2 = d2[:, :kb]
    if c != cap:
        certified = certify(d2[:, k - 1], last, base.sqnorm_max, q2, base.dim, roundoff)
    return d2, slots, certified


def _mask_edges(score: torch.Tensor, start: int, stop: int, cap: int, head: int, tail: int) -> torch.Tensor:
    """score [B, stop − start] over slots [start, stop) with the first `head` and last `tail`
    slots of the base set to +inf (in place; those in this chunk only)."""
    if head and start < head:
        score[:, : head - start] = torch.inf
    if tail and stop > cap - tail:
        score[:, cap - tail - start :] = torch.inf
    return score


def _chunk_candidates(
    base: GroupedBase, q32: torch.Tensor, start: int, stop: int, c: int, head: int = 0, tail: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The c smallest scores ‖x‖² − 2⟨x, q⟩ among slots [start, stop) (a whole number of
    groups), by group minima: (scores float32 [B, c'] ascending, slots int64 [B, c']),
    c' = min(c, stop − start); every other slot of the chunk scores at least the last kept."""
    g, b = base.group, len(q32)
    score = torch.addmm(base.sqnorm[start:stop], q32, base.x[start:stop].T, alpha=-2.0)
    if head or tail:
        score = _mask_edges(score, start, stop, base.capacity, head, tail)
    groups = score.view(b, -1, g)
    kept = min(c, groups.shape[1])
    top = groups.amin(dim=2).topk(kept, dim=1, largest=False, sorted=False).indices
    sub = groups.gather(1, top[:, :, None].expand(b, kept, g)).view(b, kept * g)
    lanes = base.lanes if start == 0 else base.lanes + start
    ids = (top[:, :, None] * g + lanes).view(b, kept * g)
    vals, where = sub.topk(min(c, kept * g), dim=1, largest=False)
    return vals, ids.gather(1, where)


def rescue_uncertified(
    base: GroupedBase,
    query: torch.Tensor,
    k: int,
    size: int,
    d2: torch.Tensor,
    rows: np.ndarray,
    *,
    roundoff: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact answers (d2 float64 [R, k], slots int64 [R, k]) for the query rows `rows` (host
    int64 [R]) that `grouped_knn` left uncertified; d2 [B, ≥ k] is its answer's distances.

    A threshold pass: every slot whose float32 score `certify` cannot separate from the row's
    k-th exact distance (so every slot at or before the true k-th: its score is within the
    bound of its exact distance) is re-ranked exactly; a row whose set passes `rescue_cap`
    (or whose bound does not hold, e.g. near the float32 norm limit: then every slot is in
    the set) takes a full scan (`knn_torch.full_scan`) instead. Reads the device (counts,
    `nonzero`): run it after the batch's synchronisation.
    """
    sel = torch.from_numpy(rows).to(base.device)
    q64, q32, q2 = (t[sel] for t in unpack_query(query, base.dim))
    kth = d2[sel, k - 1]
    x, seq = base.x[:size], base.seq[:size]
    step = max(1, BLOCK_ELEMENTS // max(1, size))
    cap = rescue_cap(k)
    out_d2 = torch.empty((len(rows), k), dtype=torch.float64, device=base.device)
    out_slots = torch.empty((len(rows), k), dtype=torch.int64, device=base.device)
    scan: list[int] = []
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        score = torch.addmm(base.sqnorm[:size], q32[part], x.T, alpha=-2.0)
        near = ~certify(
            kth[part, None], score + q2[part, None], base.sqnorm_max, q2[part, None], base.dim, roundoff
        )
        for i, count in enumerate(near.sum(dim=1).tolist(), start):
            if count > cap:
                scan.append(i)
                continue
            cand = near[i - start].nonzero().flatten()
            diff = x[cand] - q64[i]
            dist = (diff * diff).sum(dim=1)
            order = _order(dist, seq[cand])[:k]
            out_d2[i], out_slots[i] = dist[order], cand[order]
    if scan:
        _, full_slots = knn_torch.full_scan(x, seq, q64[scan], k)
        for j, i in enumerate(scan):
            diff = x[full_slots[j]] - q64[i]  # full_scan's d2 is float32: recompute in float64
            out_d2[i], out_slots[i] = (diff * diff).sum(dim=1), full_slots[j]
    return out_d2, out_slots


def _order(d2: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """The order sorting d2 [n] by (d2, seq)."""
    by_seq = seq.argsort(stable=True)
    return by_seq[d2[by_seq].argsort(stable=True)]
