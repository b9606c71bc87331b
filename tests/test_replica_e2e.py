"""The replica against a real `zmem serve`: its answers equal the service's (the same
client without a replica) for the same buffer, through ring wraps, DELETE and
re-create, an import, `sigma: "auto"`, min_size, a `kill -9`, and concurrent workers."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from zmem_client import ReplicaError, ReplicaLagWarning, RequestRejected, ZMemClient

from .server import Server

pytestmark = pytest.mark.e2e
D = 8


def record(mem: ZMemClient, rng: np.random.Generator, n: int) -> None:
    z = rng.standard_normal((n, D)).astype(np.float32)
    soft, cone, lam = rng.uniform(0.01, 1, (3, n))
    for i in range(n):
        mem.record(z[i], soft_bind=soft[i], cone_vol=cone[i], lambda_bind=lam[i])


def answer(mem: ZMemClient, q: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    qq = q.detach().clone().requires_grad_(True)
    risk, size = mem.risk_and_size(qq, record=False, **kw)
    if risk.requires_grad:
        risk.sum().backward()
    grad = qq.grad if qq.grad is not None else torch.zeros_like(qq)
    return risk.detach(), grad, size


def assert_agree(service: ZMemClient, replica: ZMemClient, q: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Value and gradient within 1e-6 relative, the same size and neighbours."""
    want, want_grad, want_size = answer(service, q, **kw)
    got, got_grad, got_size = answer(replica, q, **kw)
    assert got_size == want_size
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-12)
    nb_want, nb_got = service.neighbors(q.numpy(), **kw), replica.neighbors(q.numpy(), **kw)
    for key in ("seq", "d2", "risk_target", "z"):
        np.testing.assert_array_equal(nb_got[key], nb_want[key], err_msg=key)
    assert (nb_got["k"], nb_got["active"], nb_got["sigma"]) == (
        nb_want["k"],
        nb_want["active"],
        nb_want["sigma"],
    )
    return got


def assert_mirror(replica: ZMemClient, export: dict[str, np.ndarray]) -> None:
    assert replica.replica is not None
    got = replica.replica.export()
    np.testing.assert_array_equal(got["seq"], export["seq"])
    np.testing.assert_array_equal(got["z"], export["z"])
    np.testing.assert_array_equal(got["risk_target"], export["risk_target"])


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", "--capacity", "300", "--min-size", "20", "--k", "16").start()
    yield s
    s.stop()


@pytest.fixture
def clients(srv: Server) -> Iterator[Callable[..., tuple[ZMemClient, ZMemClient]]]:
    made: list[ZMemClient] = []

    def make(memory: str = "default", **kw: Any) -> tuple[ZMemClient, ZMemClient]:
        service = ZMemClient(srv.url, memory=memory)
        kw.setdefault("max_lag", 120.0)
        replica = ZMemClient(srv.url, memory=memory, replica=True, **kw)
        made.extend((service, replica))
        return service, replica

    yield make
    for mem in made:
        mem.close()


def sync(service: ZMemClient, replica: ZMemClient) -> None:
    service.flush()
    assert replica.replica is not None
    replica.replica.sync()


def test_agrees_through_wraps_min_size_and_sigma_auto(clients: Callable[..., Any]) -> None:
    rng = np.random.default_rng(0)
    service, replica = clients()
    q = torch.from_numpy(rng.standard_normal((5, D)))  # float64 queries: gradients at full precision
    assert answer(replica, q)[2] == 0  # a memory nobody wrote to: empty, risk 0
    record(service, rng, 10)  # below min_size: exactly 0 on both
    sync(service, replica)
    got = assert_agree(service, replica, q)
    assert torch.equal(got, torch.zeros(5, dtype=q.dtype))
    assert_agree(service, replica, q, sigma="auto")
    for n in (15, 100, 250, 301, 40, 700):  # crosses min_size, then wraps the 300-row ring many times
        record(service, rng, n)
        sync(service, replica)
        assert_agree(service, replica, q)
        assert_agree(service, replica, q, sigma="auto")
        assert_agree(service, replica, q.float(), k=64, sigma=0.5)
        assert_agree(service, replica, q[:1], k=1000)  # k clipped to the size
        assert_mirror(replica, service.export())
    assert replica.replica_lag is not None and replica.replica_lag.seqs == 0


def test_agrees_after_delete_recreate_and_import(srv: Server, clients: Callable[..., Any]) -> None:
    rng = np.random.default_rng(1)
    service, replica = clients("m")
    q = torch.from_numpy(rng.standard_normal((4, D)))
    record(service, rng, 200)
    sync(service, replica)
    assert_agree(service, replica, q)
    assert replica.replica is not None
    before = replica.replica.state.generation

    assert httpx.delete(srv.url + "/memories/m").status_code == 204
    replica.replica.sync()
    assert answer(replica, q)[2] == 0
    service.configure(z_dim=D, capacity=120, min_size=5, k=8, sigma="auto")
    record(service, rng, 150)
    sync(service, replica)
    assert replica.replica.state.generation != before
    assert_agree(service, replica, q)
    assert_mirror(replica, service.export())

    # An import: another memory's export loaded into a fresh "m".
    other, _ = clients("other")
    other.configure(z_dim=D, capacity=120, min_size=5, k=8, sigma="auto")
    record(other, rng, 130)
    other.flush()
    npz = httpx.get(srv.url + "/memories/other/export").content
    assert httpx.delete(srv.url + "/memories/m").status_code == 204
    assert httpx.post(srv.url + "/memories/m/import", content=npz).status_code in (200, 201)
    replica.replica.sync()
    assert_agree(service, replica, q)
    assert_mirror(replica, service.export())
    record(service, rng, 50)  # and it follows what comes after the import
    sync(service, replica)
    assert_agree(service, replica, q)


