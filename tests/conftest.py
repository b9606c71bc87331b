from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import settings

from zmem_service.app import create_app
from zmem_service.settings import ServiceSettings

from .server import Server

settings.register_profile("zmem", deadline=None, print_blob=True)
settings.load_profile("zmem")


def ready_client(settings: ServiceSettings) -> TestClient:
    """An in-process TestClient whose memories are loaded (entered; the caller closes it)."""
    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("app never became ready")
        time.sleep(0.01)
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
