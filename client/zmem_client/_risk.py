"""The differentiable part: the seed's Gaussian-kernel risk, and a loss-term module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zmem_core.kernel import GUARD

if TYPE_CHECKING:
    from ._client import ZMemClient


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel runs in for z of `dtype`: float16/bfloat16 (e.g. under autocast)
    are promoted to float32, as the seed's float32 arithmetic; float32/float64 stay."""
    return torch.promote_types(dtype, torch.float32)


def kernel_risk(
    z: torch.Tensor, neighbor_z: torch.Tensor, risk_target: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Kernel-weighted risk of the neighbourhood of each query.

    z [..., d]; neighbor_z [..., k, d]; risk_target [..., k]; returns [...]. With
    d2_i = ‖neighbor_z_i − z‖², w_i = exp(−d2_i / 2σ²), w = w / (Σw + 1e-8):
    risk = Σ w_i · risk_target_i (the risk of `zmem_core.kernel.kernel_stats`, with its
    GUARD). Gradients flow to `z` (and to whatever else requires them); k = 0 gives 0.
    """
    d2 = ((neighbor_z - z.unsqueeze(-2)) ** 2).sum(dim=-1)
    w = torch.exp(-d2 / (2.0 * float(sigma) ** 2))
    w = w / (w.sum(dim=-1, keepdim=True) + GUARD)
    return (w * risk_target).sum(dim=-1)


class Regularizer(torch.nn.Module):
    """`w_mem · mean(risk(z))` as a loss term, logging the seed's `history` lists.

    `history["mem_loss"]`, `["mem_risk"]` (mean risk of the batch) and `["mem_n"]`
    (memory size at the query) grow by one entry per call.
    """

    def __init__(self, mem: ZMemClient, w_mem: float = 0.02) -> None:
        super().__init__()
        self.mem = mem
        self.w_mem = float(w_mem)
        self.history: dict[str, list[float]] = {"mem_loss": [], "mem_risk": [], "mem_n": []}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        risk, size = self.mem.risk_and_size(z)
        mem_risk = risk.mean()
        loss = self.w_mem * mem_risk
        self.history["mem_loss"].append(float(loss.detach()))
        self.history["mem_risk"].append(float(mem_risk.detach()))
        self.history["mem_n"].append(size)
        return loss
