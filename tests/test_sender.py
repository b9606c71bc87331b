"""The background sender under every answer a service (or a proxy) gives: what a retry would
store is retried, what is too big is split, only what the service names as invalid is dropped,
and every drop is counted and reported. Also: every client error survives pickling."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import zmem_client
from zmem_client import (
    ClientClosed,
    EpisodesDropped,
    FlushTimeout,
    HTTPError,
    NoSuchMemory,
    QueueFull,
    ReplicaError,
    RequestRejected,
    SendFailed,
    ServerError,
    Timeout,
    TransportError,
    ZMemClient,
    ZMemError,
    _backoff,
    _sender,
)

from .server import Server, wait_until

GOOD = {"soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0}


def ids_of(request: httpx.Request) -> list[str]:
    """The episode ids of a safetensors POST /episodes body, in order."""
    n = int.from_bytes(request.content[:8], "little")
    return list(json.loads(json.loads(request.content[8 : 8 + n])["__metadata__"]["id"]))


def problem(status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "https://zmem.dev/problems/x", "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return body


@contextlib.contextmanager
def one_batch(mem: ZMemClient) -> Iterator[None]:
    """Episodes recorded inside the block go out together: until it ends, the sender thread
    cannot take any from the queue (`record` can: the queue's lock is reentrant)."""
    with mem._sender._cond:
        yield


class Mock:
    """A MockTransport handler: `answer(ids)` returns a response (or None: store them); the
    stored ids are kept in order, and the ids and time of every request."""

    def __init__(self, answer: Callable[[list[str]], httpx.Response | None]) -> None:
        self.answer = answer
        self.stored: list[str] = []
        self.requests: list[list[str]] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        ids = ids_of(request)
        self.requests.append(ids)
        self.times.append(time.monotonic())
        response = self.answer(ids)
        if response is not None:
            return response
        self.stored.extend(ids)
        n = len(ids)
        return httpx.Response(
            200, json={"accepted": n, "duplicates": 0, "size": n, "first_seq": 1, "last_seq": n}
        )

    def client(self, **kwargs: Any) -> ZMemClient:
        return ZMemClient("http://zmem.test", transport=httpx.MockTransport(self), **kwargs)


def record(mem: ZMemClient, ids: list[str]) -> None:
    """Record one episode for each id, in one batch."""
    with one_batch(mem):
        for i, id_ in enumerate(ids):
            mem.record(np.full(3, i, np.float32), id=id_, soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)


def names(n: int, prefix: str = "e") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def fails(n: int, status: int, **headers: str) -> Callable[[list[str]], httpx.Response | None]:
    """An answer that is `status` the first n times, then stores."""
    left = [n]

    def answer(ids: list[str]) -> httpx.Response | None:
        if left[0] == 0:
            return None
        left[0] -= 1
        return httpx.Response(status, json=problem(status, "try again"), headers=headers)

    return answer


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries come quickly (the backoff's shape is not what these tests check)."""
    init = _sender.Sender.__init__

    def quick(self: _sender.Sender, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{"first_backoff": 0.01, "max_backoff": 0.05, **kwargs})

    monkeypatch.setattr(_sender.Sender, "__init__", quick)


# -- transient answers are retried ---------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 507])
def test_a_transient_answer_is_retried_until_stored(status: int) -> None:
    mock = Mock(fails(3, status, **{"Retry-After": "0"}))
    mem = mock.client()
    record(mem, names(5))
    mem.flush(timeout=30)
    assert mock.stored == names(5) and mem.dropped == 0
    assert len(mock.requests) == 4 and all(ids == names(5) for ids in mock.requests)
    assert min(np.diff(mock.times)) >= 0.004  # "Retry-After: 0" still backs off (0.01 s here)
    mem.close()


def test_a_507_is_waited_out_with_backoff() -> None:
    # No Retry-After: the backoff grows, and the batch goes in once room comes back.
    mock = Mock(fails(6, 507))
    mem = mock.client()
    record(mem, names(2))
    mem.flush(timeout=30)
    assert mock.stored == names(2) and mem.dropped == 0 and mem._sender.retries == 6
    gaps = np.diff(mock.times)
    assert gaps[-1] > gaps[0]
    mem.close()


def test_retry_after_is_honoured_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    mock = Mock(fails(1, 429, **{"Retry-After": "1"}))
    mem = mock.client()
    record(mem, names(1))
    mem.flush(timeout=30)
    assert mock.times[1] - mock.times[0] >= 0.95
    mem.close()
    # A Retry-After of a day is cut to MAX_RETRY_AFTER.
    monkeypatch.setattr(_backoff, "MAX_RETRY_AFTER", 0.1)
    mock = Mock(fails(1, 503, **{"Retry-After": "86400"}))
    mem = mock.client()
    record(mem, names(1))
    mem.flush(timeout=10)
    assert mock.stored == names(1)
    mem.close()


def test_an_http_error_carries_retry_after_in_seconds() -> None:
    from email.utils import formatdate

    values = {"a": "7", "b": "soon", "c": "-1", "e": formatdate(time.time() + 30, usegmt=True)}
    values["f"] = formatdate(time.time() - 30, usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        retry_after = values.get(request.url.params["x"])
        headers = {"Retry-After": retry_after} if retry_after else {}
        return httpx.Response(503, json=problem(503, "busy"), headers=headers)

    mem = ZMemClient("http://zmem.test", transport=httpx.MockTransport(handler))
    for x, expected in [("a", 7.0), ("b", None), ("c", None), ("d", None), ("f", 0.0)]:
        with pytest.raises(ServerError) as info:
            mem.map_png(x=x)
        assert info.value.retry_after == expected
    with pytest.raises(ServerError) as info:
        mem.map_png(x="e")  # an HTTP date: the seconds until then
    assert info.value.retry_after is not None and 25 < info.value.retry_after <= 30
    mem.close()


# -- too big: split --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, body",
    [
        (413, problem(413, "the body is over 1024 bytes")),
        # The service's answer to a batch over its max_batch: `loc` names no episode.
        (422, problem(422, "episodes: too many", [{"loc": ["episodes"], "msg": "4 > the limit 3"}])),
        (422, {"title": "Validation failed"}),  # no `errors` at all
    ],
)
def test_a_batch_too_big_is_split_until_it_fits(status: int, body: dict[str, Any]) -> None:
    mock = Mock(lambda ids: httpx.Response(status, json=body) if len(ids) > 3 else None)
    mem = mock.client()
    record(mem, names(20))
    mem.flush(timeout=30)
    assert mock.stored == names(20) and mem.dropped == 0  # in order, once each
    assert [len(ids) for ids in mock.requests] == [20, 10, 5, 2, 3, 5, 2, 3, 10, 5, 2, 3, 5, 2, 3]
    mem.close()


def test_a_single_episode_still_too_big_is_dropped_and_reported() -> None:
    def answer(ids: list[str]) -> httpx.Response | None:
        if "huge" in ids:
            return httpx.Response(413, json=problem(413, "the body is over 1024 bytes"))
        return None

    mock = Mock(answer)
    mem = mock.client()
    record(mem, ["a", "b", "huge", "c"])
    with pytest.raises(EpisodesDropped) as info:
        mem.flush(timeout=30)
    assert mock.stored == ["a", "b", "c"] and mem.dropped == 1
    e = info.value
    assert (e.count, e.total, len(e.reasons)) == (1, 1, 1) and e.reasons[0][0] == "huge"
    assert "1 recorded episodes were dropped" in str(e) and "huge: 413" in str(e)
    assert isinstance(e.cause, HTTPError) and e.cause.status == 413
    mem.flush(timeout=5)  # reported once
    mem.close()


# -- invalid: exactly the named ones are dropped --------------------------------------------


def test_a_422_naming_episodes_drops_exactly_those_and_resends_the_rest() -> None:
    bad = {"e3", "e4", "e7", "e11", "e18"}

    def answer(ids: list[str]) -> httpx.Response | None:
        # Like the service: each invalid field named by index, but (as its 20-error cap
        # does for larger batches) at most two in one answer.
        errors = [
            {"loc": ["episodes", i, "cone_vol"], "msg": f"bad cone of {id_}"}
            for i, id_ in enumerate(ids)
            if id_ in bad
        ]
        if errors:
            return httpx.Response(422, json=problem(422, "invalid", errors[:2]))
        return None

    mock = Mock(answer)
    mem = mock.client()
    record(mem, names(20))
    with pytest.raises(EpisodesDropped) as info:
        mem.flush(timeout=30)
    assert mock.stored == [id_ for id_ in names(20) if id_ not in bad]
    assert mem.dropped == 5 and info.value.count == 5
    assert dict(info.value.reasons) == {id_: f"cone_vol: bad cone of {id_} (422)" for id_ in bad}
    assert len(mock.requests) == 4  # named two, two, one; then the rest in one
    mem.flush(timeout=5)
    mem.close()


def test_a_422_naming_an_episode_twice_or_out_of_range_names_only_real_ones() -> None:
    errors = [
        {"loc": ["episodes", 1, "soft_bind"], "msg": "must be in [0, 1]"},
        {"loc": ["episodes", 1, "cone_vol"], "msg": "must be > 0"},
        {"loc": ["episodes", 99, "z"], "msg": "not in this request"},
        {"loc": ["episodes", True, "z"], "msg": "not an index"},
    ]
    assert _sender.named_episodes(problem(422, "x", errors), 3) == {
        1: "soft_bind: must be in [0, 1]; cone_vol: must be > 0"
    }
    assert _sender.named_episodes({"errors": [{"loc": ["episodes", "z"], "msg": "z_dim"}]}, 3) == {}
    assert _sender.named_episodes(["not", "a", "problem"], 3) == {}


def test_drops_are_counted_and_never_overwritten() -> None:
    # Three batches refused for good before anyone looks: the report has all of them.
    mock = Mock(lambda ids: httpx.Response(403, json=problem(403, "a read token")))
    mem = mock.client(batch_size=2)
    record(mem, names(6))
    with pytest.raises(EpisodesDropped) as info:
        mem.flush(timeout=30)
    assert len(mock.requests) == 3
    assert (info.value.count, info.value.total, mem.dropped) == (6, 6, 6)
    assert "6 recorded episodes were dropped" in str(info.value) and "(and 1 more)" in str(info.value)
    assert [id_ for id_, _ in info.value.reasons] == names(5)
    assert "403 from POST http://zmem.test/episodes: a read token" in info.value.reasons[0][1]
    # A later drop is reported on the next record(), which still queues its own episode.
    record(mem, ["x"])
    wait_until(lambda: mem.dropped == 7, 10, "x dropped")
    with pytest.raises(EpisodesDropped, match=r"1 recorded episodes were dropped \(7 since.*x: 403"):
        record(mem, ["y"])
    with pytest.raises(EpisodesDropped, match=r"1 recorded episodes were dropped \(8 since.*y: 403"):
        mem.flush(timeout=30)
    assert mock.requests[-2:] == [["x"], ["y"]] and mem.dropped == 8
    mem.close()


def test_drops_are_reported_at_exit() -> None:
    script = textwrap.dedent("""
        import threading
        import httpx, numpy as np
        from zmem_client import EpisodesDropped, ZMemClient

        recorded = threading.Event()  # else record() could raise the first drop

        def refuse(request):
            recorded.wait(10)
            return httpx.Response(401, json={"title": "Unauthorized", "detail": "wrong token"})

        def record(mem, n):
            for i in range(n):
                mem.record(np.full(3, i, np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.0)

        caught = ZMemClient("http://zmem.test", transport=httpx.MockTransport(refuse))
        record(caught, 3)
        recorded.set()
        try:
            caught.close(timeout=10)
        except EpisodesDropped:
            caught.close()  # the training script went on
        left = ZMemClient("http://zmem.test", memory="m2", transport=httpx.MockTransport(refuse))
        recorded.clear()
        record(left, 2)
        recorded.set()
        # no flush, no close: the interpreter exits here
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 episodes recorded for http://zmem.test (memory 'default') were dropped in all" in out.stderr
    assert "2 recorded episodes were dropped (2 since this client started)" in out.stderr
    assert "2 episodes recorded for http://zmem.test (memory 'm2') were dropped in all" in out.stderr


# -- every error pickles ---------------------------------------------------------------------

PROBLEM_422 = problem(422, "episodes.0.cone_vol: must be > 0", [{"loc": ["episodes", 0], "msg": "x"}])


def unpicklable() -> Exception:
    request = httpx.Request("POST", "http://zmem.test/episodes")
    return httpx.HTTPStatusError("a bug", request=request, response=httpx.Response(500, request=request))


def make_error(kind: str) -> ZMemError:
    """One error of each kind the client raises, with its attributes set."""
    url = "POST http://zmem.test/episodes"
    return {
        "ZMemError": lambda: ZMemError("base"),
        "TransportError": lambda: TransportError("cannot reach"),
        "Timeout": lambda: Timeout("no answer within 3s"),
        "HTTPError": lambda: HTTPError(418, problem(418, "teapot"), url, 2.0),
        "RequestRejected": lambda: RequestRejected(422, PROBLEM_422, url),
        "NoSuchMemory": lambda: NoSuchMemory(404, problem(404, "none"), "GET x", "fresh"),
        "ServerError": lambda: ServerError(503, problem(503, "busy"), url, 1.0),
        "QueueFull": lambda: QueueFull("full"),
        "SendFailed": lambda: SendFailed("lost", ServerError(500, problem(500, "bug"), url)),
        # A cause that doesn't unpickle (keyword-only constructor arguments) travels as its text.
        "SendFailedOfABug": lambda: SendFailed("lost", unpicklable()),
        "EpisodesDropped": lambda: EpisodesDropped(
            3, 9, [("a", "cone_vol: must be > 0 (422)")], RequestRejected(422, PROBLEM_422, url)
        ),
        "FlushTimeout": lambda: FlushTimeout("2 episodes still unacknowledged"),
        "ClientClosed": lambda: ClientClosed("closed"),
        "ReplicaError": lambda: ReplicaError("over replica_max_bytes"),
    }[kind]()


KINDS = [
    "ZMemError",
    "TransportError",
    "Timeout",
    "HTTPError",
    "RequestRejected",
    "NoSuchMemory",
    "ServerError",
    "QueueFull",
    "SendFailed",
    "SendFailedOfABug",
    "EpisodesDropped",
    "FlushTimeout",
    "ClientClosed",
    "ReplicaError",
]
ATTRIBUTES = ("status", "problem", "url", "retry_after", "memory", "count", "total", "reasons")


def raise_error(kind: str) -> None:
    raise make_error(kind)


def assert_same(copy: BaseException, error: BaseException) -> None:
    assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
    for name in ATTRIBUTES:
        assert getattr(copy, name, None) == getattr(error, name, None), name
    if isinstance(error, SendFailed):
        assert type(copy.cause) is type(error.cause) or isinstance(copy.cause, ZMemError)  # type: ignore[attr-defined]
        assert str(error.cause) in str(copy.cause)  # type: ignore[attr-defined]


def test_the_kinds_cover_every_public_error() -> None:
    public = {name for name in zmem_client.__all__ if isinstance(getattr(zmem_client, name), type)}
    errors = {name for name in public if issubclass(getattr(zmem_client, name), ZMemError)}
    assert errors <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_error_survives_pickling(kind: str) -> None:
    error = make_error(kind)
    error.add_note("a note")
    copy = pickle.loads(pickle.dumps(error))
    assert_same(copy, error)
    assert copy.__notes__ == ["a note"]


def test_a_worker_pool_passes_every_error_to_the_parent() -> None:
    # An error that doesn't unpickle kills the pool's result thread: map() would never return.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        for kind in KINDS:
            with pytest.raises(ZMemError) as info:
                pool.map_async(raise_error, [kind]).get(timeout=30)
            assert_same(info.value, make_error(kind))


# -- the whole story against a real service, through a faulty proxy ------------------------


class FaultyProxy:
    """An HTTP proxy in front of a real `zmem serve`: POSTs of episodes get the answers in
    `script`, one per request, then go through. A scripted answer may be a function of the
    request's episode ids (which the proxy reads from the safetensors body)."""

    def __init__(self, upstream: str, script: list[Callable[[list[str]], tuple[int, dict, dict]]]) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=30)
        self.script = list(script)
        self.answered: list[tuple[int, list[str]]] = []  # (status, ids) of every POST
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.forward(b"")

            def do_PUT(self) -> None:
                self.forward(self.rfile.read(int(self.headers.get("content-length", 0))))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if not self.path.endswith("/episodes"):
                    return self.forward(body)
                ids = ids_of(httpx.Request("POST", "http://x", content=body))
                with proxy.lock:
                    fault = proxy.script.pop(0) if proxy.script else None
                if fault is None:
                    return self.forward(body)
                status, headers, problem_json = fault(ids)
                proxy.answered.append((status, ids))
                self.reply(
                    status,
                    {**headers, "content-type": "application/problem+json"},
                    json.dumps(problem_json).encode(),
                )

            def forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                r = proxy.upstream.request(self.command, self.path, content=body, headers=headers)
                if self.command == "POST":
                    proxy.answered.append((r.status_code, ids_of(r.request) if body else []))
                keep = ("content-type", "retry-after")
                self.reply(r.status_code, {k: v for k, v in r.headers.items() if k in keep}, r.content)

            def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


@pytest.fixture
def real(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", "--min-size", "1").start()
    yield srv
    srv.stop()


@pytest.mark.e2e
def test_the_sender_stores_every_valid_episode_once_through_every_fault(real: Server) -> None:
    from zmem_service.errors import ValidationFailed

    # The memory weighs lambda_bind heavily: a lambda_bind of 1e10 (finite, >= 0: the client
    # takes it) makes an infinite risk target, which only the service can see.
    with ZMemClient(real.url, memory="faults") as admin:
        admin.configure(z_dim=4, min_size=1, risk={"a": 1.0, "b": 0.2, "c": 1e30, "eps": 1e-8})
    invalid = {"invalid-1", "invalid-2"}
    r = httpx.post(
        f"{real.url}/memories/faults/episodes",
        json={"episodes": [{"z": [0, 0, 0, 0], **GOOD, "lambda_bind": 1e10, "id": "invalid-1"}]},
    )
    assert r.status_code == 422  # genuinely invalid; the service says why:
    assert [e["loc"] for e in r.json()["errors"]] == [["episodes", 0, "cone_vol"]]
    why = r.json()["errors"][0]["msg"]

    def answer(
        status: int, detail: str = "", **headers: str
    ) -> Callable[[list[str]], tuple[int, dict, dict]]:
        return lambda ids: (status, headers, problem(status, detail))

    def too_many(ids: list[str]) -> tuple[int, dict, dict]:
        msg = f"{len(ids)} episodes in one request; the limit is {len(ids) - 1}"
        return 422, {}, ValidationFailed.at(["episodes"], msg).problem()

    def naming_the_invalid(ids: list[str]) -> tuple[int, dict, dict]:
        # The service's own shape (episodes.validate), for the invalid episodes of this request.
        errors = [
            {"loc": ["episodes", i, "cone_vol"], "msg": why} for i, id_ in enumerate(ids) if id_ in invalid
        ]
        detail = f"episodes.{errors[0]['loc'][1]}.cone_vol: {why} (and {len(errors) - 1} more)"
        return 422, {}, ValidationFailed(detail, errors=errors).problem()

    script = [
        answer(408, "request timeout"),
        answer(429, "slow down", **{"Retry-After": "1"}),
        answer(413, "the body is over the limit"),
        answer(500, "a bug"),
        answer(503, "overloaded", **{"Retry-After": "0"}),
        answer(507, "memory budget"),
        too_many,
        naming_the_invalid,
    ]
    valid = [f"valid-{i}" for i in range(41)]
    order = [valid[0], valid[1], "invalid-1", valid[2], valid[3], "invalid-2", *valid[4:]]
    with FaultyProxy(real.url, script) as proxy:
        mem = ZMemClient(proxy.url, memory="faults", timeout=30)
        with one_batch(mem):
            for i, id_ in enumerate(order):
                lam = 1e10 if id_ in invalid else 0.0
                mem.record(np.full(4, i, np.float32), id=id_, soft_bind=0.5, cone_vol=1.0, lambda_bind=lam)
        with pytest.raises(EpisodesDropped) as info:
            mem.flush(timeout=60)
        mem.flush(timeout=5)  # reported once
        mem.close()
    assert not proxy.script, "every fault was answered"
    # One batch of 43: after the 413 its first half (21) meets the next faults; after the
    # unnamed 422 its first half (10) is the one that names the invalid two.
    assert [(status, len(ids)) for status, ids in proxy.answered] == [
        *[(status, 43) for status in (408, 429, 413)],
        *[(status, 21) for status in (500, 503, 507, 422)],
        (422, 10),
        (200, 8),
        (200, 11),
        (200, 22),
    ]
    assert invalid <= set(proxy.answered[7][1])  # the scripted 422 named both invalid episodes
    assert not any(invalid & set(ids) for _, ids in proxy.answered[8:])  # and they never came back
    with ZMemClient(real.url, memory="faults") as reader:
        stored = [str(id_) for id_ in reader.export()["id"]]
    assert sorted(stored) == sorted(valid) and len(stored) == len(set(stored))  # each once
    assert stored == valid  # in the order they were recorded

    e = info.value
    assert mem.dropped == 2 and (e.count, e.total) == (2, 2)
    assert dict(e.reasons) == {id_: f"cone_vol: {why} (422)" for id_ in invalid}
    assert "2 recorded episodes were dropped" in str(e) and "invalid-1: cone_vol" in str(e)
