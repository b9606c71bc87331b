"""The replica against a feed that fails, lies or attacks: it never answers with a sigma it
does not know, never reads more of a page than the page can hold, never applies a page that
disagrees with itself or with the mirror, and raises only the client's own errors.

The feed is `test_replica`'s in-memory model served through httpx.MockTransport, wrapped
where a test needs it to misbehave."""

from __future__ import annotations

import json
import resource
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

from zmem_client import RequestRejected, Timeout, ZMemError
from zmem_client._replica import Replica, ReplicaError

from . import test_replica as base
from .replica_client import ReplicaClient
from .test_replica import FakeFeed, FakeMemory, assert_agrees, oracle, replica_answer, rows, wait_for

SAFETENSORS = "application/x-safetensors"
MiB = 2**20


class AutoFeed(FakeFeed):
    """A feed that sends the value of sigma "auto" as the service does: only while the memory's
    sigma is "auto" or once a follower has asked for it (`auto=true`)."""

    def __init__(self) -> None:
        super().__init__()
        self._asking = threading.local()
        self.asked = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        self._asking.value = request.url.params.get("auto") == "true"
        return super().handle(request)

    def create(self, name: str = "default", **kw: Any) -> FakeMemory:
        mem = super().create(name, **kw)
        value = mem.sigma_auto
        mem.true_sigma_auto = value  # type: ignore[attr-defined]

        def sent() -> float | None:
            self.asked = self.asked or getattr(self._asking, "value", False)
            return value() if mem.settings["sigma"] == "auto" or self.asked else None

        mem.sigma_auto = sent  # type: ignore[method-assign]
        return mem


class Hostile:
    """A feed whose answers to `GET …/changes` a test replaces (`answer`) or rewrites (`corrupt`),
    counting the bytes each answer's body handed over."""

    def __init__(self, feed: FakeFeed) -> None:
        self.feed = feed
        self.answer: Callable[[httpx.Request], httpx.Response] | None = None
        self.corrupt: Callable[[dict[str, np.ndarray], dict[str, Any]], Any] | None = None
        self.sent: list[int] = []  # bytes handed over, per answer given by `answer`
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/changes"):
            return self.feed.handle(request)
        if self.answer is not None:
            return self.answer(request)
        r = self.feed.handle(request)
        corrupt = self.corrupt
        if corrupt is None or r.status_code != 200:
            return r
        arrays, meta = split(r.content)
        if not len(arrays["seq"]):
            return r  # only pages with rows are corrupted: the mirror must refuse what they bring
        out = corrupt({key: value.copy() for key, value in arrays.items()}, meta)
        body = out if isinstance(out, bytes) else page(*out)
        return httpx.Response(200, content=body, headers={"content-type": SAFETENSORS})

    def endless(self, first: bytes, total: int = 2**30) -> Iterator[bytes]:
        """`first`, then zeros up to `total` bytes, made one MiB at a time as they are read."""
        self.sent.append(0)
        at = len(self.sent) - 1

        def body() -> Iterator[bytes]:
            self.sent[at] += len(first)
            yield first
            chunk = bytes(MiB)
            while self.sent[at] < total:
                self.sent[at] += len(chunk)
                yield chunk

        return body()


