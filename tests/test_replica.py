"""The client's replica against a fake changes feed: an in-memory FIFO model served
through httpx.MockTransport, so these tests need no service. Each answer is checked
against an oracle: float64 brute force over the model's rows, ties by the lower seq,
then the client's `kernel_risk` (value and gradient)."""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

from zmem_client import Lag, NoSuchMemory, Timeout, ZMemClient, kernel_risk
from zmem_client._replica import Replica, ReplicaError, ReplicaLagWarning, query_stats
from zmem_core.kernel import kernel_stats

from .replica_client import ReplicaClient

D = 4


class FakeMemory:
    def __init__(self, capacity: int, min_size: int, k: int = 8, sigma: float | str = 1.0) -> None:
        self.generation = uuid.uuid4().hex
        self.settings = {
            "z_dim": D,
            "capacity": capacity,
            "min_size": min_size,
            "k": k,
            "sigma": sigma,
            "risk": {"a": 1.0, "b": 0.2, "c": 0.05, "eps": 1e-8},
        }
        self.rows: collections.deque[tuple[int, np.ndarray, float]] = collections.deque(maxlen=capacity)
        self.next_seq = 1

    @property
    def active(self) -> bool:
        return len(self.rows) > 0 and len(self.rows) >= self.settings["min_size"]

    def sigma_auto(self) -> float:
        # Any deterministic function of the buffer will do: the replica must pass it through.
        return 0.5 + 0.001 * len(self.rows) + 0.0001 * self.next_seq


