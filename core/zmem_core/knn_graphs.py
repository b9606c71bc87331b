"""CUDA graphs for the grouped kNN (`zmem_core.knn_grouped`): one capture per shape, then replays.

`grouped_knn` runs a fixed sequence of kernels whose shapes depend only on (query rows, k,
capacity, whether the base holds fewer rows than candidates): replaying that sequence as a
CUDA graph costs one launch instead of ~30, which is most of a small search's time.
`GraphedSearch` keeps one graph per (query-row bucket 1, 2, 4 … 256; k; that flag) for
one base generation (a growth replaces the base's tensors, and the graphs go with them;
every other write is in place, so replays see it). A batch's rows are copied into the
graph's static query buffer, padded up to the bucket; the outputs are the graph's own
tensors, valid until the next replay.

Precision: a graph is captured with TF32 off (`torch.backends.cuda.matmul.allow_tf32` and
the float32 matmul precision set to "highest" for the capture, then restored), so its
certificate uses float32's unit roundoff whatever the process's flags; the eager path leaves
the flags alone and uses `knn_torch.unit_roundoff`.

Eager fallback: where capture fails (a CPU tensor, an old driver, an allocator setting the
graph pool refuses), the search runs eagerly from then on, said once in the log. Capture and
replay must run on one thread (the service's index thread); other threads may use the
device meanwhile (the capture is thread-local).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .knn import F32_ROUNDOFF, candidate_count
from .knn_grouped import GroupedBase, grouped_knn, k_bucket
from .knn_torch import unit_roundoff

log = logging.getLogger("zmem.knn")

MAX_ROWS = 256
"""The largest query-row bucket: callers search larger batches in parts of this many rows."""
MAX_GRAPHS = 32
"""Graphs kept per base (each holds a memory pool for its temporaries): past this many
shapes, the one captured first is dropped."""


def rows_bucket(rows: int) -> int:
    """Query rows rounded up to a power of two (at most `MAX_ROWS`)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"query rows must be in 1..{MAX_ROWS}, got {rows}")
    return 1 << (rows - 1).bit_length()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    query: torch.Tensor  # the static input, [bucket, w]
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class GraphedSearch:
    """`grouped_knn` replayed from CUDA graphs, or run eagerly (see the module docstring).

    `enabled`: try graphs at all (`--cuda-graphs on|off`). After a capture fails, `failed`
    says why and every later search is eager.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.failed: str | None = None
        self._graphs: dict[tuple[int, int, bool], _Captured] = {}
        self._owner: int | None = None

    @property
    def graphed(self) -> bool:
        """Whether searches are (to be) replayed from graphs."""
        return self.enabled and self.failed is None

    def search(
        self, base: GroupedBase, query: torch.Tensor, k: int, size: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float]:
        """`grouped_knn(base, query, k, size)` for 1 ≤ B ≤ `MAX_ROWS` query rows → (its answer,
        the unit roundoff its certificate assumed). Graphed answers are the graph's tensors:
        read or copy them before the next search."""
        if not self.graphed:
            u = unit_roundoff(base.device)
            return grouped_knn(base, query, k, size, roundoff=u), u
        if base.generation != self._owner:  # a new base, or a grown one: new tensors
            self._graphs.clear()
            self._owner = base.generation
        b = len(query)
        key = (rows_bucket(b), k, size < candidate_count(min(k_bucket(k), base.capacity), base.capacity))
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(base, key[0], query.shape[1], k, size)
            except Exception as e:  # capture fails in many ways (no CUDA, driver, allocator)
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self._graphs.clear()
                log.warning(
                    "CUDA graph capture failed, kNN searches run eagerly from now on: %s", self.failed
                )
                u = unit_roundoff(base.device)
                return grouped_knn(base, query, k, size, roundoff=u), u
            if len(self._graphs) >= MAX_GRAPHS:
                del self._graphs[next(iter(self._graphs))]
            self._graphs[key] = captured
        captured.query[:b].copy_(query)
        captured.graph.replay()
        d2, slots, certified = captured.out
        return (d2[:b], slots[:b], certified[:b]), F32_ROUNDOFF

    def _capture(self, base: GroupedBase, bucket: int, width: int, k: int, size: int) -> _Captured:
        static = torch.zeros((bucket, width), dtype=torch.float64, device=base.device)
        graph = torch.cuda.CUDAGraph()
        with _float32_matmul():
            side = torch.cuda.Stream(base.device)
            side.wait_stream(torch.cuda.current_stream(base.device))
            with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, workspaces
                grouped_knn(base, static, k, size, roundoff=F32_ROUNDOFF)
            torch.cuda.current_stream(base.device).wait_stream(side)
            # thread_local: the writer thread may allocate on the device while this one captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = grouped_knn(base, static, k, size, roundoff=F32_ROUNDOFF)
        return _Captured(graph, static, out)


@contextmanager
def _float32_matmul() -> Iterator[None]:
    """TF32 off for a capture, then the process's settings back."""
    tf32, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)
