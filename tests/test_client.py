"""The client alone, against mock transports: retries, bounded queue, errors, pickling."""

from __future__ import annotations

import json
import pickle
import threading
import time

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

from zmem_client import (
    FlushTimeout,
    QueueFull,
    Regularizer,
    RequestRejected,
    SendFailed,
    Timeout,
    TransportError,
    ZMemClient,
)

Handler = "Callable[[httpx.Request], httpx.Response]"


def ack(request: httpx.Request) -> httpx.Response:
    n = safetensors.numpy.load(request.content)["z"].shape[0]
    return httpx.Response(
        200, json={"accepted": n, "duplicates": 0, "size": n, "first_seq": 1, "last_seq": n}
    )


def record(mem: ZMemClient, n: int) -> None:
    for i in range(n):
        mem.record(np.full(3, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)


def test_transient_failures_are_retried_and_ids_kept() -> None:
    seen: list[list[str]] = []
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        header = json.loads(request.content[8 : 8 + int.from_bytes(request.content[:8], "little")])
        seen.append(json.loads(header["__metadata__"]["id"]))
        if calls["n"] == 1:
            raise httpx.ConnectError("refused")
        if calls["n"] == 2:
            return httpx.Response(503, json={"title": "busy"})
        return ack(request)

    with ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler)) as mem:
        record(mem, 5)
        mem.flush(timeout=10)
    # The first batch is sent three times with the same ids; later batches once each.
    assert seen[0] == seen[1] == seen[2]
    acknowledged = [i for ids in seen[2:] for i in ids]
    assert len(acknowledged) == len(set(acknowledged)) == 5


def test_a_permanent_rejection_raises_on_the_next_call() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"title": "Validation failed", "detail": "z_dim"})

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    record(mem, 3)
    with pytest.raises(SendFailed) as info:
        mem.flush(timeout=10)
    assert info.value.cause.status == 422 and "z_dim" in str(info.value)
    mem.flush(timeout=1)  # raised once; the queue is empty
    mem.close()


def test_full_queue_raises_instead_of_dropping_or_blocking() -> None:
    release = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        release.wait(10)
        return ack(request)

    mem = ZMemClient("http://zmem.test", queue_size=10, batch_size=2, transport=httpx.MockTransport(handler))
    record(mem, 10)
    t0 = time.monotonic()
    with pytest.raises(QueueFull, match="nothing was dropped"):
        record(mem, 1)
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(FlushTimeout):
        mem.flush(timeout=0.2)
    assert mem.pending == 10
    release.set()
    mem.flush(timeout=10)
    assert mem.pending == 0
    mem.close()


def test_record_checks_values_at_the_call() -> None:
    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(ack))
    good = {"soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}
    for z, fields in [
        (np.zeros((2, 3)), good),
        (np.array([np.nan, 0, 0]), good),
        (np.zeros(3), {**good, "soft_bind": 1.5}),
        (np.zeros(3), {**good, "cone_vol": -1.0}),
        (np.zeros(3), {**good, "lambda_bind": float("inf")}),
    ]:
        with pytest.raises(ValueError):
            mem.record(z, **fields)
    mem.record(torch.zeros(1, 3), **good)
    with pytest.raises(ValueError, match="earlier records had 3"):
        mem.record(np.zeros(4), **good)
    mem.close()


def test_unreachable_service_raises_quickly() -> None:
    mem = ZMemClient("http://127.0.0.1:9", timeout=1)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="cannot reach"):
        mem.risk(torch.zeros(1, 3))
    assert time.monotonic() - t0 < 5
    mem.close()


def test_a_slow_service_times_out() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    mem = ZMemClient("http://zmem.test", timeout=0.5, transport=httpx.MockTransport(handler))
    with pytest.raises(Timeout):
        mem.stats()
    mem.close()


def test_problem_details_are_kept_on_the_error() -> None:
    problem = {
        "type": "x",
        "title": "Validation failed",
        "status": 422,
        "detail": "k: too big",
        "errors": [{"loc": ["k"], "msg": "too big"}],
    }
    mem = ZMemClient(
        "http://zmem.test", transport=httpx.MockTransport(lambda r: httpx.Response(422, json=problem))
    )
    with pytest.raises(RequestRejected) as info:
        mem.neighbors(np.zeros(3), k=5000)
    assert info.value.problem == problem and "k: too big" in str(info.value)
    mem.close()


def test_pickles_as_its_arguments() -> None:
    mem = ZMemClient("http://zmem.test:1234", memory="m1", token="s3cret", timeout=3.0)
    record_before = mem._sender
    clone = pickle.loads(pickle.dumps(mem))
    assert (clone.url, clone.memory, clone.timeout) == ("http://zmem.test:1234", "m1", 3.0)
    assert clone._sender is not record_before and clone._http is not mem._http
    assert clone._http.headers["authorization"] == "Bearer s3cret"
    mem.close()
    clone.close()


def test_constructor_names_the_bad_argument() -> None:
    with pytest.raises(ValueError, match="timeout"):
        ZMemClient("http://x", timeout=0)
    with pytest.raises(ValueError, match="url"):
        ZMemClient("x:8000")


def test_regularizer_keeps_the_seed_history() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        z = safetensors.numpy.load(request.content)["z"]
        b, d = z.shape
        body = safetensors.numpy.save(
            {
                "z": np.zeros((b, 2, d), np.float32),
                "risk_target": np.ones((b, 2), np.float32),
                "d2": np.zeros((b, 2), np.float32),
                "seq": np.zeros((b, 2), np.int64),
            },
            metadata={"size": "700", "active": "true", "k": "2", "sigma": "1.0"},
        )
        return httpx.Response(200, content=body, headers={"content-type": "application/x-safetensors"})

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    reg = Regularizer(mem, w_mem=0.02)
    z = torch.zeros(4, 3, requires_grad=True)
    loss = reg(z)
    loss.backward()
    assert loss.shape == () and abs(loss.item() - 0.02) < 1e-6
    assert reg.history == {
        "mem_loss": [pytest.approx(0.02)],
        "mem_risk": [pytest.approx(1.0)],
        "mem_n": [700],
    }
    mem.close()
