"""The event loop's busy polling after a query (`http/busy.py`): it polls for the time
allowed, serves meanwhile, stops when the index thread has work, and reports its spells."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from zmem_client import ZMemClient
from zmem_core.busy import BusyWait
from zmem_service.http.busy import BusyPoll

from ..server import Server


def test_a_kick_keeps_the_loop_polling_for_its_time_and_reports_one_spell() -> None:
    async def main() -> BusyPoll:
        poll = BusyPoll(BusyWait(0.2))
        poll.enter()
        poll.leave()
        await asyncio.sleep(0.01)
        poll.kick()  # more time for the same spell: 0.2 s from now
        for _ in range(300):  # until the spell is over (a loaded machine may take longer)
            await asyncio.sleep(0.01)
            if poll.wait.spells:
                break
        return poll

    poll = asyncio.run(main())
    assert poll.wait.spells == 1 and 0.2 <= poll.seconds < 3


def test_a_query_coming_in_ends_the_spell_and_its_answer_starts_the_next() -> None:
    async def main() -> BusyPoll:
        poll = BusyPoll(BusyWait(1.0))
        poll.enter()
        poll.enter()
        poll.leave()  # another query still in flight: no polling yet
        await asyncio.sleep(0.01)
        assert poll.wait.spells == 0 and poll.seconds == 0
        poll.leave()
        await asyncio.sleep(0.01)
        poll.enter()  # a query came in while polling
        await asyncio.sleep(0.01)
        assert poll.wait.spells == 1 and 0.005 < poll.seconds < 0.5
        poll.leave()
        await asyncio.sleep(0.01)
        poll.wait.seconds = 0.001  # let the second spell end soon
        poll.kick()
        await asyncio.sleep(0.01)
        return poll

    assert asyncio.run(main()).wait.spells == 2


def test_polling_turns_the_loop_over_instead_of_sleeping() -> None:
    async def turns(poll: BusyPoll) -> int:
        loop = asyncio.get_running_loop()
        n = 0
        original = loop._run_once  # type: ignore[attr-defined]  # asyncio's loop turn

        def counted() -> None:
            nonlocal n
            n += 1
            original()

        loop._run_once = counted  # type: ignore[attr-defined]
        poll.kick()
        await asyncio.sleep(0.03)
        return n

    assert asyncio.run(turns(BusyPoll(BusyWait(0.02)))) > 100  # turning over while it polls
    assert asyncio.run(turns(BusyPoll(BusyWait(0)))) < 10  # asleep until the timer


def test_polling_stops_as_soon_as_the_index_thread_has_work() -> None:
    async def main() -> float:
        queued = [False]
        poll = BusyPoll(BusyWait(1.0), quiet=lambda: not queued[0])
        poll.kick()
        await asyncio.sleep(0.01)
        queued[0] = True
        await asyncio.sleep(0.01)
        return poll.seconds

    assert 0.005 < asyncio.run(main()) < 0.5


@pytest.mark.e2e
@pytest.mark.parametrize("seconds", ["0.001", "0"])
def test_a_real_server_polls_after_queries_only_when_allowed(tmp_path: Path, seconds: str) -> None:
    srv = Server(tmp_path / "data", "--min-size", "1", "--durability", "none", "--busy-poll", seconds).start()
    try:
        with ZMemClient(srv.url, timeout=10) as mem:
            for i in range(20):
                mem.record(np.full(4, float(i), np.float32), soft_bind=0.5, cone_vol=1.0, lambda_bind=0.1)
            mem.flush()
            for _ in range(20):
                mem.risk(torch.zeros(1, 4))
            assert mem._source.busy_wait.spells > 0  # the client polled for its answers
        text = httpx.get(f"{srv.url}/metrics").text
        polled = next(
            float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("zmem_busy_poll_seconds_total")
        )
        assert (polled > 0) == (seconds != "0")
    finally:
        srv.stop()