def test_survives_kill_9_and_catches_up(srv: Server, clients: Callable[..., Any]) -> None:
    rng = np.random.default_rng(2)
    service, replica = clients(max_lag=0.5)
    q = torch.from_numpy(rng.standard_normal((3, D)))
    record(service, rng, 250)
    sync(service, replica)
    before = assert_agree(service, replica, q)

    srv.kill()
    deadline = time.monotonic() + 30
    lag = replica.replica_lag
    while lag is None or lag.seconds <= 0.5:  # waits for the lag to pass max_lag, not a timing assertion
        assert time.monotonic() < deadline
        time.sleep(0.02)
        lag = replica.replica_lag
    with pytest.warns(ReplicaLagWarning, match="not been caught up"):
        during, _, size = answer(replica, q)
    torch.testing.assert_close(during, before)  # answers from its last state while the service is down
    assert size == 250
    later = replica.replica_lag
    assert later is not None and later.seconds > lag.seconds  # the lag grows

    srv.restart()
    record(service, rng, 120)
    sync(service, replica)
    assert replica.replica_lag is not None and replica.replica_lag.seqs == 0
    assert_agree(service, replica, q)
    assert_mirror(replica, service.export())


def worker(mem: ZMemClient, rank: int, barrier: Any, out: Any) -> None:
    rng = np.random.default_rng(100 + rank)
    try:
        for _ in range(20):
            record(mem, rng, 25)
            q = torch.from_numpy(rng.standard_normal((2, D))).float().requires_grad_(True)
            risk = mem.risk(q).sum()  # concurrent queries (and their records) while others write
            if risk.requires_grad:  # below min_size the risk is a constant 0
                risk.backward()
        mem.flush()
        barrier.wait(120)  # every worker's episodes are acknowledged
        assert mem.replica is not None
        mem.replica.sync(60)
        out.put((rank, mem.replica.export()))
    except BaseException as e:
        out.put((rank, repr(e)))
        raise
    finally:
        mem.close()


def test_four_workers_replicas_equal_the_export(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", "--capacity", "1500", "--min-size", "50").start()
    try:
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(4), ctx.Queue()
        # Each process unpickles the client and builds its own replica (and connections).
        mem = ZMemClient(srv.url, replica=True, max_lag=300.0)
        copy = pickle.loads(pickle.dumps(mem))
        assert copy._args["replica"] is True and copy.replica is not None
        copy.close()
        procs = [ctx.Process(target=worker, args=(mem, r, barrier, out)) for r in range(4)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(60)
        export = mem.export()
        mem.close()
        assert len(export["seq"]) == 1500  # 2,000 episodes went into a 1,500-row ring
        for rank in range(4):
            assert not isinstance(results[rank], str), results[rank]
            for key in ("seq", "z", "risk_target"):
                np.testing.assert_array_equal(results[rank][key], export[key], err_msg=f"{rank} {key}")
    finally:
        srv.stop()


def test_sigma_auto_never_known_raises_through_an_outage(srv: Server, clients: Callable[..., Any]) -> None:
    """A replica that had never asked for "auto" raised once when asked during
    an outage, then answered with σ = 1.0; it raises until the service can tell it the value."""
    rng = np.random.default_rng(3)
    service, replica = clients()
    q = torch.from_numpy(rng.standard_normal((3, D)))
    record(service, rng, 250)
    sync(service, replica)
    assert_agree(service, replica, q)  # the memory's sigma is a number: "auto" was never sent

    srv.kill()
    for attempt in range(4):
        with pytest.raises(ReplicaError, match='sigma "auto" has no known value'):
            answer(replica, q, sigma="auto")
        with pytest.raises(ReplicaError, match='sigma "auto" has no known value'):
            replica.neighbors(q.numpy(), sigma="auto")
        if attempt == 1:
            time.sleep(1.1)  # the next call asks the service again
    answer(replica, q)  # a numeric sigma answers from the last state

    srv.restart()
    deadline = time.monotonic() + 30
    while True:
        try:
            answer(replica, q, sigma="auto")
            break
        except ReplicaError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert_agree(service, replica, q, sigma="auto")


def test_new_generation_with_another_z_dim(srv: Server, clients: Callable[..., Any]) -> None:
    """After a re-create with another z_dim the replica follows the new memory,
    and a query of the old width is the 422 the service answers, not a ValueError."""
    rng = np.random.default_rng(4)
    service, replica = clients("m")
    record(service, rng, 100)
    sync(service, replica)
    q8 = torch.from_numpy(rng.standard_normal((2, D)))
    assert_agree(service, replica, q8)

    assert httpx.delete(srv.url + "/memories/m").status_code == 204
    with ZMemClient(srv.url, memory="m") as writer:  # `service` keeps the z_dim it wrote with
        writer.configure(z_dim=4, capacity=120, min_size=5, k=8)
        for row in rng.standard_normal((60, 4)).astype(np.float32):
            writer.record(row, soft_bind=0.5, cone_vol=0.3, lambda_bind=0.1)
        sync(writer, replica)
    assert replica.replica is not None and replica.replica.state.z_dim == 4
    q4 = torch.from_numpy(rng.standard_normal((2, 4)))
    assert_agree(service, replica, q4)
    assert_mirror(replica, service.export())
    for mem in (service, replica):
        with pytest.raises(RequestRejected, match="z has 8 dimensions") as caught:
            answer(mem, q8)
        assert caught.value.status == 422
        with pytest.raises(RequestRejected, match="z has 8 dimensions"):
            mem.neighbors(q8.numpy())
