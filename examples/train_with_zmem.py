"""Train a small Gaussian policy with the zmem memory regularizer (the seed's §3).

Start a service first (`zmem serve --durability none`), then run this file (another
service: `ZMEM_URL=http://host:8000 python train_with_zmem.py`). Each worker
process gets the pickled client (it reconnects on its own), records its episodes and adds
`w_mem · risk(z)` to its loss, so z is pushed away from neighbourhoods that went badly.
`zmem demo` runs the same loop at several w_mem values and writes a report.

Expect each worker to print where its policy mean ended along the reliable axis: the task
alone pulls it to the unreliable side (negative); the memory term pushes back, and how far
it gets in 200 steps depends on W_MEM (the demo's table shows the trend over longer runs).
"""

from __future__ import annotations

import multiprocessing
import os

import torch

from zmem_client import ZMemClient

W_MEM = 2.0  # the design's 0.02 is too weak at this scale: see `zmem demo` and the README
CENTRE = torch.tensor([6.0, 0, 0, 0, 0, 0, 0, 0])
RELIABLE = torch.tensor([0.0, 0, 1, 0, 0, 0, 0, 0])  # binding succeeds on this side of the centre


def worker(mem: ZMemClient, seed: int, steps: int = 200) -> None:
    torch.manual_seed(seed)
    mu = torch.nn.Parameter(CENTRE.clone())  # the policy's mean; its spread is fixed here
    opt = torch.optim.SGD([mu], lr=0.05)
    for _ in range(steps):
        z = mu + 0.4 * torch.randn(8)  # sample a latent for this episode
        side = (z - CENTRE) @ RELIABLE
        task_loss = 0.5 * ((z - CENTRE) ** 2).sum() + 0.15 * side  # the task leans to the bad side
        loss = task_loss + W_MEM * mem.risk(z)  # 0 until the memory holds min_size episodes
        opt.zero_grad()
        loss.backward()
        opt.step()
        soft_bind = float(torch.sigmoid(3 * side.detach()))  # the episode's outcome
        mem.record(z.detach(), soft_bind=soft_bind, cone_vol=1.0 - 0.5 * soft_bind, lambda_bind=1 - soft_bind)
    mem.flush()
    line = f"worker {seed}: policy mean is {float((mu - CENTRE) @ RELIABLE):+.2f} along the reliable axis\n"
    print(line, end="", flush=True)  # one write, so the workers' lines never interleave


if __name__ == "__main__":
    mem = ZMemClient(os.environ.get("ZMEM_URL", "http://127.0.0.1:8000"), memory="example")
    mem.configure(z_dim=8, min_size=200)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.starmap(worker, [(mem, seed) for seed in range(3)])
    print(mem.diagnostics()["criteria"][3]["reading"])
