"""Fixtures and helpers shared by the test files (servers in tests/server.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import settings

from zmem_service.http.app import create_app
from zmem_service.settings import ServiceSettings

from . import server as _server
from .server import Server, wait_until

settings.register_profile("zmem", deadline=None, print_blob=True)
settings.load_profile("zmem")

ST = "application/x-safetensors"


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture of the test runs (module-scoped ones included): a Server started
    # for a test without the e2e mark refuses to start, so the mark can't be forgotten.
    _server.current_test_is_e2e = item.get_closest_marker("e2e") is not None


def episodes(n: int, d: int = 4, start: int = 0, tag: str = "e", **fields: Any) -> list[dict[str, Any]]:
    """`n` valid JSON episodes, z = [start + i] * d, ids f"{tag}{start + i}"."""
    base = {"soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
    return [{"z": [float(start + i)] * d, **base, "id": f"{tag}{start + i}", **fields} for i in range(n)]


def load_npz(body: bytes) -> dict[str, np.ndarray]:
    """An export body as arrays (no pickles)."""
    with np.load(io.BytesIO(body), allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def ready_client(settings: ServiceSettings) -> TestClient:
    """An in-process TestClient whose memories are loaded (entered; the caller closes it)."""
    client = TestClient(create_app(settings))
    client.__enter__()
    wait_until(lambda: client.get("/readyz").status_code == 200, 10, "the app's readiness")
    return client


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator:
    made: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        overrides.setdefault("data_dir", tmp_path / f"data{len(made)}")
        client = ready_client(ServiceSettings(**overrides))  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:  # type: ignore[no-untyped-def]
    """In-process app with small defaults: capacity 1000, min_size 10."""
    return make_client(capacity=1000, min_size=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A real `zmem serve` on a free port (capacity 5000, min_size 10)."""
    srv = Server(tmp_path / "data", "--capacity", "5000", "--min-size", "10").start()
    yield srv
    srv.stop()
