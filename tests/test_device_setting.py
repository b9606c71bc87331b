"""`--device` / ZMEM_DEVICE: auto, cpu, cuda or cuda:N; anything else refused at start, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zmem_service.settings import ServiceSettings


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices_accepted(device: str) -> None:
    assert ServiceSettings(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:0 ", "cuda:-1", "mps", ""])
def test_other_devices_refused(device: str) -> None:
    with pytest.raises(ValidationError, match="device"):
        ServiceSettings(device=device)


def test_device_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZMEM_DEVICE", "cuda:1")
    assert ServiceSettings().device == "cuda:1"


def test_cuda_graphs_is_on_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--cuda-graphs` / ZMEM_CUDA_GRAPHS: on (the default) or off; anything else refused, named."""
    assert ServiceSettings().cuda_graphs == "on"
    monkeypatch.setenv("ZMEM_CUDA_GRAPHS", "off")
    assert ServiceSettings().cuda_graphs == "off"
    for wrong in ("yes", "true", "1", ""):
        with pytest.raises(ValidationError, match="cuda_graphs"):
            ServiceSettings(cuda_graphs=wrong)  # type: ignore[arg-type]


def test_a_cpu_service_takes_the_setting_without_torch() -> None:
    """On a CPU service the setting changes nothing, and nothing imports torch for it."""
    import subprocess
    import sys

    code = (
        "import sys; from zmem_service.index import CpuEngine, make_engine; "
        "assert isinstance(make_engine('cpu', 1, cuda_graphs=True), CpuEngine); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
