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
    """`w_mem · mean(risk(z))` as a loss term, logging the seed's `history` lists, and the two
    forces on z so that w_mem can be chosen from measurements.

    `history["mem_loss"]`, `["mem_risk"]` (mean risk of the batch) and `["mem_n"]` (memory
    size at the query) grow by one entry per call. `warmup` (updates): w_mem ramps linearly
    from 0 over the first `warmup` calls (early on every episode is bad, and the memory's
    push is noise); `history["w_mem"]` keeps the weight each call used.

    Forces (`measure=True`, the default, when z requires grad): the memory's gradient on z,
    ∇_z mean(risk), is computed at the call (a backward through the kernel alone: k·d
    work), and a hook on z reads z's whole gradient when your `loss.backward()` reaches it;
    the task's force is the whole minus the memory's part. Per update, `history["task_force"]`
    holds ‖∇_z task‖ and `["risk_force"]` ‖∇_z mean(risk)‖ (unweighted), each the norm over
    the batch. `force_ratio()` is their running ratio: the w_mem at which the memory pulls z
    as hard as the task. Measure again after any change of σ or k: the risk's gradient
    scales with them.
    """

    def __init__(
        self, mem: ZMemClient, w_mem: float = 0.02, *, warmup: int = 0, measure: bool = True
    ) -> None:
        super().__init__()
        if not w_mem >= 0 or warmup < 0:
            raise ValueError(f"w_mem must be >= 0 and warmup >= 0, got {w_mem!r}, {warmup!r}")
        self.mem = mem
        self.w_mem = float(w_mem)
        self.warmup = int(warmup)
        self.measure = measure
        self.calls = 0
        self.history: dict[str, list[float]] = {
            "mem_loss": [],
            "mem_risk": [],
            "mem_n": [],
            "w_mem": [],
            "task_force": [],
            "risk_force": [],
        }

    def weight(self) -> float:
        """The weight the next call uses (w_mem, ramped over the warm-up)."""
        if self.warmup and self.calls < self.warmup:
            return self.w_mem * self.calls / self.warmup
        return self.w_mem

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        self.calls += 1
        risk, size = self.mem.risk_and_size(z)
        mem_risk = risk.mean()
        loss = w * mem_risk
        self.history["mem_loss"].append(float(loss.detach()))
        self.history["mem_risk"].append(float(mem_risk.detach()))
        self.history["mem_n"].append(size)
        self.history["w_mem"].append(w)
        if self.measure and z.requires_grad and mem_risk.requires_grad:
            (risk_grad,) = torch.autograd.grad(mem_risk, z, retain_graph=True)
            self._watch(z, risk_grad.detach(), w)
        return loss

    def _watch(self, z: torch.Tensor, risk_grad: torch.Tensor, w: float) -> None:
        """Split z's whole gradient, when backward reaches it, into the task's and the memory's."""
        handle: torch.utils.hooks.RemovableHandle | None = None

        def split(grad: torch.Tensor) -> None:
            assert handle is not None
            handle.remove()  # once: a graph kept for a second backward measures nothing twice
            task = grad.detach() - w * risk_grad
            self.history["task_force"].append(float(task.norm()))
            self.history["risk_force"].append(float(risk_grad.norm()))

        handle = z.register_hook(split)

    def force_ratio(self, last: int = 100) -> float | None:
        """Mean ‖∇_z task‖ over mean ‖∇_z risk‖ for the last `last` measured updates: the w_mem
        at which both forces on z are equal (None before a measurement, or with no risk force:
        a memory below min_size, or a σ under which every neighbour weighs the same)."""
        task, risk = self.history["task_force"][-last:], self.history["risk_force"][-last:]
        if not task or sum(risk) <= 0:
            return None
        return sum(task) / sum(risk)
