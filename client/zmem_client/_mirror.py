"""The replica's copy of one memory: immutable snapshots in tensors on its device, and their search.

The rows live in a window `[start, start + size)` of buffers longer than the memory
(`capacity` plus a quarter, padded to the search's group size): new rows are written past
the window's end, where no published snapshot reads, and the window slides; only when it
reaches the end are the surviving rows copied into a fresh buffer. So a snapshot is never
written to once published, the risk path reads one consistent state without a lock, and
each row costs O(1) copies. Sizes, k, sigma and activity are host numbers, so on CUDA the
risk path never waits for the device.

The search is the core's, as in the service:

- on the CPU, `zmem_core.knn.exact_knn` over numpy views of the window (FAISS candidates
  when installed, the exact float64 re-rank, the certificate and, for the rare uncertified
  row, the full scan): nothing else on the path, so a B=1 query costs about what the same
  search costs in-process;
- on a GPU, the fixed-shape grouped search (`zmem_core.knn_grouped`) over the window, its
  edges masked where they fall inside a group, never synchronising: a row it cannot
  certify (huge tie groups, near-ties within float32's error) keeps its re-ranked answer
  and is counted in `uncertified` (read it; the feed thread also warns once in the
  `zmem_client` log, reading the count without waiting for the device), never silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from zmem_core import knn
from zmem_core.knn_grouped import GROUP, GroupedBase, device_query, grouped_knn, padded
from zmem_core.knn_torch import unit_roundoff

from ._exceptions import ReplicaError
from ._records import record_event

log = logging.getLogger("zmem_client")
CORES = os.cpu_count() or 1  # read once: asking costs a query tens of microseconds


@dataclass(frozen=True)
class Snapshot:
    """One published, immutable view of the memory. Tensors are never written inside
    `[start, start + size)` once published; host numbers describe them."""

    generation: str | None
    settings: dict[str, Any] | None  # the feed's settings object (None: unknown memory)
    z: torch.Tensor  # float32 [L, d] on the replica's device, L a multiple of GROUP
    risk_target: torch.Tensor  # float32 [L]
    seq: torch.Tensor  # int64 [L]
    sqnorm: torch.Tensor  # float32 [L]: ‖z‖² per row, for the search's scores
    sqnorm_max: torch.Tensor  # float64 0-d: ≥ every ‖z‖² in the window (the certificate's bound)
    host_seq: np.ndarray  # int64 [L], the same seqs on the host (for the feed thread)
    start: int
    size: int
    sigma_auto: float | None
    next_seq: int  # the seq the replica expects next (the feed's `after` is next_seq - 1)
    ready: Any = None  # a CUDA event recorded after the snapshot's writes (None on CPU)

    @property
    def capacity(self) -> int:
        return int(self.settings["capacity"]) if self.settings else 0

    @property
    def z_dim(self) -> int | None:
        return self.settings.get("z_dim") if self.settings else None

    @property
    def active(self) -> bool:
        return self.settings is not None and self.size > 0 and self.size >= int(self.settings["min_size"])

    @property
    def nbytes(self) -> int:
        tensors = (self.z, self.risk_target, self.seq, self.sqnorm)
        return sum(int(t.nbytes) for t in tensors) + int(self.host_seq.nbytes)

    def window(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [size, d], risk_target [size], seq [size], sqnorm [size]: views, oldest first."""
        lo, hi = self.start, self.start + self.size
        return self.z[lo:hi], self.risk_target[lo:hi], self.seq[lo:hi], self.sqnorm[lo:hi]


def row_bytes(z_dim: int) -> int:
    """Device and host bytes of one mirrored row: z, risk_target, seq, sqnorm and the host seq."""
    return 4 * z_dim + 4 + 8 + 4 + 8


