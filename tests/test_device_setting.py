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
