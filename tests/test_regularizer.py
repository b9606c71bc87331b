"""`Regularizer`: the warm-up ramp, and the two forces on z measured in the user's own loop
(‖∇_z task‖ and ‖∇_z risk‖, split from z's one gradient), against gradients computed apart."""

from __future__ import annotations

import httpx
import pytest
import torch

from zmem_client import Regularizer, ZMemClient

from .test_client import spread_neighbors_answer


@pytest.fixture
def mem() -> ZMemClient:
    client = ZMemClient("http://zmem.test", transport=httpx.MockTransport(spread_neighbors_answer))
    yield client
    client.close()


def test_the_forces_are_the_task_s_and_the_memory_s(mem: ZMemClient) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 8)
    reg = Regularizer(mem, w_mem=3.0)
    target = torch.randn(8)
    for step in range(3):
        x = torch.randn(4, 5)
        z = encoder(x)  # not a leaf: the hook sits on the encoder's output
        task = ((z - target) ** 2).sum()
        loss = task + reg(z)
        encoder.zero_grad()
        loss.backward()
        zz = encoder(x).detach().requires_grad_(True)
        (task_grad,) = torch.autograd.grad(((zz - target) ** 2).sum(), zz)
        (risk_grad,) = torch.autograd.grad(mem.risk(zz).mean(), zz)
        assert reg.history["task_force"][step] == pytest.approx(float(task_grad.norm()), rel=1e-5)
        assert reg.history["risk_force"][step] == pytest.approx(float(risk_grad.norm()), rel=1e-5)
    ratio = reg.force_ratio()
    assert ratio == pytest.approx(sum(reg.history["task_force"]) / sum(reg.history["risk_force"]))
    assert ratio is not None and ratio > 0


def test_warm_up_ramps_w_mem_from_zero(mem: ZMemClient) -> None:
    reg = Regularizer(mem, w_mem=2.0, warmup=4)
    for _ in range(6):
        reg(torch.zeros(1, 8, requires_grad=True)).backward()
    assert reg.history["w_mem"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert reg.history["mem_loss"][0] == 0.0 and reg.history["mem_loss"][-1] > 0


def test_nothing_is_measured_without_a_gradient_to_split(mem: ZMemClient) -> None:
    reg = Regularizer(mem, w_mem=1.0)
    assert reg.force_ratio() is None
    with torch.no_grad():
        reg(torch.zeros(2, 8))
    reg(torch.zeros(2, 8))  # z requires no grad
    assert reg.history["task_force"] == [] and reg.force_ratio() is None
    off = Regularizer(mem, w_mem=1.0, measure=False)
    off(torch.zeros(1, 8, requires_grad=True)).backward()
    assert off.history["risk_force"] == []
    with pytest.raises(ValueError, match="warmup"):
        Regularizer(mem, warmup=-1)
