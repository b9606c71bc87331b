"""`sigma: "auto"` for one memory: the value over the current window, kept until the window moves.

The schedule and the formula live in `zmem_core.params` (the replica resolves through
them too); this module finds the window's rows in the ring and their (k+1)-th nearest
neighbours inside the window with the memory's index.

Not thread-safe, and it takes no lock: the owning `Memory` calls it with its lock held
and passes its ring, index, settings and next seq; nothing here keeps them.
"""

from __future__ import annotations

import numpy as np

from zmem_core import params
from zmem_core.knn import candidate_count

from .index import Index
from .ring import Ring
from .settings import MemorySettings


class AutoSigma:
    """The kept value of `sigma: "auto"` for one memory, and whether anyone has asked for it."""

    def __init__(self) -> None:
        self._kept: tuple[int, float] | None = None  # (the window's boundary seq, sigma)
        self.asked = False  # someone asked for "auto": the feed sends its value from now on

    def fresh(self, ring: Ring | None, active: bool, next_seq: int, settings: MemorySettings) -> bool:
        """Whether `value` resolves without a search: the memory is inactive (or holds fewer than
        two rows), or the value of the current window is kept."""
        if not active or ring is None or ring.size < 2:
            return True
        return self._kept is not None and self._kept[0] == _window(next_seq, settings)[0]

    def kept(self, ring: Ring | None, active: bool, next_seq: int, settings: MemorySettings) -> float | None:
        """The value `value` would return now if it needs no search, else None (never searches)."""
        if not active or ring is None or ring.size < 2:
            return params.INACTIVE_SIGMA
        if self._kept is not None and self._kept[0] == _window(next_seq, settings)[0]:
            return self._kept[1]
        return None

    def value(
        self, ring: Ring | None, index: Index | None, active: bool, next_seq: int, settings: MemorySettings
    ) -> float:
        """The numeric sigma "auto" stands for now: from the rows of the current window, as
        `zmem_core.params` defines it (searches `index` unless the value is kept)."""
        self.asked = True
        if not active or ring is None or index is None or ring.size < 2:
            return params.INACTIVE_SIGMA
        if self.fresh(ring, active, next_seq, settings):
            assert self._kept is not None
            return self._kept[1]
        boundary, low = _window(next_seq, settings)
        order = ring.order()
        seqs = ring.column("seq")[order]  # ascending: arrival order is seq order
        first, stop = np.searchsorted(seqs, [low, boundary], side="right")
        window = order[first:stop]
        value = (
            window_sigma(ring, index, settings.k, window, low, boundary)
            if len(window) >= 2
            else params.INACTIVE_SIGMA
        )
        self._kept = (boundary, value)
        return value


def _window(next_seq: int, settings: MemorySettings) -> tuple[int, int]:
    """(boundary, low) of the rows "auto" is computed from (`params.auto_sigma_window`)."""
    return params.auto_sigma_window(next_seq - 1, settings.capacity)


def window_sigma(ring: Ring, index: Index, k: int, window: np.ndarray, low: int, boundary: int) -> float:
    """σ over the rows at slots `window` (seqs in (low, boundary]), searching the whole index
    and keeping only neighbours inside the window."""
    size = ring.size
    sample = ring.column("z")[window[params.auto_sigma_sample(len(window))]]
    n = len(sample)
    kk = params.auto_sigma_k(k, len(window))  # the sample row itself comes first
    kth = np.full(n, np.nan)
    todo = np.arange(n)
    want = candidate_count(kk + 1, size)  # the kNN's margin: rows outside the window take places
    seq_of = ring.column("seq")
    while len(todo):
        got = min(want, size)
        d2, slots = index.search(sample[todo], got, size)
        inside = (seq_of[slots] > low) & (seq_of[slots] <= boundary)
        rank = np.cumsum(inside, axis=1)
        found = rank[:, -1] > kk
        col = np.argmax(rank > kk, axis=1)  # the (kk+1)-th neighbour inside the window
        kth[todo[found]] = d2[found, col[found]]
        if got >= size:  # every row searched: the window holds fewer than kk + 1 near rows
            break
        todo, want = todo[~found], want * 2
    return params.sigma_from_kth(kth)
