"""The per-memory index on a torch device (`--device cuda[:N]`, or CPU tensors in tests).

Imported only when `--device` selects a GPU (or `auto` finds one): the CPU service
never imports torch. The search is the core's fixed-shape, sync-free exact kNN
(`zmem_core.knn_grouped`): GEMM scores with stored norms, group minima, an exact
float64 re-rank of a few candidates with ties by the lower seq, and the core's one
certificate. Then one synchronisation per batch brings the answers (and which rows are
certified) to the host; the rare uncertified rows take the core's threshold pass, and a
full scan only past its cap. With `cuda_graphs`, the fixed-shape search is replayed from a
CUDA graph per (query-row bucket, k) (`zmem_core.knn_graphs`), eager where capture fails.

faiss-gpu: with `--cuda-graphs off` and a faiss with GPU support installed, its `knn_gpu`
finds the candidates instead (same exact re-rank, certificate and full-scan rescue, from
`zmem_core.knn_torch`). It is an eager option only: it allocates and synchronises inside
faiss, so it can never be part of a captured CUDA graph, and with graphs on (the default)
the grouped search runs.

Layout on the device (`GroupedBase`), per slot: the z minus the index's centre (float32),
its seq (int64) and its squared norm (float32, +inf for an empty slot), the capacity
padded to a multiple of the group size. The centre is chosen at the first write
(`exact_center`: the mean, to 8 significant bits, on coordinates where subtracting it is
exact) so that distances stay those of the raw z's; a later write that would not subtract
exactly on some coordinate moves that coordinate's centre to 0 (also exact). Centring only
serves the float32 candidate search: z's far from the origin make ‖x‖² − 2⟨x, q⟩ cancel.

Threads: `write` only queues the change (host arrays); `search`, on the index
thread, applies what is queued and then searches, so device work and faiss-gpu
resources stay on that one thread. `reserve` allocates (on the writer thread):
torch's allocator is thread-safe, and the memory's lock orders every call.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from zmem_core.knn import F32_ROUNDOFF, candidate_count
from zmem_core.knn_graphs import MAX_ROWS, GraphedSearch
from zmem_core.knn_grouped import GroupedBase, prepare_query, query_width, rescue_uncertified
from zmem_core.knn_torch import exact_center, rerank_candidates, unit_roundoff
from zmem_core.knn_torch import rescue_uncertified as full_scan_uncertified

from .errors import InsufficientStorage

QUERY_ROWS = MAX_ROWS
"""Query rows per device search: a larger batch is searched in parts of this many rows (then
one synchronisation for all), so that the candidates' [B, c', d] float64 block stays bounded."""
FAISS_GPU_MAX_K = 2048
"""The largest k faiss-gpu's brute force accepts; above it, torch finds the candidates."""