class Mirror:
    """Builds and searches `Snapshot`s on `device`, within `max_bytes` of buffers."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        self.device = device
        self.max_bytes = max_bytes
        self.grouped = device.type == "cuda"  # the CPU takes the core's numpy search (FAISS)
        self._lanes = torch.arange(GROUP, device=device)
        self._uncertified = torch.zeros((), dtype=torch.int64, device=device)
        self._warned = False
        self._views: tuple[Snapshot, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reading: tuple[torch.Tensor, Any] | None = None  # a count on its way to the host

    @property
    def uncertified(self) -> int:
        """Query rows the GPU search answered without its certificate (each exact unless a tie
        group or a float32 near-tie ran past its candidates). Reading it waits for the device."""
        count = int(self._uncertified)
        self._warn(count)
        return count

    def check(self) -> None:
        """Warn (once) when rows went uncertified, without waiting for the device: the count is
        copied to pinned memory behind an event, and read at a later call once the event is
        done. The feed thread calls it after each page."""
        if self._warned:
            return
        if self.device.type != "cuda":
            self._warn(int(self._uncertified))
            return
        if self._reading is not None and self._reading[1].query():
            self._warn(int(self._reading[0]))
            self._reading = None
        if self._reading is None:
            host = torch.zeros((), dtype=torch.int64, pin_memory=True)
            host.copy_(self._uncertified, non_blocking=True)
            self._reading = (host, record_event(self.device))

    def _warn(self, count: int) -> None:
        if count and not self._warned:
            self._warned = True
            log.warning(
                "the replica answered %d query rows on %s that its search could not certify exact "
                "(huge groups of equal z's, or near-ties within float32's error); replica=False "
                "answers them exactly (mem.replica.uncertified counts them)",
                count,
                self.device,
            )

    def empty(self, settings: dict[str, Any] | None, generation: str | None) -> Snapshot:
        d = int(settings.get("z_dim") or 0) if settings else 0
        return Snapshot(
            generation=generation,
            settings=settings,
            z=torch.zeros((0, d), dtype=torch.float32, device=self.device),
            risk_target=torch.zeros(0, dtype=torch.float32, device=self.device),
            seq=torch.zeros(0, dtype=torch.int64, device=self.device),
            sqnorm=torch.zeros(0, dtype=torch.float32, device=self.device),
            sqnorm_max=torch.zeros((), dtype=torch.float64, device=self.device),
            host_seq=np.zeros(0, np.int64),
            start=0,
            size=0,
            sigma_auto=None,
            next_seq=1,
        )

    def append(self, st: Snapshot, z: np.ndarray, rt: np.ndarray, seq: np.ndarray, capacity: int) -> Snapshot:
        """The snapshot after appending rows (ascending seqs), FIFO at `capacity`.

        Writes only past the published window's end; a fresh buffer when it runs out.
        """
        n = len(seq)
        d = z.shape[1]
        if n > capacity:
            z, rt, seq, n = z[-capacity:], rt[-capacity:], seq[-capacity:], capacity
        new_size = min(capacity, st.size + n)
        kept = new_size - n  # old rows that survive
        end = st.start + st.size
        if end + n <= st.z.shape[0]:
            buf_z, buf_rt, buf_seq, buf_sq, host_seq = st.z, st.risk_target, st.seq, st.sqnorm, st.host_seq
            at, start = end, end + n - new_size
        else:
            length = padded(
                capacity + max(1, capacity // 4)
                if new_size == capacity
                else min(capacity + max(1, capacity // 4), max(64, 2 * new_size))
            )
            need = length * row_bytes(d)
            if need > self.max_bytes:
                raise ReplicaError(
                    f"the replica needs {need} bytes for {length} rows of z_dim {d} (the memory holds "
                    f"{new_size}, capacity {capacity}), over replica_max_bytes={self.max_bytes}: raise the "
                    "limit or use replica=False"
                )
            # Zeros, not garbage: the GPU search scores whole groups, edges included (then masks them).
            buf_z = torch.zeros((length, d), dtype=torch.float32, device=self.device)
            buf_rt = torch.zeros(length, dtype=torch.float32, device=self.device)
            buf_seq = torch.zeros(length, dtype=torch.int64, device=self.device)
            buf_sq = torch.zeros(length, dtype=torch.float32, device=self.device)
            host_seq = np.zeros(length, np.int64)
            if kept:
                lo = end - kept
                buf_z[:kept] = st.z[lo:end]
                buf_rt[:kept] = st.risk_target[lo:end]
                buf_seq[:kept] = st.seq[lo:end]
                buf_sq[:kept] = st.sqnorm[lo:end]
                host_seq[:kept] = st.host_seq[lo:end]
            at, start = kept, 0
        new_z = self._upload(np.ascontiguousarray(z, np.float32))
        new_sq = (new_z * new_z).sum(dim=1)
        buf_z[at : at + n] = new_z
        buf_sq[at : at + n] = new_sq
        buf_rt[at : at + n] = self._upload(np.ascontiguousarray(rt, np.float32))
        buf_seq[at : at + n] = self._upload(np.ascontiguousarray(seq, np.int64))
        host_seq[at : at + n] = seq
        # A bound, not the window's exact maximum: rows that left may have raised it (it is
        # never lowered within a buffer), which only makes the certificate more careful.
        bound = st.sqnorm_max if kept else torch.zeros_like(st.sqnorm_max)
        sqnorm_max = torch.maximum(bound, new_sq.max().to(torch.float64)) if n else bound
        return replace(
            st,
            z=buf_z,
            risk_target=buf_rt,
            seq=buf_seq,
            sqnorm=buf_sq,
            sqnorm_max=sqnorm_max,
            host_seq=host_seq,
            start=start,
            size=new_size,
            next_seq=int(seq[-1]) + 1,
            ready=None,
        )

    def find(
        self, st: Snapshot, rows: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k nearest window rows (1 ≤ k ≤ size) to each query row (detached [B, d], any
        device), nearest first, ties by the lower seq: (d2 float32 [B, k], z [B, k, d],
        risk_target [B, k], seq [B, k]) on the mirror's device."""
        if self.grouped:
            d2, idx = self.search(st, rows, k)
            z, rt, seq, _ = st.window()
            return d2, z[idx], rt[idx], seq[idx]
        hz, hrt, hseq = self._host_window(st)
        hd2, hidx = knn.exact_knn(
            hz,
            hseq,
            rows.to("cpu", torch.float32).numpy(),
            k,
            base_sqnorm_max=float(st.sqnorm_max),
            threads=CORES,  # a batch spreads over the cores; a small query takes one
        )
        return (
            torch.from_numpy(hd2),
            torch.from_numpy(hz[hidx]),
            torch.from_numpy(hrt[hidx]),
            torch.from_numpy(hseq[hidx]),
        )

    def _host_window(self, st: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy views (no copies) of a CPU snapshot's window: z, risk_target, seq; kept for the
        snapshot answered last, which most queries ask about."""
        cached = self._views
        if cached is None or cached[0] is not st:
            z, rt, seq, _ = st.window()
            cached = self._views = (st, z.numpy(), rt.numpy(), seq.numpy())
        return cached[1], cached[2], cached[3]

    def search(self, st: Snapshot, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The GPU search (`grouped`) of `find`: (d2 float32 [B, k], index int64 [B, k] into the
        window) on the mirror's device, no host synchronisation."""
        end = st.start + st.size
        lo, hi = st.start - st.start % GROUP, min(len(st.z), padded(end))
        base = GroupedBase.over(st.z[lo:hi], st.seq[lo:hi], st.sqnorm[lo:hi], st.sqnorm_max, self._lanes)
        if st.ready is not None:  # the feed thread's writes come first; no host wait
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(st.ready)
            for t in (st.z, st.risk_target, st.seq, st.sqnorm, st.sqnorm_max):
                t.record_stream(stream)  # keep the buffers from reuse while this stream reads them
        if rows.device.type == "cpu" and self.device.type == "cuda":
            rows = rows.pin_memory()  # a pageable copy would synchronise
        rows = rows.to(self.device, non_blocking=True)
        head = st.start - lo
        u = unit_roundoff(self.device)
        d2, slots, certified = grouped_knn(
            base, device_query(rows), k, st.size, roundoff=u, head=head, tail=hi - end
        )
        self._uncertified += (~certified).sum()
        return d2[:, :k].to(torch.float32), slots[:, :k] - head

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            # Pinned and asynchronous: a pageable copy would synchronise (and fail under sync debug mode).
            return t.pin_memory().to(self.device, non_blocking=True)
        return t
