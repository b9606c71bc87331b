"""The same query, read and error tests of `ZMemClient` against each neighbour source.

Sources (the `source` fixture): `remote` (a real `zmem serve` over loopback), `replica`
(the same server, `replica=True`: answers from a local copy following the changes feed)
and `inprocess` (the remote source over the ASGI app in this process, no sockets). Each
test seeds its own memory through `record()` (which always goes to the service), then
checks the source's answers against a float64 brute force with ties by the lower seq and
the seed's kernel (value and gradient); `test_the_sources_answer_alike` compares the
remote and replica answers with each other directly, array for array.

Not run on every source, and why:
- the replica's lag, `strict` and outage behaviour (it answers from its last state while
  the service is away, where the remote source raises): `tests/test_replica*.py`;
- transport faults (timeouts, a dribbling server, retries of the sender): they concern the
  HTTP connection, which only the remote source and the sender have (`tests/test_transport.py`,
  `tests/test_sender.py`, `tests/test_client.py` with a mock transport);
- the replica's own feed faults (malformed pages, byte caps): `tests/test_replica_faults.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from zmem_client import ClientClosed, NoSuchMemory, RequestRejected, ZMemClient, kernel_risk
from zmem_service.settings import ServiceSettings

from .conftest import ready_client
from .knn_oracle import brute_force
from .server import Server

pytestmark = pytest.mark.e2e
SOURCES = ["remote", "replica", "inprocess"]
D = 6
SETTINGS = ("--capacity", "400", "--min-size", "20", "--k", "12")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("congruence") / "data", *SETTINGS).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = ServiceSettings(
        data_dir=tmp_path_factory.mktemp("congruence-app") / "data", capacity=400, min_size=20, k=12
    )
    client = ready_client(settings)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(source: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., ZMemClient]]:
    made: list[ZMemClient] = []

    def new(memory: str | None = None, **kw: Any) -> ZMemClient:
        memory = memory or f"m{uuid.uuid4().hex[:8]}"
        if source == "inprocess":
            app: TestClient = request.getfixturevalue("app")
            mem = ZMemClient("http://testserver", memory=memory, transport=app._transport, **kw)
        else:
            srv: Server = request.getfixturevalue("srv")
            mem = ZMemClient(srv.url, memory=memory, replica=source == "replica", max_lag=120.0, **kw)
        made.append(mem)
        return mem

    yield new
    for mem in made:
        mem.close()


def seed(mem: ZMemClient, n: int, rng: np.random.Generator, *, dup: int = 1) -> dict[str, np.ndarray]:
    """n episodes (each z `dup` times in a row), flushed and, for a replica, mirrored; → the rows."""
    z = np.repeat(rng.standard_normal((-(-n // dup), D)).astype(np.float32), dup, axis=0)[:n]
    soft, cone, lam = rng.uniform(0.05, 1, (3, n))
    for i in range(n):
        mem.record(z[i], soft_bind=soft[i], cone_vol=cone[i], lambda_bind=lam[i])
    mem.flush()
    if mem.replica is not None:
        mem.replica.sync()
    rt = (1.0 * (1 - soft) + 0.2 * np.log(cone + 1e-8) + 0.05 * lam).astype(np.float32)
    return {"z": z, "risk_target": rt, "seq": np.arange(1, n + 1)}


def oracle(rows: dict[str, np.ndarray], q: np.ndarray, k: int, sigma: float) -> dict[str, Any]:
    d2, idx = brute_force(rows["z"], rows["seq"], q, k)
    qq = torch.from_numpy(q.astype(np.float64)).requires_grad_(True)
    nz = torch.from_numpy(rows["z"][idx].astype(np.float64))
    risk = kernel_risk(qq, nz, torch.from_numpy(rows["risk_target"][idx].astype(np.float64)), sigma)
    risk.sum().backward()
    assert qq.grad is not None
    return {"seq": rows["seq"][idx], "d2": d2, "risk": risk.detach().numpy(), "grad": qq.grad.numpy()}


def risk_and_grad(mem: ZMemClient, q: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray, int]:
    qq = torch.from_numpy(q.astype(np.float64)).requires_grad_(True)
    risk, size = mem.risk_and_size(qq, record=False, **kw)
    if risk.requires_grad:
        risk.sum().backward()
    grad = qq.grad if qq.grad is not None else torch.zeros_like(qq)
    return risk.detach().numpy(), grad.numpy(), size


# -- queries ------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 7])
def test_risk_and_its_gradient_are_the_seeds(make: Callable[..., ZMemClient], b: int) -> None:
    rng = np.random.default_rng(b)
    mem = make()
    rows = seed(mem, 150, rng)
    q = rng.standard_normal((b, D)).astype(np.float32)
    want = oracle(rows, q, 12, 1.0)
    risk, grad, size = risk_and_grad(mem, q)
    assert size == 150
    np.testing.assert_allclose(risk, want["risk"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grad, want["grad"], rtol=1e-4, atol=1e-9)


def test_k_and_sigma_asked_per_call(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(2)
    mem = make()
    rows = seed(mem, 120, rng)
    q = rng.standard_normal((3, D)).astype(np.float32)
    for k, sigma in ((1, 0.3), (5, 2.0), (120, 1.0), (500, 0.7)):
        want = oracle(rows, q, min(k, 120), sigma)
        risk, grad, _ = risk_and_grad(mem, q, k=k, sigma=sigma)
        np.testing.assert_allclose(risk, want["risk"], rtol=1e-5, atol=1e-9, err_msg=f"k={k}")
        np.testing.assert_allclose(grad, want["grad"], rtol=1e-4, atol=1e-9, err_msg=f"k={k}")
        nb = mem.neighbors(q, k=k, sigma=sigma)
        assert nb["k"] == min(k, 120) and nb["sigma"] == sigma
        np.testing.assert_array_equal(nb["seq"], want["seq"])


def test_neighbors_are_the_brute_forces_with_ties_by_the_lower_seq(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(3)
    mem = make()
    rows = seed(mem, 200, rng, dup=5)  # groups of five equal z's: ties everywhere
    q = np.concatenate([rows["z"][[0, 50, 100]], rng.standard_normal((2, D)).astype(np.float32)])
    want = oracle(rows, q, 12, 1.0)
    nb = mem.neighbors(q)
    np.testing.assert_array_equal(nb["seq"], want["seq"])
    np.testing.assert_allclose(nb["d2"], want["d2"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(nb["z"], rows["z"][want["seq"] - 1])
    np.testing.assert_allclose(nb["risk_target"], rows["risk_target"][want["seq"] - 1], rtol=1e-5)
    one = mem.neighbors(q[0])  # a 1-D z drops the B axis
    assert one["z"].shape == (12, D) and (one["seq"] == want["seq"][0]).all()
    assert (nb["size"], nb["active"], nb["k"], nb["sigma"]) == (200, True, 12, 1.0)


def test_sigma_auto_is_the_services_value(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(4)
    mem = make()
    seed(mem, 100, rng)
    q = rng.standard_normal((2, D)).astype(np.float32)
    nb = mem.neighbors(q, sigma="auto")
    assert 0 < nb["sigma"] != 1.0
    risk, _, _ = risk_and_grad(mem, q, sigma="auto")
    rows = {"z": nb["z"].reshape(-1, D), "risk_target": nb["risk_target"].reshape(-1)}
    want = kernel_risk(
        torch.from_numpy(q.astype(np.float64)),
        torch.from_numpy(nb["z"].astype(np.float64)),
        torch.from_numpy(nb["risk_target"].astype(np.float64)),
        nb["sigma"],
    )
    assert rows["z"].shape[0] == 2 * 12
    np.testing.assert_allclose(risk, want.numpy(), rtol=1e-5)


def test_shapes_dtypes_and_inputs(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(5)
    mem = make()
    seed(mem, 60, rng)
    q = rng.standard_normal(D).astype(np.float32)
    assert mem.risk(torch.from_numpy(q)).shape == ()
    assert mem.risk(torch.from_numpy(q[None])).shape == ()
    assert mem.risk(torch.from_numpy(q[None]), squeeze=False).shape == (1,)
    assert mem.risk(torch.from_numpy(np.stack([q, q]))).shape == (2,)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert mem.risk(torch.from_numpy(q).to(dtype)).dtype == dtype
    base = float(mem.risk(torch.from_numpy(q)))
    assert float(mem.risk(q)) == base and float(mem.risk(q.tolist())) == base


def test_below_min_size_the_risk_is_exactly_zero(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(6)
    mem = make()
    seed(mem, 10, rng)  # min_size 20
    q = torch.from_numpy(rng.standard_normal((2, D)).astype(np.float32)).requires_grad_(True)
    risk, size = mem.risk_and_size(q)
    assert size == 10 and risk.tolist() == [0.0, 0.0]
    risk.sum().backward()  # a zero that still takes part in the loss
    assert q.grad is not None and q.grad.abs().sum() == 0
    nb = mem.neighbors(q.detach().numpy())
    assert (nb["k"], nb["active"], nb["z"].shape) == (0, False, (2, 0, D))


def test_a_memory_nobody_wrote_to(make: Callable[..., ZMemClient]) -> None:
    mem = make()
    q = torch.zeros(2, D, requires_grad=True)
    risk, size = mem.risk_and_size(q)
    assert size == 0 and risk.tolist() == [0.0, 0.0]
    risk.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() == 0
    with pytest.raises(NoSuchMemory):
        mem.neighbors(np.zeros(D, np.float32))


def test_recorded_queries_reach_the_diagnostics_by_flush(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(7)
    mem = make()
    seed(mem, 50, rng)
    before = mem.stats().get("recorded_queries", 0)
    for _ in range(5):
        mem.risk(torch.from_numpy(rng.standard_normal((2, D)).astype(np.float32)))
    mem.risk(torch.zeros(D), record=False)
    mem.flush(timeout=30)
    assert mem.stats().get("recorded_queries", 0) - before == 10


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": 10**9}, "k"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": "sharp"}, "sigma"),
        ({"z": np.zeros(D + 1, np.float32)}, "z"),
    ],
)
def test_a_refused_query_is_a_422_naming_the_field(
    make: Callable[..., ZMemClient], kw: dict[str, Any], field: str
) -> None:
    rng = np.random.default_rng(8)
    mem = make()
    seed(mem, 40, rng)
    kw = dict(kw)  # the parameter is shared by every source's run
    z = kw.pop("z", np.zeros(D, np.float32))
    for call in (lambda: mem.neighbors(z, **kw), lambda: mem.risk(torch.from_numpy(z), **kw)):
        with pytest.raises(RequestRejected) as info:
            call()
        assert info.value.status == 422
        assert field in str(info.value.problem), info.value.problem


def test_bad_shapes_and_closed_clients(make: Callable[..., ZMemClient]) -> None:
    mem = make()
    with pytest.raises(ValueError, match="shape"):
        mem.risk(torch.zeros(2, 2, D))
    with pytest.raises(ValueError, match="shape"):
        mem.neighbors(np.zeros((2, 2, D), np.float32))
    mem.close()
    for call in (lambda: mem.risk(torch.zeros(D)), lambda: mem.neighbors(np.zeros(D, np.float32)), mem.stats):
        with pytest.raises(ClientClosed):
            call()


# -- reads --------------------------------------------------------------------------------


def test_reads(make: Callable[..., ZMemClient]) -> None:
    rng = np.random.default_rng(9)
    mem = make()
    with pytest.raises(NoSuchMemory):
        mem.stats()
    rows = seed(mem, 80, rng)
    assert mem.stats()["size"] == 80
    export = mem.export()
    np.testing.assert_array_equal(export["z"], rows["z"])
    zs, soft, cone, lam = mem.extract()
    assert zs.shape == (80, D) and soft.shape == cone.shape == lam.shape == (80,)
    assert mem.map_png()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "criteria" in mem.diagnostics() or mem.diagnostics()


# -- the two sources side by side -------------------------------------------------------------


def test_the_sources_answer_alike(srv: Server) -> None:
    """One memory, asked through both sources: every array of every answer equal."""
    rng = np.random.default_rng(10)
    memory = f"m{uuid.uuid4().hex[:8]}"
    with (
        ZMemClient(srv.url, memory=memory) as remote,
        ZMemClient(srv.url, memory=memory, replica=True, max_lag=120.0) as replica,
    ):
        seed(remote, 400, rng, dup=2)
        seed(remote, 130, rng)  # the ring wraps
        assert replica.replica is not None
        replica.replica.sync()
        q = rng.standard_normal((9, D)).astype(np.float32)
        for kw in ({}, {"k": 3}, {"sigma": 0.5}, {"sigma": "auto"}, {"k": 400}):
            a, b = remote.neighbors(q, **kw), replica.neighbors(q, **kw)
            for key in ("seq", "d2", "z", "risk_target"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} {kw}")
            assert {key: a[key] for key in ("size", "active", "k", "sigma")} == {
                key: b[key] for key in ("size", "active", "k", "sigma")
            }
            ra, ga, _ = risk_and_grad(remote, q, **kw)
            rb, gb, _ = risk_and_grad(replica, q, **kw)
            np.testing.assert_array_equal(ra, rb)
            np.testing.assert_array_equal(ga, gb)
