"""The examples run as a user runs them, against a real `zmem serve`, for a few seconds each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .server import Server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_cartpole_runs_a_handful_of_episodes_per_worker(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", "--durability", "none").start()
    try:
        cmd = [sys.executable, str(ROOT / "examples" / "cartpole.py"), "--url", srv.url]
        cmd += ["--workers", "2", "--episodes", "6", "--every", "3", "--min-size", "5", "--warmup", "2"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    finally:
        srv.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert sum(line.startswith("worker ") for line in lines) == 4, run.stdout
    assert any(line.startswith("2 workers × 6 episodes") for line in lines), run.stdout
    assert any("force ratio" in line and "force ratio -" not in line for line in lines), run.stdout
    assert "Traceback" not in run.stderr, run.stderr
