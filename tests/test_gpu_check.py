"""`benchmarks/gpu_check.sh --self-test`: the prepared GPU check's logic, on CPU with tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env, cwd="/"
    )


@pytest.mark.e2e
def test_self_test_prints_one_table() -> None:
    r = run("--self-test")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("zmem GPU check:")) :]
    assert "p50 µs" in table[1] and "p99 µs" in table[1]
    searches = [line for line in table if " search, N=" in line]
    assert len(searches) == 4 and all(line.rstrip().endswith("exact") for line in searches)
    assert all("torch-cpu" in line for line in searches)
    risk = [line for line in table if line.startswith("risk() B=1")]
    assert len(risk) == 1 and "server knn:" in risk[0], risk


def test_unknown_arguments_are_refused() -> None:
    r = run("--frobnicate")
    assert r.returncode == 2 and "unknown argument --frobnicate" in r.stderr


def test_every_wheel_it_needs_is_pinned_and_the_wheel_folder_is_ignored() -> None:
    text = SCRIPT.read_text()
    needed = text.split('NEEDED="', 1)[1].split('"', 1)[0].split()
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert {n.lower().replace("_", "-") for n in needed} <= pins
    assert "wheels/" in (ROOT / ".gitignore").read_text().splitlines()
    assert os.access(SCRIPT, os.X_OK)


def test_without_wheels_it_says_where_to_get_them(tmp_path: Path) -> None:
    r = run("--wheels", str(tmp_path))
    assert r.returncode == 2 and "no wheels in" in r.stderr and "--download-wheels" in r.stderr
