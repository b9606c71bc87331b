"""REINFORCE on Gymnasium's CartPole-v1: four workers, one shared policy, zmem's memory term.

    zmem serve --durability none &                 # or any service: --url http://host:8000
    pip install gymnasium                          # and tensorboard, for --log-dir
    python examples/cartpole.py [--workers 4] [--episodes 300] [--w-mem 0.05] [--log-dir runs/cartpole]

The workers share one policy in shared memory and update it without locks (Hogwild, as in
A3C): its encoder maps a state to a 12-dimensional latent z, its head maps z to the action.
Sharing the encoder is what makes the memory meaningful: with one encoder per worker, each
worker's z's live in a space of their own, and "neighbours" would mean "episodes of the same
worker" (`diagnostics()` says so when it sees it).

Each episode is recorded with z = the mean latent of its states, soft_bind = return / 500,
cone_vol = 1 + the spread of its latents, lambda_bind = the policy's mean entropy. Each update
adds `Regularizer(mem, w_mem, warmup)` on the latents of the episode's states to the policy-
gradient loss: z is pushed away from neighbourhoods of short episodes. The Regularizer
measures both forces on z (`force_ratio()`: the w_mem at which the memory pulls as hard as
the task); every `--every` episodes each worker prints its mean return, the memory's risk
and that ratio, and writes them to TensorBoard with `log_to` when `--log-dir` is given.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from zmem_client import Regularizer, ZMemClient, log_to

Z_DIM = 12


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, Z_DIM), nn.Tanh())
        self.head = nn.Linear(Z_DIM, 2)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.distributions.Categorical]:
        z = self.encoder(obs)
        return z, torch.distributions.Categorical(logits=self.head(z))


def returns(rewards: list[float], gamma: float = 0.99) -> torch.Tensor:
    out, g = [], 0.0
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    ret = torch.tensor(out[::-1])
    return (ret - ret.mean()) / (ret.std() + 1e-8) if len(ret) > 1 else ret * 0


def tensorboard(log_dir: str | None, rank: int) -> Any:
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("--log-dir needs tensorboard (pip install tensorboard); printing only")
        return None
    return SummaryWriter(os.path.join(log_dir, f"worker{rank}"))


def worker(rank: int, policy: Policy, mem: ZMemClient, args: argparse.Namespace) -> list[float]:
    torch.manual_seed(args.seed + rank)
    torch.set_num_threads(1)
    env = gym.make("CartPole-v1")
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)  # steps the shared parameters
    reg = Regularizer(mem, w_mem=args.w_mem, warmup=args.warmup)
    writer = tensorboard(args.log_dir, rank)
    done_returns: list[float] = []
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 * rank + episode)
        states, actions, rewards = [], [], []
        with torch.no_grad():
            while True:
                state = torch.as_tensor(obs, dtype=torch.float32)
                _, dist = policy(state)
                action = int(dist.sample())
                states.append(state)
                actions.append(action)
                obs, reward, terminated, truncated, _ = env.step(action)
                rewards.append(float(reward))
                if terminated or truncated:
                    break
        z, dist = policy(torch.stack(states))  # the episode again, with gradients: z [T, 12]
        task = -(dist.log_prob(torch.tensor(actions)) * returns(rewards)).mean()
        loss = task + reg(z)  # the memory term on every state's latent
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = sum(rewards)
        done_returns.append(total)
        mem.record(
            z.detach().mean(dim=0),
            soft_bind=min(1.0, total / 500.0),
            cone_vol=1.0 + float(z.detach().std(dim=0).mean()) if len(z) > 1 else 1.0,
            lambda_bind=float(dist.entropy().detach().mean()),
            worker=f"worker{rank}",
        )
        if (episode + 1) % args.every == 0 or episode + 1 == args.episodes:
            scalars = log_to(writer, episode, reg=reg) if writer is not None else {}
            if writer is not None:
                writer.add_scalar("cartpole/return", float(np.mean(done_returns[-args.every :])), episode)
            ratio = reg.force_ratio()
            print(
                f"worker {rank} episode {episode + 1:4d}: return {np.mean(done_returns[-args.every :]):6.1f}"
                f"  mem_risk {reg.history['mem_risk'][-1]:+.3f}  memory n {reg.history['mem_n'][-1]:5d}"
                f"  w_mem {reg.history['w_mem'][-1]:.3f}"
                f"  force ratio {'-' if ratio is None else f'{ratio:.2f}'}"
                + (f"  ({len(scalars)} scalars to TensorBoard)" if scalars else "")
                + "\n",
                end="",  # one write per line, so the workers' lines never interleave
                flush=True,
            )
    mem.flush()
    if writer is not None:
        writer.close()
    return done_returns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("ZMEM_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--memory", default="cartpole")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=300, help="per worker")
    ap.add_argument("--w-mem", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50, help="updates over which w_mem ramps up from 0")
    ap.add_argument("--min-size", type=int, default=200, help="episodes before the memory term starts")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--every", type=int, default=25, help="print (and log) every so many episodes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", default=None, help="TensorBoard logs (needs tensorboard)")
    args = ap.parse_args()
    mem = ZMemClient(args.url, memory=args.memory)
    mem.configure(z_dim=Z_DIM, min_size=args.min_size)
    policy = Policy()
    policy.share_memory()  # one policy, updated by every worker
    started = time.monotonic()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.starmap(worker, [(rank, policy, mem, args) for rank in range(args.workers)])
    late = [np.mean(r[-max(1, len(r) // 5) :]) for r in results]
    print(
        f"{args.workers} workers × {args.episodes} episodes in {time.monotonic() - started:.0f}s;"
        f" mean return over each worker's last fifth: {', '.join(f'{x:.0f}' for x in late)}"
    )
    for criterion in mem.diagnostics().get("criteria", []):
        print(f"  {criterion['name']}: {criterion.get('reading', '')}")


if __name__ == "__main__":
    main()
