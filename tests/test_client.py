"""The client alone, against mock transports: retries, bounded queue, errors, pickling."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

from zmem_client import (
    ClientClosed,
    FlushTimeout,
    NoSuchMemory,
    QueueFull,
    Regularizer,
    RequestRejected,
    SendFailed,
    Timeout,
    TransportError,
    ZMemClient,
    ZMemWarning,
)

from .server import wait_until

Handler = "Callable[[httpx.Request], httpx.Response]"


def ack(request: httpx.Request) -> httpx.Response:
    n = safetensors.numpy.load(request.content)["z"].shape[0]
    return httpx.Response(
        200, json={"accepted": n, "duplicates": 0, "size": n, "first_seq": 1, "last_seq": n}
    )


def record(mem: ZMemClient, n: int, d: int = 3) -> None:
    for i in range(n):
        mem.record(np.full(d, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


NOT_FOUND = {
    "type": "https://zmem.dev/problems/not-found",
    "title": "Not found",
    "status": 404,
    "detail": "no memory named 'fresh'",
}


def neighbors_answer(request: httpx.Request) -> httpx.Response:
    """Every query row gets two neighbours at the query itself with risk target 1."""
    z = safetensors.numpy.load(request.content)["z"]
    b = z.shape[0]
    body = safetensors.numpy.save(
        {
            "z": np.repeat(z[:, None, :], 2, axis=1),
            "risk_target": np.ones((b, 2), np.float32),
            "d2": np.zeros((b, 2), np.float32),
            "seq": np.zeros((b, 2), np.int64),
        },
        metadata={"size": "700", "active": "true", "k": "2", "sigma": "1.0"},
    )
    return httpx.Response(200, content=body, headers={"content-type": "application/x-safetensors"})


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
    # The first answer waits until all three are recorded: otherwise the 422 could arrive
    # before the 2nd or 3rd record(), which would (rightly) raise it there instead.
    recorded = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        recorded.wait(10)
        return httpx.Response(422, json={"title": "Validation failed", "detail": "z_dim"})

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    record(mem, 3)
    recorded.set()
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
    with pytest.raises(QueueFull, match="nothing was dropped"):  # while the sender is stuck
        record(mem, 1)
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
        (np.zeros(3), {**good, "cone_vol": 0.0}),  # log(0 + eps): the seed says cone_vol > 0
        (np.zeros(3), {**good, "lambda_bind": float("inf")}),
        (np.zeros(3), {**good, "lambda_bind": -5.0}),
    ]:
        with pytest.raises(ValueError):
            mem.record(z, **fields)
    mem.record(torch.zeros(1, 3), **good)
    mem.flush(timeout=10)  # the service accepted d=3: another d is refused at the call
    with pytest.raises(ValueError, match="accepted 3"):
        mem.record(np.zeros(4), **good)
    mem.close()


def test_a_rejected_z_dim_is_forgotten() -> None:
    """The memory holds d=32: a first record of d=16 is rejected, then d=32 must go through."""

    def handler(request: httpx.Request) -> httpx.Response:
        if safetensors.numpy.load(request.content)["z"].shape[1] != 32:
            return httpx.Response(422, json={"title": "Validation failed", "detail": "z_dim is 32"})
        return ack(request)

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    record(mem, 1, d=16)
    with pytest.raises(SendFailed, match="z_dim is 32"):
        mem.flush(timeout=10)
    record(mem, 2, d=32)
    mem.flush(timeout=10)
    with pytest.raises(ValueError, match="accepted 32"):
        record(mem, 1, d=16)
    mem.close()


def test_records_of_two_dimensions_before_any_answer_go_in_separate_batches() -> None:
    shapes: list[tuple[int, ...]] = []
    recorded = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        recorded.wait(10)
        shapes.append(safetensors.numpy.load(request.content)["z"].shape)
        return httpx.Response(422, json={"detail": "z_dim"}) if shapes[-1][1] == 5 else ack(request)

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    record(mem, 2, d=5)
    record(mem, 2, d=3)
    recorded.set()
    with pytest.raises(SendFailed):
        mem.flush(timeout=10)
    # The d=3 pair is stored; the refused d=5 pair (a 422 naming no episode) is sent down to
    # single episodes before each is dropped.
    assert sum(n for n, d in shapes if d == 3) == 2 and mem.dropped == 2
    assert [shape for shape in shapes if shape[1] == 5][-2:] == [(1, 5), (1, 5)]
    record(mem, 1, d=3)
    mem.close(timeout=10)


def test_unreachable_service_raises() -> None:
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        mem = ZMemClient(f"http://127.0.0.1:{bound.getsockname()[1]}", timeout=1)
        with pytest.raises(TransportError, match="cannot reach"):
            mem.risk(torch.zeros(1, 3))
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
    assert {key: reg.history[key] for key in ("mem_loss", "mem_risk", "mem_n")} == {
        "mem_loss": [pytest.approx(0.02)],
        "mem_risk": [pytest.approx(1.0)],
        "mem_n": [700],
    }
    mem.close()


# -- the issue-7 points, one test each ------------------------------------------------------


def test_only_no_such_memory_makes_risk_zero() -> None:
    answers = {
        "not-found problem": httpx.Response(404, json=NOT_FOUND),
        "route 404": httpx.Response(404, json={"type": "about:blank", "title": "Not Found", "status": 404}),
        "proxy page": httpx.Response(404, text="<html>404 Not Found</html>"),
    }
    for name, answer in answers.items():
        mem = ZMemClient(
            "http://zmem.test/wrong/prefix", transport=httpx.MockTransport(lambda r, a=answer: a)
        )
        z = torch.ones(2, 4, requires_grad=True)
        if name == "not-found problem":
            assert mem.risk(z).tolist() == [0.0, 0.0]
            assert mem.risk_and_size(z)[1] == 0
        else:
            with pytest.raises(RequestRejected) as info:
                mem.risk(z)
            assert info.value.status == 404 and not isinstance(info.value, NoSuchMemory), name
        mem.close()


def test_reads_of_a_memory_nobody_wrote_say_no_such_memory_yet() -> None:
    mem = ZMemClient(
        "http://zmem.test",
        memory="fresh",
        transport=httpx.MockTransport(lambda r: httpx.Response(404, json=NOT_FOUND)),
    )
    for call in (
        mem.stats,
        mem.diagnostics,
        mem.export,
        mem.extract,
        mem.map_png,
        mem.trail_png,
        mem.risk_png,
    ):
        with pytest.raises(NoSuchMemory, match="no such memory yet: 'fresh'") as info:
            call()
        assert isinstance(info.value, RequestRejected) and info.value.problem == NOT_FOUND
    with pytest.raises(NoSuchMemory):
        mem.neighbors(np.zeros(4))
    assert mem.risk(torch.zeros(1, 4)).item() == 0.0
    mem.close()


def test_leaving_a_with_block_while_the_service_is_down_returns_and_warns() -> None:
    up = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if not up.is_set():
            raise httpx.ConnectError("connection refused", request=request)
        return ack(request)

    assert ZMemClient("http://zmem.test").exit_timeout == 30.0  # the default: tens of seconds
    with pytest.warns(ZMemWarning, match=r"3 recorded episodes not yet delivered .* after 0\.3s"):  # noqa: SIM117
        with ZMemClient("http://zmem.test", exit_timeout=0.3, transport=httpx.MockTransport(handler)) as mem:
            record(mem, 3)
    assert mem.pending == 3  # kept by the background sender, which keeps trying
    with pytest.raises(ClientClosed):
        record(mem, 1)
    up.set()
    wait_until(lambda: mem.pending == 0, 30, "the sender delivering after the service came back")
    assert mem._sender.sent == 3


def test_leaving_a_with_block_on_an_exception_waits_briefly_and_keeps_the_exception() -> None:
    error = KeyError("the training step failed")
    up = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        return ack(request) if up.is_set() else refused(request)

    with pytest.warns(ZMemWarning, match=r"1 recorded episodes not yet delivered .* after 2s"):  # noqa: SIM117
        with pytest.raises(KeyError) as info:
            with ZMemClient(
                "http://zmem.test", exit_timeout=600, transport=httpx.MockTransport(handler)
            ) as mem:
                record(mem, 1)
                raise error
    assert info.value is error and info.value.__context__ is None
    up.set()  # else the exit flush would wait its 600 s for this client at the end of the run
    wait_until(lambda: mem.pending == 0, 30, "the sender delivering after the service came back")


def test_leaving_a_with_block_raises_a_permanent_rejection() -> None:
    handler = lambda r: httpx.Response(422, json={"detail": "z_dim is 8"})  # noqa: E731
    with pytest.raises(SendFailed, match="z_dim is 8"):  # noqa: SIM117
        with ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler)) as mem:
            record(mem, 1)


def test_close_with_a_timeout_raises_and_keeps_the_client_usable() -> None:
    up = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if not up.is_set():
            raise httpx.ConnectError("connection refused", request=request)
        return neighbors_answer(request) if request.url.path.endswith("neighbors") else ack(request)

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    record(mem, 2)
    with pytest.raises(FlushTimeout, match="2 episodes"):
        mem.close(timeout=0.2)
    up.set()
    record(mem, 1)
    assert mem.risk(torch.zeros(1, 3)).shape == ()
    mem.close(timeout=30)
    assert mem.pending == 0


def test_every_call_on_a_closed_client_says_it_is_closed() -> None:
    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(ack))
    mem.close()
    mem.close()  # closing again does nothing
    calls: dict[str, Any] = {
        "record": lambda: record(mem, 1),
        "flush": mem.flush,
        "risk": lambda: mem.risk(torch.zeros(1, 3)),
        "neighbors": lambda: mem.neighbors(np.zeros(3)),
        "stats": mem.stats,
        "export": mem.export,
        "configure": lambda: mem.configure(z_dim=3),
        "map_png": mem.map_png,
        "diagnostics": mem.diagnostics,
    }
    for name, call in calls.items():
        with pytest.raises(ClientClosed, match="closed"):
            call()
        assert name


def test_risk_takes_numpy_and_lists_like_record() -> None:
    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(neighbors_answer))
    from_numpy = mem.risk(np.zeros((1, 4)))
    assert from_numpy.shape == () and from_numpy.dtype == torch.float64
    assert from_numpy.item() == pytest.approx(1.0)
    assert mem.risk(np.zeros((3, 4), np.float32)).shape == (3,)
    assert mem.risk([[0.0, 0.0], [1.0, 1.0]]).tolist() == pytest.approx([1.0, 1.0])
    mem.close()


def spread_neighbors_answer(request: httpx.Request) -> httpx.Response:
    """Every query row gets 64 neighbours at distances from 0.9 to 3 with varied risk targets."""
    z = safetensors.numpy.load(request.content)["z"]
    b, d = z.shape
    rng = np.random.default_rng(5)
    offsets = rng.standard_normal((64, d)).astype(np.float32)
    offsets *= (np.linspace(0.9, 3.0, 64, dtype=np.float32) / np.linalg.norm(offsets, axis=1))[:, None]
    body = safetensors.numpy.save(
        {
            "z": (z[:, None, :] + offsets[None]).astype(np.float32),
            "risk_target": np.tile(rng.uniform(-1.0, 2.0, 64).astype(np.float32), (b, 1)),
            "d2": np.tile((offsets.astype(np.float64) ** 2).sum(1).astype(np.float32), (b, 1)),
            "seq": np.tile(np.arange(1, 65), (b, 1)),
        },
        metadata={"size": "700", "active": "true", "k": "64", "sigma": "0.7"},
    )
    return httpx.Response(200, content=body, headers={"content-type": "application/x-safetensors"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_z_gets_the_float32_kernel(dtype: torch.dtype) -> None:
    """z in bfloat16/float16 (autocast) is computed as the seed does, in float32, and only the
    result and the gradient are rounded to z's dtype."""
    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(spread_neighbors_answer))
    z = (torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 0.5).to(dtype).requires_grad_(True)
    risk = mem.risk(z)
    risk.sum().backward()
    z32 = z.detach().float().requires_grad_(True)
    ref = mem.risk(z32)
    ref.sum().backward()
    assert risk.dtype == dtype and z.grad is not None and z.grad.dtype == dtype
    assert torch.equal(risk, ref.detach().to(dtype))
    assert torch.equal(z.grad, z32.grad.to(dtype))
    mem.close()


def test_episodes_that_cannot_be_sent_at_exit_are_reported_lost() -> None:
    script = textwrap.dedent("""
        import httpx, numpy as np
        from zmem_client import ZMemClient

        def refused(request):
            raise httpx.ConnectError("connection refused", request=request)

        mem = ZMemClient("http://zmem.test", exit_timeout=0.5, transport=httpx.MockTransport(refused))
        for i in range(3):
            mem.record(np.full(3, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)
        # no flush, no close: the interpreter exits here while the service is down
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 recorded episodes were never delivered to http://zmem.test" in out.stderr
    assert "are LOST" in out.stderr and "the process is ending" in out.stderr
