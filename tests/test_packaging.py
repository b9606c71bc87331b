"""Packaging rules: the service needs no torch, the client no server libraries; the CLI works."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from .server import Server

ROOT = Path(__file__).resolve().parents[1]
# What docker/Dockerfile copies before `pip install ".[service]"`: a wheel built from
# these alone must hold the whole project.
BUILD_INPUTS = ("pyproject.toml", "README.md", "constraints.txt", "core", "service", "client", "demo")
PACKAGE_DIRS = ("core", "service", "client", "demo")


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(out.stdout.split())


def test_the_service_does_not_import_torch() -> None:
    loaded = modules_after(
        "from zmem_service.http.app import create_app; from zmem_service.settings import ServiceSettings;"
        "import tempfile; create_app(ServiceSettings(data_dir=tempfile.mkdtemp()))"
    )
    assert "torch" not in loaded and "fastapi" in loaded


def test_the_client_does_not_import_server_libraries() -> None:
    loaded = modules_after("import zmem_client")
    assert not loaded & {"fastapi", "faiss", "matplotlib", "uvicorn", "starlette"}


def test_the_core_needs_only_numpy() -> None:
    """zmem_core is in every install: importing it (and its numpy modules) loads neither
    side, nor torch, safetensors or FAISS."""
    loaded = modules_after("import zmem_core, zmem_core.names, zmem_core.limits, zmem_core.kernel")
    assert "numpy" in loaded
    assert not loaded & {"torch", "safetensors", "faiss", "httpx", "fastapi", "zmem_service", "zmem_client"}


def test_cli_help_needs_nothing_heavy() -> None:
    loaded = modules_after("import zmem_service.cli")
    assert not loaded & {"torch", "fastapi", "faiss"}


def test_extras_and_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"client", "service", "service-gpu", "dev"} <= extras.keys()
    assert any(d.startswith("faiss-cpu") for d in extras["service"])
    # SPEC §7: service-gpu is the service (faiss-cpu included) plus torch; faiss-gpu is swapped in by hand
    assert "zmem[service]" in extras["service-gpu"]  # faiss-cpu comes with the service
    assert any(d.startswith("torch") for d in extras["service-gpu"])
    assert any(d.startswith("torch") for d in extras["client"])
    assert not any(d.startswith("torch") for d in extras["service"])
    assert project["scripts"]["zmem"] == "zmem_service.cli:main"


@pytest.mark.e2e
def test_device_cuda_without_cuda_is_refused_clearly(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "zmem_service.cli", "serve", "--device", "cuda", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--device cuda" in r.stderr and "CUDA" in r.stderr


@pytest.mark.e2e
def test_backup_of_a_live_store(tmp_path) -> None:
    srv = Server(tmp_path / "data").start()
    try:
        eps = [{"z": [float(i)], "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0} for i in range(100)]
        httpx.post(srv.url + "/episodes", json={"episodes": eps}).raise_for_status()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "zmem_service.cli",
                "backup",
                "--data-dir",
                str(tmp_path / "data"),
                str(tmp_path / "copy.sqlite3"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert "100 episodes" in r.stdout
    finally:
        srv.stop()
    restored = Server(tmp_path / "restored")
    (tmp_path / "restored").mkdir()
    (tmp_path / "copy.sqlite3").rename(tmp_path / "restored" / "zmem.sqlite3")
    restored.start()
    try:
        assert httpx.get(restored.url + "/stats").json()["size"] == 100
    finally:
        restored.stop()


def package_files(root: Path) -> set[str]:
    """Every file of the packages as a wheel names it, bytecode caches aside."""
    files = set()
    for top in PACKAGE_DIRS:
        for path in (root / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files.add(path.relative_to(root / top).as_posix())
    return files


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name)  # type: ignore[operator]
    # Bytecode a developer's run left behind must not ship.
    stray = src / "service" / "zmem_service" / "__pycache__"
    stray.mkdir(exist_ok=True)
    (stray / "stray.cpython-311.pyc").write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("zmem-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "zmem = zmem_service.cli:main" in zf.read(entry_points).decode()
    expected = package_files(ROOT)
    assert {"zmem_service/http/routes/__init__.py", "zmem_service/http/static/dashboard.html"} <= expected
    assert {
        "zmem_core/py.typed",
        "zmem_service/py.typed",
        "zmem_client/py.typed",
        "zmem_demo/py.typed",
    } <= expected
    assert shipped - expected == set(), "the wheel holds files the tree does not"
    assert expected - shipped == set(), "files of the tree missing from the wheel"
