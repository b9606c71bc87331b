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
    """On a CPU service the setting changes nothing, and torch is never imported for it."""
    import sys

    from zmem_service.index import CpuEngine, make_engine

    engine = make_engine("cpu", 1, cuda_graphs=True)
    assert isinstance(engine, CpuEngine)
    assert "zmem_service.torch_index" not in sys.modules or "torch" in sys.modules