def split(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    (n,) = struct.unpack("<Q", body[:8])
    raw = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
    return safetensors.numpy.load(body), {key: json.loads(value) for key, value in raw.items()}


def page(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    return safetensors.numpy.save(arrays, metadata={key: json.dumps(value) for key, value in meta.items()})


def max_rss() -> int:
    """The process's peak resident set, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture
def make_replica() -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(transport: httpx.BaseTransport, prefix: str = "/", **kw: Any) -> Replica:
        kw.setdefault("poll_wait", 0.5)
        kw.setdefault("timeout", 5.0)
        rep = ReplicaClient("http://zmem.test", prefix, transport=transport, **kw)
        made.append(rep)
        return rep

    yield make
    for rep in made:
        rep.close()


# -- sigma "auto" -------------------------------------------------------------------------


def test_first_sigma_auto_asks_the_service(make_replica: Callable[..., Replica]) -> None:
    feed = AutoFeed()
    rng = np.random.default_rng(20)
    mem = feed.create(capacity=100, min_size=5, sigma=1.0)
    feed.append(*rows(rng, 60))
    rep = make_replica(feed.transport)
    q = torch.from_numpy(rng.standard_normal((3, base.D)))
    assert_agrees(rep, feed, q, 8, 1.0)
    assert rep.state.sigma_auto is None  # nobody asked: the feed did not send it
    assert_agrees(rep, feed, q, 8, mem.true_sigma_auto(), sigma="auto")  # type: ignore[attr-defined]
    feed.append(*rows(rng, 30))
    rep.sync()  # the feed now sends it with every page that reaches the newest row
    assert_agrees(rep, feed, q, 8, mem.true_sigma_auto(), sigma="auto")  # type: ignore[attr-defined]


def test_sigma_auto_never_known_raises_through_an_outage(make_replica: Callable[..., Replica]) -> None:
    """The first "auto" during an outage raised once, then every call used
    σ = 1.0 without a word. Until the replica knows the value, every call raises."""
    feed = AutoFeed()
    rng = np.random.default_rng(21)
    mem = feed.create(capacity=100, min_size=5, sigma=1.0)
    feed.append(*rows(rng, 60))
    rep = make_replica(feed.transport, timeout=1.0)
    q = torch.from_numpy(rng.standard_normal((3, base.D)))
    assert_agrees(rep, feed, q, 8, 1.0)
    feed.down = True
    with feed.cond:
        feed.cond.notify_all()  # end the long poll in flight
    for attempt in range(4):
        with pytest.raises(ReplicaError, match='sigma "auto" has no known value'):
            rep.risk_and_size(q, sigma="auto")
        with pytest.raises(ReplicaError, match='sigma "auto" has no known value'):
            rep.neighbors(q.numpy(), sigma="auto")
        if attempt == 1:
            time.sleep(1.1)  # past AUTO_RETRY: the next call asks the service again, and fails again
    assert_agrees(rep, feed, q, 8, 1.0)  # a numeric sigma still answers from the last state
    assert rep.state.sigma_auto is None
    feed.down = False

    def answers() -> bool:
        try:
            rep.risk_and_size(q, sigma="auto")
        except ReplicaError:
            return False
        return True

    wait_for(answers)
    value = mem.true_sigma_auto()  # type: ignore[attr-defined]
    assert_agrees(rep, feed, q, 8, value, sigma="auto")
    assert rep.neighbors(q.numpy(), sigma="auto")["sigma"] == value


def test_sigma_auto_of_an_inactive_memory_is_one(make_replica: Callable[..., Replica]) -> None:
    """As on the service; no request is needed for it, so it answers during an outage too."""
    feed = AutoFeed()
    feed.create(capacity=100, min_size=50, sigma=1.0)
    feed.append(*rows(np.random.default_rng(22), 10))
    rep = make_replica(feed.transport)
    rep.sync()
    feed.down = True
    with feed.cond:
        feed.cond.notify_all()
    nb = rep.neighbors(np.ones(base.D, np.float32), sigma="auto")
    assert nb["sigma"] == 1.0 and nb["k"] == 0
    assert float(rep.risk_and_size(torch.ones(base.D), sigma="auto")[0]) == 0.0


# -- what the replica reads ---------------------------------------------------------------


def gzip_zeros(total: int) -> Iterator[bytes]:
    packer = zlib.compressobj(wbits=31)
    chunk = bytes(MiB)
    for _ in range(total // MiB):
        yield packer.compress(chunk)
    yield packer.flush()


@pytest.mark.parametrize(
    "kind", ["declared", "garbage", "huge table", "trailing", "gzip", "error answer", "dribble"]
)
def test_an_endless_answer_is_cut_off_at_its_cap(make_replica: Callable[..., Replica], kind: str) -> None:
    """A 1 GB page took 2.9 GB of RSS with replica_max_bytes 64 MiB. The
    replica reads at most what the page it asked for can hold, and refuses the rest."""
    feed = FakeFeed()
    feed.create(capacity=1000, min_size=1)
    feed.append(*rows(np.random.default_rng(23), 100))
    hostile = Hostile(feed)
    good = feed.handle(httpx.Request("GET", "http://zmem.test/changes?after=0&limit=1000")).content
    _, meta = split(good)

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": SAFETENSORS}
        if kind == "declared":  # a Content-Length past the cap: refused before a byte is read
            headers["content-length"] = str(2**30)
            return httpx.Response(200, content=hostile.endless(b""), headers=headers)
        if kind == "garbage":  # no safetensors header at all
            return httpx.Response(200, content=hostile.endless(b"\xff" * 64), headers=headers)
        if kind == "huge table":  # a header that declares 10⁸ rows
            n = 10**8
            table = {
                "z": {"dtype": "F32", "shape": [n, base.D], "data_offsets": [0, 16 * n]},
                "risk_target": {"dtype": "F32", "shape": [n], "data_offsets": [16 * n, 20 * n]},
                "seq": {"dtype": "I64", "shape": [n], "data_offsets": [20 * n, 28 * n]},
                "__metadata__": {key: json.dumps(value) for key, value in meta.items()},
            }
            head = json.dumps(table).encode()
            return httpx.Response(
                200, content=hostile.endless(struct.pack("<Q", len(head)) + head), headers=headers
            )
        if kind == "trailing":  # a good page, then a gigabyte more
            return httpx.Response(200, content=hostile.endless(good), headers=headers)
        if kind == "gzip":  # a gigabyte of zeros in a megabyte: refused unread (identity was asked for)
            headers["content-encoding"] = "gzip"
            hostile.sent.append(0)
            return httpx.Response(200, content=gzip_zeros(2**30), headers=headers)
        if kind == "error answer":  # an error whose body never ends
            return httpx.Response(500, content=hostile.endless(b'{"title": "'), headers=headers)
        assert kind == "dribble"  # a good page one byte at a time, past the request's deadline
        hostile.sent.append(0)

        def dribble() -> Iterator[bytes]:
            for byte in good:
                hostile.sent[-1] += 1
                time.sleep(0.02)
                yield bytes([byte])

        return httpx.Response(200, content=dribble(), headers=headers)

    hostile.answer = answer
    before = max_rss()
    rep = make_replica(hostile.transport, timeout=1.0, max_bytes=64 * MiB)
    expected: type[ZMemError] = Timeout if kind in ("error answer", "dribble") else ReplicaError
    with pytest.raises(expected) as caught:
        rep.risk_and_size(torch.ones(base.D))
    if expected is ReplicaError:
        assert "refused" in str(caught.value)
    wait_for(lambda: rep.feed_errors >= 1)
    rep.close()
    assert isinstance(rep.last_feed_error, ZMemError)
    assert hostile.sent, "the feed was never asked"
    limit = {"trailing": len(good) + MiB, "dribble": len(good) // 2}.get(kind, MiB + 64)
    assert max(hostile.sent) <= limit, hostile.sent
    assert max_rss() - before < 256 * MiB


# -- what the replica applies -------------------------------------------------------------


def _with_nan(z: np.ndarray) -> np.ndarray:
    z[-1, 0] = np.nan
    return z


def _other_generation(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    meta.update(generation="another", reset=True)
    return arrays, meta


CORRUPTIONS: dict[str, Callable[[dict[str, np.ndarray], dict[str, Any]], Any]] = {
    # z columns that disagree with the settings, on a new generation and on the same one
    "z narrower than z_dim, new generation": lambda a, m: _other_generation(
        a, {**m, "settings": {**m["settings"], "z_dim": 2 * base.D}}
    ),
    "z wider than z_dim": lambda a, m: (
        {**a, "z": np.concatenate([a["z"], a["z"]], axis=1)},
        m,
    ),
    "columns of different lengths": lambda a, m: ({**a, "risk_target": a["risk_target"][:-1]}, m),
    "z as float64": lambda a, m: ({**a, "z": a["z"].astype(np.float64)}, m),
    "seq as float32": lambda a, m: ({**a, "seq": a["seq"].astype(np.float32)}, m),
    "a NaN in z": lambda a, m: ({**a, "z": _with_nan(a["z"])}, m),
    "an overflowing z": lambda a, m: ({**a, "z": np.full_like(a["z"], 3e38)}, m),
    "an infinite risk target": lambda a, m: ({**a, "risk_target": np.full_like(a["risk_target"], np.inf)}, m),
    "seqs descending": lambda a, m: ({**a, "seq": a["seq"][::-1].copy()}, m),
    "seqs past next_seq": lambda a, m: (a, {**m, "next_seq": int(a["seq"][0])}),
    "rows already held, no reset": lambda a, m: ({**a, "seq": a["seq"] - 3}, m),
    "settings k 0": lambda a, m: (a, {**m, "settings": {**m["settings"], "k": 0}}),
    "settings sigma a word": lambda a, m: (a, {**m, "settings": {**m["settings"], "sigma": "wide"}}),
    "settings capacity a string": lambda a, m: (a, {**m, "settings": {**m["settings"], "capacity": "50"}}),
    "no settings": lambda a, m: (a, {key: value for key, value in m.items() if key != "settings"}),
    "sigma_auto NaN": lambda a, m: (a, {**m, "sigma_auto": float("nan")}),
    "sigma_auto negative": lambda a, m: (a, {**m, "sigma_auto": -1.0}),
    "size past capacity": lambda a, m: (a, {**m, "size": 10**6}),
    "another tensor": lambda a, m: ({**a, "extra": np.zeros(3, np.float32)}, m),
    "truncated": lambda a, m: page(a, m)[:-5],
    "not safetensors": lambda a, m: b"{}",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_page_that_disagrees_with_itself_is_refused(
    make_replica: Callable[..., Replica], corruption: str
) -> None:
    """Pages whose z columns disagreed with their settings were applied, and
    every risk() then raised ValueError. A bad page is refused whole: the replica keeps
    answering from its last good state, the feed error is the client's own, and once the
    service mends the replica catches up."""
    feed = FakeFeed()
    rng = np.random.default_rng(24)
    feed.create(capacity=50, min_size=1, sigma="auto")
    feed.append(*rows(rng, 30))
    hostile = Hostile(feed)
    rep = make_replica(hostile.transport)
    q = torch.from_numpy(rng.standard_normal((3, base.D)))
    sigma = feed.memories["default"].sigma_auto()
    assert_agrees(rep, feed, q, 8, sigma)
    before, grad, _ = replica_answer(rep, q)
    held = rep.state
    errors = rep.feed_errors

    hostile.corrupt = CORRUPTIONS[corruption]
    feed.append(*rows(rng, 10))
    wait_for(lambda: rep.feed_errors >= errors + 2)  # refused, asked again, refused again
    assert isinstance(rep.last_feed_error, ReplicaError), repr(rep.last_feed_error)
    for _ in range(3):
        risk, g, size = replica_answer(rep, q)
        assert size == 30
        torch.testing.assert_close(risk, before, rtol=0, atol=0)
        torch.testing.assert_close(g, grad, rtol=0, atol=0)
    assert rep.state.generation == held.generation and rep.state.next_seq == held.next_seq
    assert rep.state.sigma_auto == held.sigma_auto and rep.state.settings == held.settings

    hostile.corrupt = None
    rep.sync()
    assert_agrees(rep, feed, q, 8, feed.memories["default"].sigma_auto())


def test_refused_pages_surface_through_strict(make_replica: Callable[..., Replica]) -> None:
    feed = FakeFeed()
    rng = np.random.default_rng(25)
    feed.create(capacity=50, min_size=1)
    feed.append(*rows(rng, 20))
    hostile = Hostile(feed)
    rep = make_replica(hostile.transport, max_lag=0.2, strict=True)
    rep.sync()
    hostile.corrupt = CORRUPTIONS["z wider than z_dim"]
    feed.append(*rows(rng, 5))
    with feed.cond:
        feed.cond.notify_all()
    wait_for(lambda: rep.lag().seconds > 0.2 and rep.feed_errors > 0)
    with pytest.raises(ReplicaError, match=r"max_lag.*z has 8 columns; its settings say z_dim 4"):
        rep.risk_and_size(torch.ones(base.D))


def test_first_sync_from_refused_pages_says_why(make_replica: Callable[..., Replica]) -> None:
    feed = FakeFeed()
    feed.create(capacity=50, min_size=1)
    feed.append(*rows(np.random.default_rng(26), 20))
    hostile = Hostile(feed)
    hostile.corrupt = CORRUPTIONS["columns of different lengths"]
    rep = make_replica(hostile.transport, timeout=0.5)
    with pytest.raises(ReplicaError, match=r"refused.*columns disagree in length"):
        rep.risk_and_size(torch.ones(base.D))
    with pytest.raises(ReplicaError, match="columns disagree in length"):
        rep.sync()


def test_new_generation_with_another_z_dim_resets_to_it(
    make_replica: Callable[..., Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a re-create with another z_dim, a query of the old width raised a
    builtin ValueError; the service answers it with a 422, and so does the replica now."""
    feed = FakeFeed()
    rng = np.random.default_rng(27)
    feed.create(capacity=50, min_size=1)
    feed.append(*rows(rng, 40))
    rep = make_replica(feed.transport)
    q4 = torch.from_numpy(rng.standard_normal((2, base.D)))
    assert_agrees(rep, feed, q4, 8, 1.0)
    first = rep.state.generation

    feed.delete()
    monkeypatch.setattr(base, "D", 2 * base.D)  # the fake feed's rows are now 8 wide
    feed.create(capacity=50, min_size=1)
    feed.append(*rows(rng, 25))
    rep.sync()
    assert rep.state.generation != first and rep.state.z_dim == base.D == 8
    assert rep.state.z.shape[1] == 8 and rep.resets == 1
    q8 = torch.from_numpy(rng.standard_normal((2, 8)))
    assert_agrees(rep, feed, q8, 8, 1.0)
    for call in (lambda: rep.risk_and_size(q4), lambda: rep.neighbors(q4.numpy())):
        with pytest.raises(RequestRejected, match="z has 4 dimensions; the memory has z_dim 8") as caught:
            call()
        assert caught.value.status == 422 and caught.value.problem["errors"][0]["loc"] == ["z"]
    want = oracle(feed, q8, 8, 1.0)
    np.testing.assert_array_equal(rep.neighbors(q8.numpy())["seq"], want["seq"])
