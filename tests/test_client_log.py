"""The client's logger (`zmem_client`, a NullHandler until the user configures logging):
retries, drops and feed errors are said there; and one version, the distribution's."""

from __future__ import annotations

import importlib.metadata
import logging

import httpx
import numpy as np
import pytest

import zmem_client
import zmem_core
import zmem_service
from zmem_client import EpisodesDropped, ZMemClient

from .test_client import ack


def test_retries_and_drops_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    busy, refused = httpx.Response(503, json={"title": "busy"}), httpx.Response(422, json={"title": "no"})
    answers = iter([busy, None, refused])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers, None)
        return answer if answer is not None else ack(request)

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    with caplog.at_level(logging.INFO, logger="zmem_client"):
        mem.record(np.zeros(3, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
        mem.flush(timeout=30)
        mem.record(np.zeros(3, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
        with pytest.raises(EpisodesDropped):
            mem.flush(timeout=30)
    mem.close()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "zmem_client"]
    assert any(level == "INFO" and "not stored" in text and "retry 1" in text for level, text in said), said
    assert any(level == "WARNING" and "dropped" in text for level, text in said), said


def test_the_logger_is_silent_unless_configured() -> None:
    handlers = logging.getLogger("zmem_client").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_one_version_the_distribution_s() -> None:
    version = importlib.metadata.version("zmem")
    assert zmem_core.__version__ == zmem_client.__version__ == zmem_service.__version__ == version
