"""`zmem demo`, reduced: it starts its own service, trains, and writes the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
