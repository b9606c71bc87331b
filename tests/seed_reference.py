"""The seed's in-process memory (seed §1–§2), transcribed as the oracle for the tests.

Only the container changes: `mem` is a deque of dicts held by this object instead
of an Actor. The formulas and defaults are the seed's, line for line.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class SeedMemory:
    def __init__(
        self, mem_size: int = 50_000, mem_min: int = 500, mem_k: int = 64, mem_sigma: float = 1.0
    ) -> None:
        self.mem_size = mem_size
        self.mem_min = mem_min
        self.mem_k = mem_k
        self.mem_sigma = mem_sigma
        self.mem: deque[dict] = deque(maxlen=self.mem_size)

    def append(self, z: torch.Tensor, soft_bind: float, cone_vol: float, lambda_bind: float) -> None:
        with torch.no_grad():
            self.mem.append(
                {
                    "z": z.detach().cpu().squeeze(0),
                    "soft_bind": float(soft_bind),
                    "cone_vol": float(cone_vol),
                    "lambda_bind": float(lambda_bind),
                }
            )

    def _mem_tensors(self, device):
        zs = torch.stack([m["z"] for m in self.mem], dim=0).to(device)  # [N,z_dim]
        soft = torch.tensor([m["soft_bind"] for m in self.mem], device=device)
        cone = torch.tensor([m["cone_vol"] for m in self.mem], device=device)
        lam = torch.tensor([m["lambda_bind"] for m in self.mem], device=device)
        return zs, soft, cone, lam

    def _mem_risk_targets(self, soft, cone, lam):
        eps = 1e-8
        a, b, c = 1.0, 0.2, 0.05
        return a * (1.0 - soft) + b * torch.log(cone + eps) + c * lam

    def memory_risk(self, z: torch.Tensor) -> torch.Tensor:
        if len(self.mem) < self.mem_min:
            return torch.tensor(0.0, device=z.device)
        Z, soft, cone, lam = self._mem_tensors(z.device)
        r = self._mem_risk_targets(soft, cone, lam)
        zq = z.squeeze(0)
        d2 = torch.sum((Z - zq) ** 2, dim=-1)
        k = min(self.mem_k, d2.numel())
        vals, idx = torch.topk(d2, k=k, largest=False)
        d2_k = vals
        r_k = r[idx]
        sigma2 = float(self.mem_sigma) ** 2
        w = torch.exp(-d2_k / (2.0 * sigma2))
        w = w / (w.sum() + 1e-8)
        return torch.sum(w * r_k)


def random_episodes(n: int, d: int, seed: int = 0, scale: float = 0.25) -> dict[str, np.ndarray]:
    """Episodes whose z's sit close together (scale per coordinate), so kernels don't underflow."""
    rng = np.random.default_rng(seed)
    return {
        "z": (rng.standard_normal((n, d)) * scale).astype(np.float32),
        "soft_bind": rng.uniform(0, 1, n).astype(np.float32),
        "cone_vol": rng.uniform(0, 2, n).astype(np.float32),
        "lambda_bind": rng.uniform(0, 3, n).astype(np.float32),
    }