class FakeFeed:
    """The changes feed (and `POST …/queries`) of an in-memory FIFO model."""

    def __init__(self, page_rows: int = 10_000) -> None:
        self.memories: dict[str, FakeMemory] = {}
        self.page_rows = page_rows
        self.down = False
        self.cond = threading.Condition()
        self.queries: list[dict[str, np.ndarray]] = []
        self.requests = 0
        self.transport = httpx.MockTransport(self.handle)

    def create(self, name: str = "default", **kw: Any) -> FakeMemory:
        with self.cond:
            mem = self.memories[name] = FakeMemory(**kw)
            self.cond.notify_all()
        return mem

    def delete(self, name: str = "default") -> None:
        with self.cond:
            del self.memories[name]
            self.cond.notify_all()

    def append(
        self, z: np.ndarray, rt: np.ndarray, name: str = "default", seq: np.ndarray | None = None
    ) -> None:
        with self.cond:
            mem = self.memories[name]
            for i in range(len(z)):
                s = int(seq[i]) if seq is not None else mem.next_seq
                mem.rows.append((s, z[i].astype(np.float32), float(np.float32(rt[i]))))
                mem.next_seq = s + 1
            self.cond.notify_all()

    def arrays(self, name: str = "default") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = list(self.memories[name].rows)
        return (
            np.array([r[1] for r in rows], np.float32).reshape(-1, D),
            np.array([r[2] for r in rows], np.float32),
            np.array([r[0] for r in rows], np.int64),
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.down:
            raise httpx.ConnectError("connection refused")
        path = request.url.path
        name = path.split("/")[2] if path.startswith("/memories/") else "default"
        if path.endswith("/queries"):
            self.queries.append(safetensors.numpy.load(request.content))
            return httpx.Response(200, json={"recorded": 1})
        assert path.endswith("/changes") and request.method == "GET"
        q = request.url.params
        after, limit, wait = int(q.get("after", 0)), int(q.get("limit", 10_000)), float(q.get("wait", 0))
        generation = q.get("generation")
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                mem = self.memories.get(name)
                if mem is None:
                    problem = {
                        "type": "https://zmem.dev/problems/not-found",
                        "status": 404,
                        "title": "Not found",
                    }
                    return httpx.Response(404, json=problem)
                held = list(mem.rows)
                oldest = held[0][0] if held else None
                reset = (generation is not None and generation != mem.generation) or (
                    oldest is not None and after < oldest - 1
                )
                page = held if reset else [r for r in held if r[0] > after]
                page = page[: min(limit, self.page_rows)]
                left = deadline - time.monotonic()
                if page or reset or left <= 0:
                    break
                self.cond.wait(left)
                if self.down:
                    raise httpx.ReadError("connection reset")
            complete = not page or page[-1][0] == mem.next_seq - 1
            meta = {
                "generation": mem.generation,
                "reset": reset,
                "next_seq": mem.next_seq,
                "oldest_seq": oldest,
                "size": len(held),
                "last_seq": page[-1][0] if page else None,
                "settings": mem.settings,
                "sigma_auto": mem.sigma_auto() if complete and mem.active else None,
                "complete": complete,
            }
            arrays = {
                "z": np.array([r[1] for r in page], np.float32).reshape(-1, D),
                "risk_target": np.array([r[2] for r in page], np.float32),
                "seq": np.array([r[0] for r in page], np.int64),
            }
        body = safetensors.numpy.save(arrays, metadata={k: json.dumps(v) for k, v in meta.items()})
        return httpx.Response(200, content=body, headers={"content-type": "application/x-safetensors"})


def oracle(feed: FakeFeed, q: torch.Tensor, k: int, sigma: float, name: str = "default") -> dict[str, Any]:
    """Brute force in float64, ties by the lower seq; risk and its gradient via kernel_risk."""
    z, rt, seq = feed.arrays(name)
    qn = q.detach().numpy().astype(np.float32).astype(np.float64)
    d2 = ((qn[:, None, :] - z[None].astype(np.float64)) ** 2).sum(-1)
    idx = np.stack([np.lexsort((seq, row))[:k] for row in d2])
    qq = q.detach().clone().requires_grad_(True)
    risk = kernel_risk(qq, torch.from_numpy(z[idx]).to(q.dtype), torch.from_numpy(rt[idx]).to(q.dtype), sigma)
    risk.sum().backward()
    assert qq.grad is not None
    return {"risk": risk.detach(), "grad": qq.grad, "seq": seq[idx], "d2": np.take_along_axis(d2, idx, 1)}


def replica_answer(rep: Replica, q: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    qq = q.detach().clone().requires_grad_(True)
    risk, size = rep.risk_and_size(qq, **kw)
    risk.sum().backward()
    assert qq.grad is not None
    return risk.detach(), qq.grad, size


def assert_agrees(
    rep: Replica, feed: FakeFeed, q: torch.Tensor, want_k: int, want_sigma: float, **kw: Any
) -> None:
    want = oracle(feed, q, want_k, want_sigma)
    risk, grad, size = replica_answer(rep, q, **kw)
    assert size == len(feed.memories["default"].rows)
    torch.testing.assert_close(risk, want["risk"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, want["grad"], rtol=1e-6, atol=1e-9)
    nb = rep.neighbors(q.detach().numpy(), **kw)
    np.testing.assert_array_equal(nb["seq"], want["seq"])


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


@pytest.fixture
def feed() -> FakeFeed:
    return FakeFeed()


@pytest.fixture
def make_replica(feed: FakeFeed) -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(prefix: str = "/", **kw: Any) -> Replica:
        kw.setdefault("poll_wait", 0.5)
        kw.setdefault("timeout", 5.0)
        rep = ReplicaClient("http://zmem.test", prefix, transport=feed.transport, **kw)
        made.append(rep)
        return rep

    yield make
    for rep in made:
        rep.close()


def rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n, D)).astype(np.float32), rng.uniform(-1, 1, n).astype(np.float32)


def test_mirrors_the_fifo_across_wraps(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    rng = np.random.default_rng(0)
    feed.create(capacity=50, min_size=5)
    feed.append(*rows(rng, 30))
    rep = make_replica()
    q = torch.from_numpy(rng.standard_normal((3, D))).double()
    assert_agrees(rep, feed, q, 8, 1.0)  # the first risk() waits for the first sync
    for n in (7, 13, 50, 120, 1, 49):  # partial pages, exactly one ring, several rings at once
        feed.append(*rows(rng, n))
        rep.sync()
        assert_agrees(rep, feed, q, 8, 1.0)
        assert_agrees(rep, feed, q.float(), 50, 0.7, k=100, sigma=0.7)  # k clipped to the size
        got = rep.export()
        z, rt, seq = feed.arrays()
        np.testing.assert_array_equal(got["seq"], seq)
        np.testing.assert_array_equal(got["z"], z)
        np.testing.assert_array_equal(got["risk_target"], rt)
    assert rep.lag().seqs == 0


def test_half_precision_z_gets_the_float32_kernel(
    feed: FakeFeed, make_replica: Callable[..., Replica]
) -> None:
    """As on the network path: bfloat16 z is computed in float32, rounded only at the end."""
    rng = np.random.default_rng(4)
    feed.create(capacity=200, min_size=5)
    feed.append(*rows(rng, 150))
    rep = make_replica()
    q = torch.from_numpy(rng.standard_normal((3, D))).to(torch.bfloat16)
    risk, grad, _ = replica_answer(rep, q, k=16, sigma=0.8)
    want = oracle(feed, q.float(), 16, 0.8)
    assert risk.dtype == grad.dtype == torch.bfloat16
    assert torch.equal(risk, want["risk"].to(torch.bfloat16))
    assert torch.equal(grad, want["grad"].to(torch.bfloat16))


def test_pages_are_published_only_when_complete(make_replica: Callable[..., Replica]) -> None:
    feed = FakeFeed(page_rows=7)
    rng = np.random.default_rng(1)
    feed.create(capacity=100, min_size=1)
    feed.append(*rows(rng, 95))
    rep = ReplicaClient("http://zmem.test", "/", transport=feed.transport, poll_wait=0.5)
    try:
        q = torch.from_numpy(rng.standard_normal((2, D)))
        assert_agrees(rep, feed, q, 8, 1.0)  # 14 pages, first answer from all of them
        assert rep.pages >= 14
        feed.append(*rows(rng, 30))
        rep.sync()
        assert_agrees(rep, feed, q, 8, 1.0)
    finally:
        rep.close()


def test_ties_break_by_lower_seq(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    feed.create(capacity=20, min_size=1, k=3)
    same = np.ones((20, D), np.float32)
    feed.append(same, np.arange(20, dtype=np.float32))
    feed.append(same[:5], np.full(5, 7.0, np.float32))  # wraps: the lowest seqs are now at the end of a ring
    rep = make_replica()
    q = torch.ones(1, D)
    nb = rep.neighbors(q.numpy())
    np.testing.assert_array_equal(nb["seq"], [[6, 7, 8]])
    assert_agrees(rep, feed, q, 3, 1.0)


def test_below_min_size_risk_is_exactly_zero(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    rng = np.random.default_rng(2)
    feed.create(capacity=100, min_size=10, sigma="auto")
    feed.append(*rows(rng, 9))
    rep = make_replica()
    q = torch.from_numpy(rng.standard_normal((2, D))).requires_grad_(True)
    risk, size = rep.risk_and_size(q)
    assert size == 9 and torch.equal(risk, torch.zeros(2, dtype=q.dtype))  # a constant, as the service path
    nb = rep.neighbors(q.detach().numpy())
    assert nb["k"] == 0 and nb["z"].shape == (2, 0, D) and nb["active"] is False and nb["sigma"] == 1.0
    feed.append(*rows(rng, 1))
    rep.sync()
    mem = feed.memories["default"]
    assert_agrees(rep, feed, q.detach(), 8, mem.sigma_auto())


def test_sigma_auto_is_the_feeds(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    rng = np.random.default_rng(3)
    feed.create(capacity=100, min_size=5, sigma="auto")
    feed.append(*rows(rng, 60))
    rep = make_replica()
    q = torch.from_numpy(rng.standard_normal((4, D)))
    assert_agrees(rep, feed, q, 8, feed.memories["default"].sigma_auto())
    assert rep.neighbors(q.numpy())["sigma"] == feed.memories["default"].sigma_auto()
    assert_agrees(rep, feed, q, 8, 2.0, sigma=2.0)  # a number overrides the setting
    feed.append(*rows(rng, 70))
    rep.sync()
    assert_agrees(rep, feed, q, 8, feed.memories["default"].sigma_auto())


def test_new_generation_starts_over(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    rng = np.random.default_rng(4)
    feed.create(capacity=50, min_size=1)
    feed.append(*rows(rng, 40))
    rep = make_replica()
    q = torch.from_numpy(rng.standard_normal((2, D)))
    assert_agrees(rep, feed, q, 8, 1.0)
    feed.delete()
    feed.create(capacity=30, min_size=1)  # re-created: a new generation, seqs from 1 again
    feed.append(*rows(rng, 12))
    rep.sync()
    assert_agrees(rep, feed, q, 8, 1.0)
    assert rep.resets == 1
    # An import: same settings, new generation, seqs kept from elsewhere (with gaps).
    old = feed.memories["default"]
    feed.create(capacity=30, min_size=1)
    z, rt = rows(rng, 10)
    feed.append(z, rt, seq=np.arange(1000, 1020, 2))
    assert feed.memories["default"].generation != old.generation
    rep.sync()
    assert_agrees(rep, feed, q, 8, 1.0)
    assert rep.state.next_seq == 1019


def test_missing_memory_is_empty_and_inactive(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    """As from the service: risk() is 0 and neighbors() raises NoSuchMemory until the first write."""
    rep = make_replica("/memories/later/")
    q = torch.ones(1, D, requires_grad=True)
    risk, size = rep.risk_and_size(q)
    assert size == 0 and float(risk.detach()) == 0.0
    with pytest.raises(NoSuchMemory):
        rep.neighbors(q.detach().numpy()[0])
    rng = np.random.default_rng(5)
    feed.create("later", capacity=10, min_size=2)
    feed.append(*rows(rng, 5), name="later")
    rep.sync()
    assert rep.risk_and_size(q)[1] == 5
    feed.delete("later")
    rep.sync()
    assert rep.risk_and_size(q)[1] == 0


def test_outage_keeps_answering_then_catches_up_over_an_eviction_gap(
    feed: FakeFeed, make_replica: Callable[..., Replica]
) -> None:
    rng = np.random.default_rng(6)
    feed.create(capacity=40, min_size=1)
    feed.append(*rows(rng, 40))
    rep = make_replica(max_lag=0.05)
    q = torch.from_numpy(rng.standard_normal((2, D)))
    assert_agrees(rep, feed, q, 8, 1.0)
    before, _, _ = replica_answer(rep, q)
    feed.down = True
    with feed.cond:
        feed.cond.notify_all()  # end the long poll in flight
    feed.append(*rows(rng, 100))  # more than a ring while the replica cannot see it
    wait_for(lambda: rep.lag().seconds > 0.05)
    first = rep.lag().seconds
    with pytest.warns(ReplicaLagWarning, match="not been caught up"):
        during, _, _ = replica_answer(rep, q)
    torch.testing.assert_close(during, before)  # the last state, no network
    replica_answer(rep, q)  # warned once: no second warning (warnings are errors here)
    wait_for(lambda: rep.lag().seconds > first)
    assert rep.feed_errors > 0
    feed.down = False
    rep.sync()
    assert rep.resets == 1  # rows after its seq were evicted: the feed said reset
    assert_agrees(rep, feed, q, 8, 1.0)
    assert rep.lag().seqs == 0


def test_strict_raises_when_stale(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    feed.create(capacity=10, min_size=1)
    feed.append(*rows(np.random.default_rng(7), 10))
    rep = make_replica(max_lag=0.05, strict=True)
    rep.sync()
    rep.risk_and_size(torch.ones(D))
    feed.down = True
    with feed.cond:
        feed.cond.notify_all()
    wait_for(lambda: rep.lag().seconds > 0.05)
    with pytest.raises(ReplicaError, match="max_lag"):
        rep.risk_and_size(torch.ones(D))


def test_first_risk_times_out_when_the_service_is_away(
    feed: FakeFeed, make_replica: Callable[..., Replica]
) -> None:
    feed.down = True
    rep = make_replica(timeout=0.2)
    with pytest.raises(Timeout, match="reachable"):
        rep.risk_and_size(torch.ones(D))


def test_memory_cap_is_a_clear_error(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    feed.create(capacity=1000, min_size=1)
    feed.append(*rows(np.random.default_rng(8), 500))
    rep = make_replica(max_bytes=10_000)
    with pytest.raises(ReplicaError, match="replica_max_bytes=10000"):
        rep.risk_and_size(torch.ones(D))


def test_query_records_are_posted_in_batches_and_dropped_when_down(
    feed: FakeFeed, make_replica: Callable[..., Replica]
) -> None:
    rng = np.random.default_rng(9)
    feed.create(capacity=100, min_size=1)
    feed.append(*rows(rng, 100))
    rep = make_replica()
    q = torch.from_numpy(rng.standard_normal((3, D))).float()
    risks = [rep.risk_and_size(q)[0] for _ in range(5)]
    rep.risk_and_size(q, record=False)
    assert rep.flush_records(10)
    got = {key: np.concatenate([b[key] for b in feed.queries]) for key in ("risk", "wsum", "n_eff")}
    assert len(got["risk"]) == 15 and rep.records_sent == 15
    np.testing.assert_allclose(got["risk"], torch.cat(risks).double().numpy(), rtol=1e-5)
    nb = rep.neighbors(q.numpy())
    # the numbers the service records for the same neighbours (`zmem_core.kernel`)
    _, wsum, n_eff = kernel_stats(nb["d2"], nb["risk_target"], 1.0)
    np.testing.assert_allclose(got["wsum"][:3], wsum, rtol=1e-12)
    np.testing.assert_allclose(got["n_eff"][:3], n_eff, rtol=1e-12)
    feed.down = True
    rep.risk_and_size(q)
    assert rep.flush_records(10)
    assert rep.records_dropped == 3


def test_query_stats_underflow() -> None:
    d2 = torch.full((1, 4), 1e6)
    stats = query_stats([(d2, torch.ones(1, 4), 1.0, None)])
    assert stats["wsum"][0] == 0 and stats["risk"][0] == 0 and stats["n_eff"][0] == 0


def test_client_routes_to_the_replica_and_pickles_the_setting(feed: FakeFeed) -> None:
    import pickle

    rng = np.random.default_rng(10)
    feed.create(capacity=100, min_size=1)
    feed.append(*rows(rng, 50))
    with ZMemClient("http://zmem.test", transport=feed.transport, replica=True, max_lag=60.0) as mem:
        assert mem.replica is not None
        mem.replica.sync()
        q = torch.from_numpy(rng.standard_normal((1, D)))
        want = oracle(feed, q, 8, 1.0)
        risk = mem.risk(q)
        assert risk.shape == () and torch.isclose(risk, want["risk"][0])
        assert mem.neighbors(q.numpy()[0])["seq"].tolist() == want["seq"][0].tolist()
        assert mem.replica_lag is not None and mem.replica_lag.seqs == 0
        args = pickle.loads(pickle.dumps(mem))._args
        assert args["replica"] is True and args["max_lag"] == 60.0
    with ZMemClient("http://zmem.test", transport=feed.transport) as plain:
        assert plain.replica is None and plain.replica_lag is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_risk_path_never_synchronises(feed: FakeFeed, make_replica: Callable[..., Replica]) -> None:
    rng = np.random.default_rng(11)
    feed.create(capacity=5000, min_size=10, k=64, sigma="auto")
    feed.append(*rows(rng, 3000))
    rep = make_replica(device="cuda")
    rep.sync()
    q = torch.from_numpy(rng.standard_normal((8, D))).float()
    want = oracle(feed, q.double(), 64, feed.memories["default"].sigma_auto())
    zq = q.cuda().requires_grad_(True)
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # "a prototype feature" (it is: we rely on it only as a check)
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            feed.append(*rows(rng, 100))  # the feed thread writes while the risk path runs
            zq.grad = None
            risk, _ = rep.risk_and_size(zq)
            risk.sum().backward()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("default")
    rep.sync()
    want = oracle(feed, q, 64, feed.memories["default"].sigma_auto())
    zq.grad = None
    risk, _ = rep.risk_and_size(zq)
    risk.sum().backward()
    torch.testing.assert_close(risk.cpu(), want["risk"], rtol=1e-5, atol=1e-7)
    assert zq.grad is not None
    torch.testing.assert_close(zq.grad.cpu(), want["grad"], rtol=1e-5, atol=1e-7)
    assert rep.flush_records(10)


def test_a_replica_follows_nothing_until_its_first_query(feed: FakeFeed) -> None:
    """A client made only to be pickled into workers (the parent's) never opens the feed."""
    rng = np.random.default_rng(12)
    feed.create(capacity=50, min_size=5)
    feed.append(*rows(rng, 20))
    with ZMemClient("http://zmem.test", transport=feed.transport, replica=True) as mem:
        assert mem.replica is not None and not mem.replica.started
        time.sleep(0.2)
        assert feed.requests == 0 and mem.replica_lag == Lag(0.0, 0)
        mem.risk(torch.zeros(D))
        assert mem.replica.started and feed.requests > 0


def test_flush_delivers_the_replica_s_query_records(feed: FakeFeed) -> None:
    rng = np.random.default_rng(13)
    feed.create(capacity=50, min_size=5)
    feed.append(*rows(rng, 20))
    with ZMemClient("http://zmem.test", transport=feed.transport, replica=True) as mem:
        for _ in range(3):
            mem.risk(torch.from_numpy(rng.standard_normal((2, D))).float())
        mem.risk(torch.zeros(D), record=False)
        mem.flush(timeout=10)
        assert sum(len(q["risk"]) for q in feed.queries) == 6
