"""The changes feed's pages are built for caches: validators, freshness, 304, one page per position."""

from __future__ import annotations

import threading
import time

import pytest

from .test_changes import eps

ST = "application/x-safetensors"
IMMUTABLE = "public, max-age=31536000, immutable"
TAIL = "public, max-age=1"


def test_pages_below_the_head_are_immutable_the_tail_lasts_a_second(make_client) -> None:
    client = make_client(capacity=100, min_size=1)
    client.post("/episodes", json={"episodes": eps(30)})
    gen = client.get("/changes", params={"limit": 1}).json()["generation"]

    below = client.get("/changes", params={"after": 10, "generation": gen, "limit": 5})
    assert below.json()["complete"] is False and below.json()["seq"] == [11, 12, 13, 14, 15]
    assert below.headers["cache-control"] == IMMUTABLE
    assert below.headers["etag"].startswith('W/"') and below.headers["vary"] == "Accept, Authorization"

    tail = client.get("/changes", params={"after": 25, "generation": gen})
    assert tail.json()["complete"] is True and tail.headers["cache-control"] == TAIL
    # Asked without a generation, or answered with a reset: another incarnation may answer next.
    assert client.get("/changes", params={"after": 10, "limit": 5}).headers["cache-control"] == TAIL
    reset = client.get("/changes", params={"after": 10, "generation": "other", "limit": 5})
    assert reset.json()["reset"] is True and reset.headers["cache-control"] == TAIL


def test_if_none_match_gets_304_until_the_page_changes(make_client) -> None:
    client = make_client(capacity=100, min_size=1)
    client.post("/episodes", json={"episodes": eps(10)})
    gen = client.get("/changes", params={"limit": 1}).json()["generation"]
    params = {"after": 5, "generation": gen}

    first = client.get("/changes", params=params)
    etag = first.headers["etag"]
    again = client.get("/changes", params=params, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag and again.headers["cache-control"] == TAIL
    listed = client.get("/changes", params=params, headers={"if-none-match": f'W/"x", {etag}'})
    assert listed.status_code == 304
    assert client.get("/changes", params=params, headers={"if-none-match": "*"}).status_code == 304

    # The same page in another format is another representation: its own validator.
    st = client.get("/changes", params=params, headers={"accept": ST})
    assert st.headers["content-type"] == ST and st.headers["etag"] != etag
    other = client.get("/changes", params=params, headers={"if-none-match": etag, "accept": ST})
    assert other.status_code == 200

    # New rows: the tail is another page now.
    client.post("/episodes", json={"episodes": eps(2, 10)})
    grown = client.get("/changes", params=params, headers={"if-none-match": etag})
    assert grown.status_code == 200 and grown.json()["seq"] == [6, 7, 8, 9, 10, 11, 12]
    assert grown.headers["etag"] != etag

    # A page below the head keeps its validator as the head moves on (its rows don't change).
    below = {"after": 2, "generation": gen, "limit": 3}
    tag = client.get("/changes", params=below).headers["etag"]
    client.post("/episodes", json={"episodes": eps(5, 12)})
    assert client.get("/changes", params=below, headers={"if-none-match": tag}).status_code == 304


def test_a_validator_never_lets_a_caller_past_auth(make_client) -> None:
    client = make_client(token="w-secret", read_token="r-secret", min_size=1)
    read = {"authorization": "Bearer r-secret"}
    client.post("/episodes", json={"episodes": eps(3)}, headers={"authorization": "Bearer w-secret"})
    page = client.get("/changes", headers=read)
    assert page.status_code == 200
    etag = page.headers["etag"]
    assert client.get("/changes", headers={**read, "if-none-match": etag}).status_code == 304
    assert client.get("/changes", headers={"if-none-match": etag}).status_code == 401
    wrong = {"authorization": "Bearer nope", "if-none-match": etag}
    assert client.get("/changes", headers=wrong).status_code in (401, 403)


def test_concurrent_identical_long_polls_share_one_page(make_client) -> None:
    client = make_client(capacity=1000, min_size=1)
    zmem = client.app.state.zmem
    client.post("/episodes", json={"episodes": eps(3)})
    gen = client.get("/changes", params={"limit": 1}).json()["generation"]
    n = 20
    answers: list[tuple[bytes, str]] = []

    def follow() -> None:
        r = client.get("/changes", params={"after": 3, "generation": gen, "wait": 20}, headers={"accept": ST})
        answers.append((r.content, r.headers["etag"]))

    threads = [threading.Thread(target=follow) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while zmem.long_polls < n:
        assert time.monotonic() < deadline, f"{zmem.long_polls} long polls waiting, not {n}"
        time.sleep(0.01)
    computed = zmem.pages.computed
    t0 = time.monotonic()
    client.post("/episodes", json={"episodes": eps(2, 3)})
    for t in threads:
        t.join(25)
    assert len(answers) == n and time.monotonic() - t0 < 5
    assert len(set(answers)) == 1  # one body, one validator
    assert zmem.pages.computed - computed == 1  # one page cut for all twenty
    assert zmem.long_polls == 0


@pytest.mark.parametrize("sigma", [1.0, "auto"])
def test_pages_are_cut_without_the_index_thread(make_client, sigma) -> None:
    """A page never waits for searches: with the index thread held, the feed still answers
    (sigma "auto" from the value kept for the memory's state)."""
    client = make_client(capacity=1000, min_size=1, sigma=sigma)
    zmem = client.app.state.zmem
    client.post("/episodes", json={"episodes": eps(20)})
    assert client.post("/risk", json={"z": [0.0, 0.5, -1.0], "sigma": "auto"}).status_code == 200
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    zmem.index_thread.call(hold)
    assert held.wait(5)
    try:
        t0 = time.monotonic()
        page = client.get("/changes", params={"after": 15}).json()
        assert time.monotonic() - t0 < 2 and page["seq"] == [16, 17, 18, 19, 20]
        assert page["sigma_auto"] is not None  # kept by the query above, for this very state
    finally:
        release.set()
