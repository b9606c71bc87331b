"""`ZMemClient.risk` against the seed's `memory_risk`: value and gradient, over a real socket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zmem_client import ZMemClient, kernel_risk

from .seed_reference import SeedMemory, random_episodes
from .server import Server

N, D = 3000, 16


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory):
    """A real server holding N random episodes, and the seed's memory holding the same."""
    srv = Server(tmp_path_factory.mktemp("risk") / "data").start()  # seed defaults
    data = random_episodes(N, D, scale=0.45)
    seed = SeedMemory()
    with ZMemClient(srv.url) as mem:
        for i in range(N):
            fields = {f: float(data[f][i]) for f in ("soft_bind", "cone_vol", "lambda_bind")}
            mem.record(data["z"][i], **fields)
            seed.append(torch.from_numpy(data["z"][i]).unsqueeze(0), **fields)
        mem.flush(timeout=60)
    yield srv, seed
    srv.stop()


def queries(n: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(random_episodes(n, D, seed=seed, scale=0.45)["z"])


@pytest.mark.e2e
def test_risk_equals_seed_value_and_gradient(filled) -> None:
    srv, seed = filled
    weight_sums = []
    with ZMemClient(srv.url) as mem:
        for q in queries(20):
            z1 = q.unsqueeze(0).clone().requires_grad_(True)
            z2 = z1.detach().clone().requires_grad_(True)
            ours, ref = mem.risk(z1), seed.memory_risk(z2)
            assert ours.shape == ref.shape == torch.Size([])
            ours.backward()
            ref.backward()
            assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
            rel = (z1.grad - z2.grad).norm() / z2.grad.norm()
            assert rel < 1e-4, rel
            d2 = torch.sum((torch.stack([m["z"] for m in seed.mem]) - z2.detach()) ** 2, -1)
            weight_sums.append(torch.exp(-torch.topk(d2, 64, largest=False).values / 2).sum().item())
    median = float(np.median(weight_sums))
    print(f"median sum of kernel weights over the 64 neighbours: {median:.3f}")
    assert median > 1e-3  # the kernel does not underflow: the comparison means something


@pytest.mark.e2e
def test_batch_equals_row_by_row(filled) -> None:
    srv, _ = filled
    z = queries(8, seed=2).requires_grad_(True)
    with ZMemClient(srv.url) as mem:
        batch = mem.risk(z)
        rows = torch.stack([mem.risk(z[i : i + 1]) for i in range(8)])
        assert batch.shape == (8,)
        torch.testing.assert_close(batch, rows, rtol=1e-6, atol=0)
        assert mem.risk(z[:1], squeeze=False).shape == (1,)
        assert mem.risk(z[0]).shape == ()


@pytest.mark.e2e
def test_risk_is_zero_below_min_size(tmp_path) -> None:
    srv = Server(tmp_path / "data", "--min-size", "50").start()
    try:
        with ZMemClient(srv.url) as mem:
            for z in np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 12]:
                mem.record(z, soft_bind=0.1, cone_vol=1.0, lambda_bind=2.0)
            mem.flush(timeout=30)
            z = torch.zeros(1, 4, requires_grad=True)
            risk = mem.risk(z)
            assert risk.item() == 0.0 and risk.shape == ()
            risk.backward()
            assert (z.grad == 0).all()
            mem.record(np.ones(4, np.float32), soft_bind=0.1, cone_vol=1.0, lambda_bind=2.0)
            mem.record(np.ones(4, np.float32), soft_bind=0.1, cone_vol=1.0, lambda_bind=2.0)
            mem.flush(timeout=30)
            assert mem.risk(z).item() != 0.0
    finally:
        srv.stop()


def test_kernel_risk_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    nz = torch.randn(3, 7, 5, dtype=torch.float64, generator=g) * 0.5 + z.detach().unsqueeze(1)
    rt = torch.randn(3, 7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda q: kernel_risk(q, nz, rt, 0.8), (z,))
    assert torch.autograd.gradgradcheck(lambda q: kernel_risk(q, nz, rt, 0.8), (z,))


def test_kernel_risk_with_no_neighbours_is_zero() -> None:
    z = torch.zeros(2, 3, requires_grad=True)
    risk = kernel_risk(z, torch.zeros(2, 0, 3), torch.zeros(2, 0), 1.0)
    assert risk.tolist() == [0.0, 0.0]
