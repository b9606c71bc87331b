"""The torch index (`zmem_service.torch_index`) against float64 numpy brute force, on CPU tensors
here and on CUDA where a device is present: the `Index` contract as a memory drives it (reserve,
write, search over a wrapping ring), exact answers with ties by the lower seq."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from zmem_core.knn_graphs import GraphedSearch
from zmem_service import torch_index
from zmem_service.errors import InsufficientStorage
from zmem_service.torch_index import TorchEngine, TorchIndex, auto_engine_reason, cuda_engine

from .knn_oracle import brute_force, check_same_knn

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


class RingModel:
    """A FIFO ring of `capacity` slots written round-robin, as a memory drives its index."""

    def __init__(self, index: TorchIndex, capacity: int, grow: int = 64) -> None:
        self.index, self.capacity, self.grow = index, capacity, grow
        self.z = np.zeros((capacity, index.z_dim), np.float32)
        self.seq = np.zeros(capacity, np.int64)
        self.next_slot = self.next_seq = 0
        self.size = 0

    def append(self, z: np.ndarray) -> None:
        n = len(z)
        room = min(self.capacity, max(self.size + n, 2 * self.index.bytes_after(0) // self.index.row_bytes()))
        self.index.reserve(max(room, min(self.capacity, self.grow)))
        slots = (self.next_slot + np.arange(n)) % self.capacity
        seq = self.next_seq + np.arange(n, dtype=np.int64)
        self.z[slots], self.seq[slots] = z, seq
        self.index.write(slots, z, seq)
        self.next_slot = (self.next_slot + n) % self.capacity
        self.next_seq += n
        self.size = min(self.capacity, self.size + n)

    def check(self, zq: np.ndarray, k: int, *, exact: bool = True) -> None:
        k = min(k, self.size)  # the caller clips k to the size
        d2, slots = self.index.search(zq, k, self.size)
        assert d2.dtype == np.float32 and slots.dtype == np.int64 and d2.shape == (len(zq), k)
        ref_d2, ref_slots = brute_force(self.z[: self.size], self.seq[: self.size], zq, k)
        check_same_knn(ref_d2, ref_slots, d2, slots, exact=exact)


def make_index(device: str, z_dim: int) -> TorchIndex:
    return TorchEngine(device, "test").new_index(z_dim)


DATA: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "normal": lambda rng, n, d: rng.normal(size=(n, d)),
    "integer": lambda rng, n, d: rng.integers(-2, 3, size=(n, d)),
    "far-from-origin": lambda rng, n, d: 1000 + 0.01 * rng.normal(size=(n, d)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize(("capacity", "d", "k"), [(300, 3, 10), (2000, 32, 64), (50, 8, 64)])
def test_a_wrapping_ring_matches_brute_force(data: str, capacity: int, d: int, k: int, device: str) -> None:
    """Batches of assorted sizes wrap the ring several times; after each, queries (some on stored
    points) equal brute force over the ring's contents, ties by seq (integer data ties a lot)."""
    rng = np.random.default_rng(capacity + d)
    ring = RingModel(make_index(device, d), capacity)
    for n in (1, 7, capacity // 2, capacity, 3, capacity + 5, 2 * capacity // 3):
        z = DATA[data](rng, n, d).astype(np.float32)
        ring.append(z[-capacity:] if n > capacity else z)
        zq = DATA[data](rng, 9, d).astype(np.float32)
        zq[0] = ring.z[0]
        for kk in (1, k, ring.size):
            ring.check(zq, kk)


@pytest.mark.parametrize("device", DEVICES)
def test_identical_rows_give_the_oldest_rows(device: str) -> None:
    """Every z equal, the ring wrapped: the answer is the k lowest seqs, wherever their slots are."""
    ring = RingModel(make_index(device, 4), 1000)
    z = np.tile(np.array([[1.5, -2.0, 3.0, 0.25]], np.float32), (700, 1))
    ring.append(z)
    ring.append(z)  # 1400 writes: slots 400..999 hold the oldest
    d2, slots = ring.index.search(np.zeros((3, 4), np.float32), 64, ring.size)
    np.testing.assert_array_equal(slots, np.broadcast_to(np.argsort(ring.seq)[:64], (3, 64)))
    assert slots[0, 0] == 400
    np.testing.assert_array_equal(d2, np.float32(1.5**2 + 4 + 9 + 0.25**2))


@pytest.mark.parametrize("device", DEVICES)
def test_the_centre_moves_when_a_write_would_not_centre_exactly(device: str) -> None:
    """First rows far from the origin fix a centre; later rows near the origin (where subtracting it
    is inexact) move the centre to 0 on those coordinates, and answers stay exact throughout."""
    rng = np.random.default_rng(2)
    ring = RingModel(make_index(device, 16), 500)
    ring.append((1000 + 0.01 * rng.normal(size=(200, 16))).astype(np.float32))
    zq = (1000 + 0.01 * rng.normal(size=(5, 16))).astype(np.float32)
    ring.check(zq, 20)
    near = (1000 + 0.01 * rng.normal(size=(100, 16))).astype(np.float32)
    near[:, :4] = rng.normal(size=(100, 4))  # first four coordinates near 0: exact only with centre 0
    ring.append(near)
    ring.check(zq, 20)
    ring.check(near[:5] + np.float32(0.001), 20)
    assert ring.index._center is not None
    assert (ring.index._center[:4] == 0).all() and (ring.index._center[4:] != 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_reserve_grows_and_keeps_rows(device: str) -> None:
    index = make_index(device, 8)
    assert index.nbytes == 0 and index.bytes_after(100) == 100 * (4 * 8 + 12)
    index.reserve(10)
    z = np.arange(80, dtype=np.float32).reshape(10, 8)
    index.write(np.arange(10), z, np.arange(10) + 100)
    index.search(z[:1], 1, 10)  # applies the write
    index.reserve(5)  # never shrinks
    assert index.nbytes == 10 * 44
    index.reserve(1000)
    assert index.nbytes == index.bytes_after(0) == 1000 * 44 and index.bytes_after(10) == 1000 * 44
    d2, slots = index.search(z, 10, 10)
    np.testing.assert_array_equal(slots[:, 0], np.arange(10))
    assert (d2[:, 0] == 0).all()
    index.clear()
    assert index.nbytes == 0


def test_writes_wait_for_the_next_search() -> None:
    """`write` only queues (the index thread applies); a search sees every write made before it."""
    index = make_index("cpu", 2)
    index.reserve(4)
    index.write(np.arange(2), np.array([[0, 0], [5, 5]], np.float32), np.array([1, 2]))
    assert (index._base.x == 0).all()  # nothing on the device yet
    index.write(np.array([0]), np.array([[9, 9]], np.float32), np.array([3]))  # overwrites slot 0
    d2, slots = index.search(np.zeros((1, 2), np.float32), 2, 2)
    np.testing.assert_array_equal(slots, [[1, 0]])
    np.testing.assert_array_equal(d2, [[50, 162]])


def test_out_of_device_memory_is_insufficient_storage_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = make_index("cpu", 4)
    index.reserve(8)
    index.write(np.arange(3), np.eye(3, 4, dtype=np.float32), np.arange(3))
    real_zeros = torch.zeros

    def zeros(*args: object, **kw: object) -> torch.Tensor:
        if kw.get("dtype") == torch.int64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_zeros(*args, **kw)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(InsufficientStorage, match="no room for 1000000 rows of z_dim 4"):
        index.reserve(1_000_000)
    monkeypatch.undo()
    assert index.nbytes == 8 * 28
    _, slots = index.search(np.eye(3, 4, dtype=np.float32), 1, 3)
    np.testing.assert_array_equal(slots[:, 0], [0, 1, 2])


def test_other_errors_from_reserve_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    index = make_index("cpu", 4)

    def zeros(*args: object, **kw: object) -> torch.Tensor:
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(RuntimeError, match="something else"):
        index.reserve(10)


def test_a_cpu_engine() -> None:
    engine = TorchEngine("cpu", "because")
    assert engine.name == "torch-cpu" and engine.reason == "because"
    assert engine.device_bytes() is None
    index = engine.new_index(3)
    assert index.name == "torch-cpu" and index.nbytes == 0
    engine.warm_up()


class FakeFaissGpu:
    """faiss-gpu's knn_gpu, by torch brute force (float32 GEMM like the real one), counting calls."""

    calls = 0

    class StandardGpuResources:
        pass

    def knn_gpu(self, res: object, xq: torch.Tensor, xb: torch.Tensor, k: int, device: int) -> tuple:
        assert isinstance(res, self.StandardGpuResources) and device == 0
        self.calls += 1
        d2 = (xq * xq).sum(1, keepdim=True) + (xb * xb).sum(1) - 2 * xq @ xb.T
        return d2.topk(k, dim=1, largest=False)


def test_faiss_gpu_candidates_are_re_ranked_exactly() -> None:
    """The faiss-gpu path's plumbing (its candidates, the same re-rank and rescue), with knn_gpu
    faked on CPU tensors: identical rows still go to the lowest seqs."""
    fake = FakeFaissGpu()
    engine = TorchEngine("cpu", "test", faiss=None)
    from zmem_service.torch_index import FaissGpuCandidates

    engine._candidates = FaissGpuCandidates(fake, 0)
    rng = np.random.default_rng(0)
    for data in ("normal", "integer", "far-from-origin"):
        ring = RingModel(engine.new_index(8), 3000)
        ring.append(DATA[data](rng, 2500, 8).astype(np.float32))
        ring.append(DATA[data](rng, 1000, 8).astype(np.float32))
        ring.check(DATA[data](rng, 20, 8).astype(np.float32), 64)
    assert fake.calls == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_engine_says_why() -> None:
    with pytest.raises(RuntimeError, match=r"--device cuda:1: torch .* sees no usable CUDA device"):
        cuda_engine("cuda:1")
    device, why = auto_engine_reason()
    assert device is None and "no usable CUDA device" in why


@CUDA
def test_cuda_engine() -> None:
    engine = cuda_engine("cuda")
    assert engine.name in ("torch-cuda:0", "faiss-gpu:0")
    assert (engine.device_bytes() or 0) > 2**30
    assert "cuda:0" in engine.reason
    device, why = auto_engine_reason()
    assert device == "cuda:0" and why
    with pytest.raises(RuntimeError, match="CUDA device"):
        cuda_engine(f"cuda:{torch.cuda.device_count()}")
    engine.warm_up()


@CUDA
def test_cuda_out_of_memory_is_insufficient_storage() -> None:
    index = cuda_engine("cuda").new_index(4096)
    index.reserve(16)
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(InsufficientStorage):
        index.reserve(2 * free // (4 * 4096))
    assert index.nbytes == 16 * index.row_bytes()


def test_duplicate_heavy_memories_take_no_full_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each distinct z written 200 times: tie groups longer than the candidate margin leave rows
    uncertified, and the threshold pass answers them exactly; not one full scan (counted)."""
    from zmem_core import knn_torch

    calls: list[int] = []
    real = knn_torch.full_scan

    def counted(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(knn_torch, "full_scan", counted)
    passes: list[int] = []
    real_pass = torch_index.rescue_uncertified

    def threshold_pass(*args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        passes.append(len(args[5]))  # type: ignore[arg-type]
        return real_pass(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch_index, "rescue_uncertified", threshold_pass)
    rng = np.random.default_rng(7)
    distinct = rng.integers(-3, 4, size=(100, 6)).astype(np.float32)
    ring = RingModel(make_index("cpu", 6), 20_000)
    ring.append(distinct[rng.permutation(np.arange(20_000) % 100)])
    zq = distinct[:5] + rng.integers(-1, 2, size=(5, 6)).astype(np.float32)
    for k in (1, 10, 64):
        ring.check(zq, k)
    assert calls == [] and sum(passes) > 0


def test_a_large_batch_is_searched_in_parts() -> None:
    """More query rows than one device search takes: parts of `QUERY_ROWS`, one answer, exact."""
    rng = np.random.default_rng(8)
    ring = RingModel(make_index("cpu", 5), 3000)
    ring.append(rng.integers(-2, 3, size=(3000, 5)).astype(np.float32))
    ring.check(rng.integers(-2, 3, size=(2 * torch_index.QUERY_ROWS + 3, 5)).astype(np.float32), 10)


def test_cuda_graphs_on_a_cpu_index_fall_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    """`--cuda-graphs on` with CPU tensors tries no capture (there is nothing to capture); a
    capture forced there fails, and the index says why once and answers eagerly, exactly."""
    engine = TorchEngine("cpu", "test", cuda_graphs=True)
    ring = RingModel(engine.new_index(4), 500)
    assert not ring.index._graphs.graphed and ring.index._graphs.failed is None
    ring.index._graphs = GraphedSearch(enabled=True)  # force a capture on CPU tensors
    rng = np.random.default_rng(9)
    ring.append(rng.integers(-2, 3, size=(400, 4)).astype(np.float32))
    with caplog.at_level("WARNING", logger="zmem.knn"):
        for _ in range(3):
            ring.check(rng.integers(-2, 3, size=(5, 4)).astype(np.float32), 10)
    assert ring.index._graphs.failed and not ring.index._graphs.graphed
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1
