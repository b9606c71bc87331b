"""No Docker engine runs here: the Dockerfile and compose file are checked statically."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_installs_the_service_and_serves_on_all_interfaces() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    assert any(line.startswith("RUN pip install") and '".[service]"' in line for line in lines)
    for path in ("pyproject.toml", "constraints.txt", "core", "service", "client", "demo"):
        assert any(line.startswith("COPY") and path in line for line in lines), path
        assert (ROOT / path).exists(), path
    assert "ZMEM_HOST=0.0.0.0" in text and "ZMEM_DATA_DIR=/data" in text
    assert 'CMD ["zmem", "serve"]' in text and "USER zmem" in text
    assert "/readyz" in text


def test_compose_builds_that_dockerfile_with_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["zmem"]
    assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
    assert any(v.endswith(":/data") for v in svc["volumes"])
    assert "zmem-data" in compose["volumes"]
    assert svc["ports"] == ["127.0.0.1:8000:8000"]


def test_gpu_dockerfile_installs_the_gpu_extra_and_serves_on_cuda() -> None:
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:") and "-runtime-" in lines[0]
    assert any(line.startswith("RUN pip install") and '".[service-gpu]"' in line for line in lines)
    assert any("-c constraints.txt" in line for line in lines if line.startswith("RUN pip install"))
    for path in ("pyproject.toml", "constraints.txt", "core", "service", "client", "demo"):
        assert any(line.startswith("COPY") and path in line for line in lines), path
    assert "useradd" in text and "USER zmem" in text
    assert lines.index("USER zmem") > max(i for i, line in enumerate(lines) if line.startswith("RUN "))
    assert "HEALTHCHECK" in text and "/readyz" in text and "ZMEM_DATA_DIR=/data" in text
    assert 'CMD ["zmem", "serve", "--device", "cuda", "--host", "0.0.0.0"]' in text


def test_compose_gpu_profile_reserves_a_gpu() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "profiles" not in compose["services"]["zmem"]  # the CPU service starts by default
    svc = compose["services"]["zmem-gpu"]
    assert svc["profiles"] == ["gpu"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    volume = next(v for v in svc["volumes"] if v.endswith(":/data")).split(":")[0]
    assert volume in compose["volumes"] and volume != "zmem-data"  # never two servers on one data dir
    assert svc["ports"][0].startswith("127.0.0.1:") and svc["ports"][0] != "127.0.0.1:8000:8000"


def test_service_gpu_extra_is_the_service_plus_torch() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0] for r in requirements}

    assert sorted(extras["service-gpu"]) == ["torch>=2.2,<3", "zmem[service]"]  # itself, not a copy
    assert "torch" not in names(extras["service"])


def test_the_image_installs_from_what_the_wheel_test_builds() -> None:
    """The Dockerfile copies the files tests/test_packaging.py builds its wheel from, then
    does a normal (non-editable) install: that wheel holding every module is what makes
    `zmem serve` start in the image."""
    from .test_packaging import BUILD_INPUTS

    text = (ROOT / "docker" / "Dockerfile").read_text()
    copied = {
        word.rstrip("/").removeprefix("./")
        for line in text.splitlines()
        if line.startswith("COPY")
        for word in line.split()[1:-1]
        if not word.startswith("--")
    }
    assert copied == set(BUILD_INPUTS)
    install = next(line for line in text.splitlines() if line.startswith("RUN pip install"))
    assert " -e " not in install and "--editable" not in install
