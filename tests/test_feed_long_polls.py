"""Long polls of the changes feed have a cap of their own and never hold up anything else."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from zmem_client import ZMemClient

from .server import Server
from .test_changes import eps


@pytest.mark.e2e
def test_past_the_cap_long_polls_answer_at_once_and_the_rest_still_answers(tmp_path) -> None:
    cap = 4
    srv = Server(tmp_path / "data", "--capacity", "1000", "--min-size", "1", "--max-long-polls", str(cap))
    srv.start()
    try:
        httpx.post(srv.url + "/episodes", json={"episodes": eps(3)}).raise_for_status()
        gen = httpx.get(srv.url + "/changes").json()["generation"]
        params = {"after": 3, "generation": gen, "wait": 20}
        answers: list[dict] = []

        def follow() -> None:
            answers.append(httpx.get(srv.url + "/changes", params=params, timeout=30).json())

        threads = [threading.Thread(target=follow) for _ in range(cap)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the cap's worth of long polls waiting
        assert not answers

        # One more: the cap is reached, so it answers at once, as with wait=0.
        t0 = time.monotonic()
        extra = httpx.get(srv.url + "/changes", params=params, timeout=30).json()
        assert time.monotonic() - t0 < 2 and extra["seq"] == [] and extra["complete"] is True

        # /healthz, a write and risk() answer at once while the cap's long polls wait.
        t0 = time.monotonic()
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        with ZMemClient(srv.url, timeout=5) as mem:
            mem.risk([0.0, 0.5, -1.0])
        assert time.monotonic() - t0 < 2
        assert not answers  # nothing written yet: they still wait
        t0 = time.monotonic()
        httpx.post(srv.url + "/episodes", json={"episodes": eps(2, 3)}, timeout=5).raise_for_status()
        assert time.monotonic() - t0 < 2
        for t in threads:
            t.join(10)
        assert [a["seq"] for a in answers] == [[4, 5]] * cap  # the write woke them all

        # The cap counts waiting polls only: they have answered, so the next one waits again.
        t0 = time.monotonic()
        idle = httpx.get(srv.url + "/changes", params={**params, "after": 5, "wait": 0.5}, timeout=10)
        assert idle.json()["seq"] == [] and time.monotonic() - t0 >= 0.5
    finally:
        srv.stop()
