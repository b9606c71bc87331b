"""`log_to`: the Regularizer's numbers, the verdicts and the map, written to TensorBoard- and
W&B-shaped writers (duck-typed fakes; neither library is a dependency)."""

from __future__ import annotations

import sys
import types
from typing import Any

import httpx
import pytest
import torch

from zmem_client import Regularizer, ZMemClient, log_to
from zmem_client._report import png_size

from .test_client import spread_neighbors_answer

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big") + b"rest"
DIAGNOSTICS = {
    "criteria": [
        {"name": "density", "passed": True},
        {"name": "convergence", "passed": False},
        {"name": "kernel", "passed": None},
    ]
}


def service(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/diagnostics"):
        return httpx.Response(200, json=DIAGNOSTICS)
    if request.url.path.endswith("/map.png"):
        return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
    return spread_neighbors_answer(request)


class Board:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


class Run:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, Any], int]] = []

    def log(self, data: dict[str, Any], step: int) -> None:
        self.logged.append((data, step))


@pytest.fixture
def trained() -> tuple[ZMemClient, Regularizer]:
    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(service))
    reg = Regularizer(mem, w_mem=0.5)
    z = torch.nn.Linear(3, 8)(torch.ones(2, 3))
    (z.pow(2).sum() + reg(z)).backward()
    yield mem, reg
    mem.close()


def test_tensorboard_scalars(trained: tuple[ZMemClient, Regularizer]) -> None:
    mem, reg = trained
    board = Board()
    scalars = log_to(board, 7, reg=reg, mem=mem, verdicts=True)
    tags = {tag for tag, _, step in board.scalars if step == 7}
    assert {"zmem/mem_risk", "zmem/mem_loss", "zmem/mem_n", "zmem/w_mem", "zmem/task_force"} <= tags
    assert {"zmem/risk_force", "zmem/force_ratio", "zmem/verdict/density", "zmem/verdict/convergence"} <= tags
    assert "zmem/verdict/kernel" not in tags  # not judged yet: no scalar
    assert scalars["verdict/density"] == 1.0 and scalars["verdict/convergence"] == 0.0
    assert scalars["force_ratio"] == pytest.approx(reg.force_ratio())


def test_wandb_scalars_and_the_map(
    trained: tuple[ZMemClient, Regularizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    mem, reg = trained
    images: list[bytes] = []

    def image(path: str) -> str:
        with open(path, "rb") as f:
            images.append(f.read())
        return "an image"

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=image))
    run = Run()
    log_to(run, 3, reg=reg, mem=mem, images=True)
    assert run.logged[0][1] == 3 and "zmem/mem_risk" in run.logged[0][0]
    assert run.logged[1] == ({"zmem/map": "an image"}, 3) and images == [PNG]


def test_a_writer_of_neither_kind_and_png_sizes() -> None:
    with pytest.raises(TypeError, match="add_scalar"):
        log_to(object(), 0)
    assert png_size(PNG) == (640, 480)
    with pytest.raises(ValueError):
        png_size(b"GIF89a")
