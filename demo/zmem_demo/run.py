"""The demo's driver: a service, the runs, the report."""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

W_MEM = (0.0, 0.02, 0.2, 2.0, 20.0)
FULL = {"seeds": 3, "episodes": 4800, "min_size": 500}
QUICK = {"seeds": 2, "episodes": 2400, "min_size": 250}
"""2,400 episodes: 160 per worker per fifth with three workers, where a worker's rise must
reach about 16–20% of the risk targets' range for convergence to see it (1,200: 22–28%);
the training is a small part of a quick run's time (about 40 s either way)."""
KERNEL_D = 64


MAX_WORKERS = 64
MAX_W_MEM = 1e4
"""The largest strength the demo runs: 500 times its largest default. Far above it the risk
term's SGD steps throw the policy thousands of units out of the toy's 8-d space, which shows
nothing, and near 1e18 z stops fitting float32."""


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper end when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            within = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {within}, got {value}")
        return value

    return parse


def strength(text: str) -> float:
    """An argparse type: a w_mem, finite and in [0, MAX_W_MEM] (-0 is 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_W_MEM:
        raise argparse.ArgumentTypeError(f"must be a finite number between 0 and {MAX_W_MEM:g}, got {text}")
    return value + 0.0


class Strengths(argparse.Action):
    """Stores the --w-mem values, refusing two that are equal or that would name the same
    memory (`memory_name` keeps 6 significant digits): two runs must not share a memory."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        seen: dict[str, float] = {}
        for w in values:
            name = memory_name(w, 0)
            if name in seen:
                same = "is given twice" if seen[name] == w else f"and {seen[name]!r} name the same memory"
                raise argparse.ArgumentError(self, f"{w!r} {same} ({name}); give each strength once")
            seen[name] = w
        setattr(namespace, self.dest, list(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="zmem-demo", help="report folder to write (default ./zmem-demo)")
    parser.add_argument(
        "--url",
        default=None,
        help="use this running service instead of starting one; the demo deletes and rewrites its "
        "own memories there (demo-w*-s*, demo-kernel-d64, demo-kernel-d64-fixed) and leaves them",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("ZMEM_TOKEN"),
        help="bearer token for --url (write rights) [ZMEM_TOKEN: keeps it out of `ps`]",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer episodes and seeds (about a minute or two)"
    )
    parser.add_argument("--seeds", type=count(1), default=None, help="how many seeds per w_mem (≥ 1)")
    parser.add_argument(
        "--seed-offset",
        type=count(0, 10**6),
        default=0,
        help="the first seed (seeds OFFSET.. OFFSET+SEEDS−1), for repeating the demo on fresh draws",
    )
    parser.add_argument(
        "--episodes", type=count(1), default=None, help="episodes per run (all workers together; ≥ 1)"
    )
    parser.add_argument(
        "--workers",
        type=count(1, MAX_WORKERS),
        default=3,
        help=f"worker processes recording into each memory (1 to {MAX_WORKERS})",
    )
    parser.add_argument(
        "--w-mem",
        type=strength,
        nargs="+",
        action=Strengths,
        default=list(W_MEM),
        help=f"strengths to compare, each once, in [0, {MAX_W_MEM:g}] (0, the baseline, is always run)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401

        import zmem_client  # noqa: F401

        if args.url is None:  # it starts its own `zmem serve`
            import fastapi  # noqa: F401
    except ImportError as e:
        print(
            "zmem demo runs the client and, without --url, its own service: install both extras in "
            "one environment, torch first (pip install torch, the CPU build from "
            "https://download.pytorch.org/whl/cpu where no GPU is wanted), then "
            f"pip install 'zmem[client,service]' ({e})",
            file=sys.stderr,
        )
        return 2
    from . import report

    size = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        size["seeds"] = args.seeds
    if args.episodes is not None:
        size["episodes"] = args.episodes
    if 0.0 not in args.w_mem:
        args.w_mem = [0.0, *args.w_mem]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with _service(args.url) as url:
        runs = _train_all(url, args, size)
        kernel = _kernel_checks(url, args.token, size["seeds"])
        report.write(out, url, args.token, runs, kernel, size, args)
    print(f"\nzmem demo: report in {out}/summary.md ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _service(url: str | None) -> Iterator[str]:
    """The given service, or a `zmem serve` of our own (temporary data dir, no durability)."""
    if url:
        yield url.rstrip("/")
        return
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="zmem-demo-") as data:
        cmd = [sys.executable, "-m", "zmem_service.cli", "serve", "--port", str(port), "--data-dir", data]
        cmd += ["--durability", "none", "--log-level", "warning"]
        log = open(Path(data) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"zmem serve exited: {(Path(data) / 'serve.log').read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("zmem serve did not become ready in 60 s")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def memory_name(w: float, seed: int) -> str:
    return f"demo-w{w:g}-s{seed}"


class Progress:
    """A plain progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        filled = int(30 * self.done / self.total)
        elapsed = time.monotonic() - self.t0
        bar = "#" * filled + "." * (30 - filled)
        print(
            f"\r[{bar}] {self.done}/{self.total} {what:<28} {elapsed:4.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )


def _train_all(url: str, args: argparse.Namespace, size: dict[str, int]) -> list[dict[str, Any]]:
    from zmem_client import ZMemClient

    from .toy import BATCH, Z_DIM, Job, train

    steps = max(1, size["episodes"] // (args.workers * BATCH))
    runs = []
    progress = Progress(len(args.w_mem) * size["seeds"] + 1)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_quiet_worker) as pool:
        for seed in range(args.seed_offset, args.seed_offset + size["seeds"]):
            for w in args.w_mem:
                name = memory_name(w, seed)
                client = ZMemClient(url, memory=name, token=args.token, timeout=300)
                _drop(url, name, args.token)
                client.configure(z_dim=Z_DIM, capacity=50_000, min_size=size["min_size"], k=64, sigma=1.0)
                queries = f"{url}/memories/{name}/queries"
                jobs = [Job(client, queries, args.token, w, seed, i, steps) for i in range(args.workers)]
                parts = pool.map(train, jobs)
                client.close()
                merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                runs.append({"w": w, "seed": seed, "name": name, "episodes": merged})
                progress.step(f"w_mem={w:g} seed={seed}")
    return runs


def _drop(url: str, name: str, token: str | None) -> None:
    """Start from an empty memory (a rerun against the same --url)."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    httpx.delete(f"{url}/memories/{name}", headers=headers, timeout=60)


def _quiet_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _kernel_checks(url: str, token: str | None, seeds: int) -> list[dict[str, Any]]:
    """d = 64 unit-variance z's at sigma 1 (the kernel underflows), then at the sigma the
    diagnostics suggest."""
    from zmem_client import ZMemClient

    from .toy import kernel_check

    checks = []
    name = f"demo-kernel-d{KERNEL_D}"
    client = ZMemClient(url, memory=name, token=token, timeout=300)
    _drop(url, name, token)
    client.configure(z_dim=KERNEL_D, capacity=50_000, min_size=500, k=64, sigma=1.0)
    queries = f"{url}/memories/{name}/queries"
    kernel_check(client, queries, token, KERNEL_D, 1500, 0, 1.0)
    first = {c["name"]: c for c in client.diagnostics()["criteria"]}["kernel"]
    checks.append({"d": KERNEL_D, "sigma": 1.0, "kernel": first})
    suggested = first["values"]["suggested_sigma"]
    if suggested:
        fixed = ZMemClient(url, memory=name + "-fixed", token=token, timeout=300)
        _drop(url, name + "-fixed", token)
        fixed.configure(z_dim=KERNEL_D, capacity=50_000, min_size=500, k=64, sigma=float(suggested))
        kernel_check(
            fixed, f"{url}/memories/{name}-fixed/queries", token, KERNEL_D, 1500, 0, float(suggested)
        )
        second = {c["name"]: c for c in fixed.diagnostics()["criteria"]}["kernel"]
        checks.append({"d": KERNEL_D, "sigma": float(suggested), "kernel": second})
        fixed.close()
    client.close()
    print("", end="", file=sys.stderr)
    return checks
