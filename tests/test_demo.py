"""`zmem demo`, reduced: it starts its own service, trains, and writes the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def test_a_reduced_demo_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "zmem_service.cli", "demo", "--quick", "--out", str(out)]
    cmd += ["--seeds", "1", "--episodes", "600", "--workers", "2", "--w-mem", "0", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "report in" in done.stderr and "[" in done.stderr  # the progress bar
    summary = (out / "summary.md").read_text()
    for needle in (
        "| 0 |",
        "| 20 |",
        "## Where w_mem starts to matter",
        "## Kernel check",
        "density",
        "kernel",
    ):
        assert needle in summary, needle
    for kind in ("map", "trail", "risk"):
        png = out / f"{kind}_w0_vs_w20.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in summary


def _episodes(sides: np.ndarray, steps: int, workers: int = 3, batch: int = 8) -> dict[str, np.ndarray]:
    """A toy run's episode arrays for the truth: `sides` [steps, 3] each zone's mean side per
    step (every worker alike), the policy's spread fixed, outcomes at the policy's mean."""
    from zmem_demo.toy import outcome

    rng = np.random.default_rng(0)
    n = steps * batch
    progress = np.repeat(np.arange(steps) / steps, batch)
    per = np.repeat(sides, batch, axis=0)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("progress", "policy_sides", "policy_std", "worker")}
    out |= {k: [] for k in ("soft_bind", "cone_vol", "lambda_bind")}
    for w in range(workers):
        metrics = outcome(per.mean(axis=1) + 0.4 * rng.normal(size=n), rng)
        for k, v in metrics.items():
            out[k].append(v)
        out["progress"].append(progress)
        out["policy_sides"].append(per)
        out["policy_std"].append(np.full(n, 0.4))
        out["worker"].append(np.full(n, w))
    return {k: np.concatenate(v) for k, v in out.items()}


def test_the_convergence_truth_asks_what_the_verdict_can_see_at_the_run_s_size() -> None:
    """Flat: must pass. A rise of the toy's risk target (the policy's mean side from 0.3 to
    0.1, about 0.15 in a range of 1): must fail over 200 steps, unsure over 20 (480 episodes:
    the verdict's standard error at that size puts it within its bar plus the power it
    states)."""
    from zmem_demo.report import _agrees, _convergence_truth

    flat = _convergence_truth(_episodes(np.full((200, 3), 0.3), 200), 1.0)
    assert flat[0] is True
    for steps, want in ((200, False), (20, None)):
        sides = np.repeat(np.linspace(0.3, 0.1, steps)[:, None], 3, axis=1)
        truth, detail = _convergence_truth(_episodes(sides, steps), 1.0)
        assert truth is want, (steps, detail)
        assert detail["overall"][0] > 0.05
    plain = {"passed": True, "values": {"unproven": []}}
    unsure = {"passed": True, "values": {"unproven": ["worker"]}}
    failed = {"passed": False, "values": {"unproven": []}}
    assert [_agrees(v, None) for v in (plain, unsure, failed)] == [False, True, True]
    assert [_agrees(v, True) for v in (plain, unsure, failed)] == [True, True, False]
    assert [_agrees(v, False) for v in (plain, unsure, failed)] == [False, False, True]
