"""The writer's group commit, driven directly: many requests, one transaction, right counters."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from zmem_service.episodes import EpisodeBatch
from zmem_service.registry import Memories
from zmem_service.ring import FLOAT_FIELDS
from zmem_service.settings import ServiceSettings
from zmem_service.store import SqliteStore
from zmem_service.writer import Writer


def batch(n: int, d: int, tag: str) -> EpisodeBatch:
    return EpisodeBatch(
        z=np.ones((n, d), np.float32),
        values={f: np.full(n, 0.5, np.float32) for f in FLOAT_FIELDS},
        ids=[f"{tag}{i}" for i in range(n)],
        workers=[None] * n,
    )


def test_concurrent_writes_to_several_memories_share_commits(tmp_path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, capacity=100)
    memories = Memories(settings)
    store = SqliteStore(tmp_path)
    commits = 0
    real_commit = store.commit

    def counting_commit() -> None:
        nonlocal commits
        commits += 1
        real_commit()

    store.commit = counting_commit  # type: ignore[method-assign]
    writer = Writer(memories, store)

    async def burst() -> list[dict]:
        jobs = [
            writer.write(name, batch(3, 2 if name == "a" else 4, f"{name}{j}-"))
            for j in range(40)
            for name in ("a", "b")
        ]
        return await asyncio.gather(*jobs)

    replies = asyncio.run(burst())
    writer.close()
    assert all(r["accepted"] == 3 for r in replies)
    assert commits < len(replies)  # grouped: fewer commits than requests
    for name in ("a", "b"):
        seqs = sorted(
            s for r in replies[(name == "b") :: 2] for s in range(r["first_seq"], r["last_seq"] + 1)
        )
        assert seqs == list(range(1, 121))
    stored = {m.name: m for m in SqliteStore(tmp_path).load()[0]}
    assert stored["a"].total_written == stored["b"].total_written == 120
    assert stored["a"].next_seq == stored["b"].next_seq == 121
    assert len(stored["a"].rows) == len(stored["b"].rows) == 100  # trimmed to capacity on load
    assert stored["b"].settings.z_dim == 4


def test_a_request_that_went_away_leaves_the_writer_working(tmp_path) -> None:
    memories = Memories(ServiceSettings(data_dir=tmp_path))
    writer = Writer(memories, SqliteStore(tmp_path))
    hold = threading.Event()
    blocker = writer._call(lambda: hold.wait(10))

    async def main() -> dict:
        first = asyncio.ensure_future(blocker)
        gone = asyncio.ensure_future(writer.write("default", batch(2, 3, "gone")))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client disconnected while its write was queued
        await asyncio.sleep(0.05)  # the cancellation reaches the queued job on the next loop turn
        hold.set()
        await first
        return await asyncio.wait_for(writer.write("default", batch(2, 3, "kept")), 10)

    reply = asyncio.run(main())
    writer.close()
    assert reply["accepted"] == 2 and reply["size"] == 2  # the cancelled write was skipped