class FaissGpuCandidates:
    """Candidates by faiss-gpu's `knn_gpu` over torch tensors; the GPU resources are made on
    first use, by the thread that searches (they must stay on one thread). Eager only (see the
    module docstring)."""

    def __init__(self, faiss: Any, device: int) -> None:
        self._faiss = faiss
        self._device = device
        self._resources: Any = None
        self._owner: int | None = None

    def __call__(self, base: torch.Tensor, query: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows int64 [B, c], the largest approximate distance kept float32 [B])."""
        if self._resources is None:
            self._resources = self._faiss.StandardGpuResources()
            self._owner = threading.get_ident()
        assert self._owner == threading.get_ident(), "faiss-gpu resources used from a second thread"
        d2, rows = self._faiss.knn_gpu(self._resources, query, base, c, device=self._device)
        return rows.to(torch.int64), d2[:, -1]


class TorchIndex:
    """One memory's z's on a torch device, addressed by ring slot (see the module docstring)."""

    def __init__(
        self,
        z_dim: int,
        device: torch.device,
        name: str,
        candidates: FaissGpuCandidates | None = None,
        *,
        cuda_graphs: bool = False,
    ) -> None:
        self.name = name
        self.z_dim = z_dim
        self.device = device
        self._candidates = candidates
        self._room = 0
        self._extent = 0  # slots [0, extent) may hold rows once the queue is applied
        self._base = GroupedBase(z_dim, device)
        self._graphs = GraphedSearch(cuda_graphs and self.device.type == "cuda")  # nothing to capture on CPU
        self._center_host: np.ndarray | None = None  # float32 [d]: the centre of the rows queued last
        self._center: torch.Tensor | None = None  # the centre of the rows on the device
        self._queue: list[tuple[str, Any]] = []
        self._pinned: torch.Tensor | None = None  # the host buffer queries go to the device from (CUDA)

    # -- room -------------------------------------------------------------------------

    def row_bytes(self) -> int:
        return 4 * self.z_dim + 8 + 4

    def bytes_after(self, slots: int) -> int:
        return max(slots, self._room) * self.row_bytes()

    @property
    def nbytes(self) -> int:
        return self._room * self.row_bytes()

    def reserve(self, slots: int) -> None:
        """Room for `slots` rows (the ring sizes its growth; the device pads it to a whole group);
        InsufficientStorage when the device has no room, and then nothing changed."""
        if slots <= self._room:
            return
        try:
            self._base.grow(slots)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e):
                raise
            raise InsufficientStorage(
                f"the search device {self.device} has no room for {slots} rows of z_dim {self.z_dim} "
                f"({slots * self.row_bytes()} bytes): {str(e).splitlines()[0]}",
                device=str(self.device),
            ) from None
        self._room = slots

    def clear(self) -> None:
        self._room = self._extent = 0
        self._base = GroupedBase(self.z_dim, self.device)
        self._center_host = self._center = None
        self._queue.clear()

    # -- writes (queued) and searches (index thread) --------------------------------

    def write(self, slots: np.ndarray, z: np.ndarray, seq: np.ndarray) -> None:
        """Queue rows for the device; the next `search` stores them. Copies its arguments."""
        if len(slots) == 0:
            return
        z = np.asarray(z, dtype=np.float32)
        if self._center_host is None:
            center = exact_center(torch.from_numpy(np.array(z))).numpy()
            self._queue.append(("center", center))
            self._center_host = center
        else:
            exact = (z - self._center_host).astype(np.float64) == z.astype(np.float64) - self._center_host
            if not exact.all():
                moved = np.where(exact.all(axis=0), self._center_host, np.float32(0))
                self._queue.append(("center", moved))
                self._center_host = moved
        x = z - self._center_host  # exact, by the choice of the centre
        slots = np.array(slots, np.int64)
        self._queue.append(("rows", (slots, x, np.array(seq, np.int64))))
        self._extent = max(self._extent, int(slots.max()) + 1)

    def search(self, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of slots [0, size) to each row of zq float32 [B, d]: (d2 float32 [B, k],
        slots int64 [B, k]), nearest first, exact, ties by the lower seq."""
        self._apply()
        zq = np.asarray(zq, np.float32)
        if len(zq) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        c = candidate_count(k, size)
        if self._candidates is not None and c < size and c <= FAISS_GPU_MAX_K:
            return self._search_faiss(zq, k, size)
        hidden = None
        if size < self._extent:  # slots past size are not searched: hide them for this search
            hidden = self._base.sqnorm[size : self._extent].clone()
            self._base.empty(size, self._extent)
        try:
            return self._search(zq, k, size)
        finally:
            if hidden is not None:
                self._base.sqnorm[size : self._extent] = hidden

    def _search(self, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        center = np.zeros(self.z_dim) if self._center_host is None else self._center_host.astype(np.float64)
        if self.device.type == "cuda":
            # One pinned buffer, kept: the last search's copy from it finished at that search's
            # synchronisation, so it is free to be written again.
            width = query_width(self.z_dim)
            if self._pinned is None or len(self._pinned) < len(zq):
                rows = max(len(zq), 2 * len(self._pinned) if self._pinned is not None else 1)
                self._pinned = torch.empty((rows, width), dtype=torch.float64, pin_memory=True)
            host = prepare_query(zq.astype(np.float64) - center, out=self._pinned.numpy())
            query = self._pinned[: len(host)].to(self.device, non_blocking=True)
        else:
            query = torch.from_numpy(prepare_query(zq.astype(np.float64) - center))
        found = []
        for start in range(0, len(query), QUERY_ROWS):
            out, _ = self._graphs.search(self._base, query[start : start + QUERY_ROWS], k, size)
            # a graph's outputs are overwritten by its next replay: keep a copy of each part
            found.append(out if len(query) <= QUERY_ROWS else tuple(t.clone() for t in out))
        if len(found) == 1:
            d2, slots, certified = found[0]
        else:
            d2, slots, certified = (torch.cat(parts) for parts in zip(*found, strict=True))
        d2_h, slots_h, certified_h = _to_host(d2[:, :k], slots[:, :k], certified)  # the one sync
        bad = np.flatnonzero(~certified_h)
        if len(bad):  # the threshold pass runs its own GEMM eagerly, at the process's precision
            u = unit_roundoff(self.device)
            d2_r, slots_r = rescue_uncertified(self._base, query, k, size, d2, bad, roundoff=u)
            d2_h[bad], slots_h[bad] = d2_r.cpu().numpy(), slots_r.cpu().numpy()
        return d2_h.astype(np.float32), slots_h

    def _search_faiss(self, zq: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._candidates is not None and self._center is not None
        base, seq, sqnorm = self._base.x[:size], self._base.seq[:size], self._base.sqnorm[:size]
        query = torch.tensor(zq, device=self.device)
        cand, last = self._candidates(base, (query - self._center).contiguous(), candidate_count(k, size))
        d2, rows, certified = rerank_candidates(
            base, seq, query, cand, last, k, center=self._center, base_sqnorm=sqnorm, roundoff=F32_ROUNDOFF
        )
        full_scan_uncertified(base, seq, query, k, d2, rows, certified, center=self._center)
        return d2.cpu().numpy(), rows.cpu().numpy()

    def _apply(self) -> None:
        """Carry the queued writes (and centre moves) to the device, in order."""
        for kind, item in self._queue:
            if kind == "center":
                center = torch.from_numpy(item).to(self.device)
                if self._center is not None:
                    # x + old centre is the raw z exactly; minus the new one (the old, or 0) too.
                    self._base.shift(self._center - center)
                self._center = center
            else:
                slots, x, seq = (torch.from_numpy(a).to(self.device) for a in item)
                self._base.write(slots, x, seq)
        self._queue.clear()


def _to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors as host arrays, with one synchronisation (pinned copies, then one wait)."""
    if tensors[0].device.type != "cuda":
        return [t.numpy().copy() for t in tensors]
    out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(out, tensors, strict=True):
        host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.numpy() for h in out]


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError | MemoryError) or "alloc" in str(e).lower()


class TorchEngine:
    """Makes `TorchIndex`es on one torch device (with faiss-gpu candidates when given).

    `cuda_graphs` (`--cuda-graphs`): replay the search from CUDA graphs (`zmem_core.knn_graphs`;
    eager where capture fails, and on CPU tensors, where there is nothing to capture)."""

    def __init__(
        self, device: str | torch.device, reason: str, *, faiss: Any = None, cuda_graphs: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.cuda_graphs = cuda_graphs
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.reason = reason
        self._candidates: FaissGpuCandidates | None = None
        if faiss is not None and self.device.type == "cuda":
            self._candidates = FaissGpuCandidates(faiss, self.device.index or 0)
            self.name = f"faiss-gpu:{self.device.index}"
        elif self.device.type == "cuda":
            self.name = f"torch-cuda:{self.device.index}"
        else:
            self.name = f"torch-{self.device.type}"

    def new_index(self, z_dim: int) -> TorchIndex:
        """A new empty index; allocates nothing until `reserve`."""
        return TorchIndex(z_dim, self.device, self.name, self._candidates, cuda_graphs=self.cuda_graphs)

    def device_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def warm_up(self) -> None:
        """One tiny search, so that the first query doesn't pay for CUDA and cuBLAS start-up;
        run it on the index thread."""
        index = self.new_index(2)
        index.reserve(2)
        index.write(np.arange(2), np.zeros((2, 2), np.float32), np.arange(2))
        index.search(np.zeros((1, 2), np.float32), 1, 2)
        index.clear()


def faiss_gpu() -> Any:
    """The faiss module when it has GPU support and sees a GPU, else None."""
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    import faiss.contrib.torch_utils  # lets knn_gpu take torch tensors

    return faiss


def _describe(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{device} is {props.name} with {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}"


def _probe(device: torch.device) -> str | None:
    """None when a tensor can be made and used on `device`, else why not."""
    try:
        (torch.ones(4, device=device) * 2).sum().item()
    except Exception as e:  # a broken driver or a device in use raises many kinds of errors
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def cuda_engine(device: str, *, cuda_graphs: bool = True) -> TorchEngine:
    """The engine for `--device cuda` or `cuda:N`; RuntimeError saying why when CUDA isn't usable."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        raise RuntimeError(
            f"--device {device}: torch {torch.__version__} (built with {built}) sees no usable CUDA device; "
            "use --device cpu or auto"
        )
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RuntimeError(f"--device {device}: not a device (use cuda or cuda:N)") from None
    if dev.type != "cuda":
        raise RuntimeError(f"--device {device}: not a CUDA device (use cuda or cuda:N)")
    count = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= count:
        raise RuntimeError(f"--device {device}: torch sees {count} CUDA device(s), numbered from 0")
    dev = torch.device("cuda", index)
    problem = _probe(dev)
    if problem:
        raise RuntimeError(f"--device {device}: {dev} is not usable: {problem}")
    # faiss-gpu allocates and synchronises inside faiss, so it can't be captured: it finds the
    # candidates only for eager searches (--cuda-graphs off), when it is installed.
    faiss = None if cuda_graphs else faiss_gpu()
    if faiss is not None:
        how = "faiss-gpu candidates (eager)"
    else:
        how = "grouped torch search, " + ("CUDA graphs" if cuda_graphs else "eager (--cuda-graphs off)")
    reason = f"--device {device}: {_describe(dev)}; {how}"
    return TorchEngine(dev, reason, faiss=faiss, cuda_graphs=cuda_graphs)


def auto_engine_reason() -> tuple[str | None, str]:
    """For `--device auto`: (the device to use, or None for the CPU; why)."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        return None, f"torch {torch.__version__} (built with {built}) sees no usable CUDA device"
    dev = torch.device("cuda", 0)
    problem = _probe(dev)
    if problem:
        return None, f"{dev} is not usable: {problem}"
    return "cuda:0", f"a usable GPU: {_describe(dev)}"
