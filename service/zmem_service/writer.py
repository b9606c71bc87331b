"""The writer: the one thread that changes memories and the store, with group commit.

Requests queue jobs; the writer takes every write waiting in the queue, plans each
against its memory, commits them all in one transaction, then applies them to the
rings and answers each request. A request is answered only after its commit, so an
acknowledged episode survives a crash; sharing the commit keeps durability cheap
under many concurrent writers. A job that fails changes nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .episodes import EpisodeBatch
from .errors import Unavailable, ZMemError
from .memory import Memory, Pending, WritePlan
from .registry import Memories
from .store import Store

log = logging.getLogger("zmem")
MAX_GROUP = 256


@dataclass
class Job:
    fn: Callable[[], Any] | None = None  # a non-write job: runs alone in its own transaction
    write: tuple[str, EpisodeBatch] | None = None
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class Writer:
    def __init__(self, memories: Memories, store: Store) -> None:
        self.memories = memories
        self.store = store
        self.closing = False
        self._queue: queue.Queue[Job | None] = queue.Queue()
        # Per memory object: a re-created memory starts its own count.
        self._trimmed: weakref.WeakKeyDictionary[Memory, int] = weakref.WeakKeyDictionary()
        self._thread = threading.Thread(target=self._run, name="zmem-writer", daemon=True)
        self._thread.start()

    async def write(self, name: str, batch: EpisodeBatch) -> dict[str, Any]:
        return await self._submit(Job(write=(name, batch)))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the writer thread inside a transaction committed when it returns."""
        return await self._submit(Job(fn=fn))

    async def _submit(self, job: Job) -> Any:
        if self.closing:
            raise Unavailable("the service is shutting down")
        if self._queue.qsize() >= self.memories.settings.max_pending_writes:
            raise Unavailable("too many writes are waiting; retry with backoff")
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def close(self) -> None:
        """Finish every queued job, then stop and close the store."""
        self.closing = True
        self._queue.put(None)
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            while len(jobs) < MAX_GROUP and jobs[-1] is not None:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            group: list[Job] = []
            for job in jobs:
                # Claim the job; one whose request went away (future cancelled) is skipped.
                if job is not None and not job.future.set_running_or_notify_cancel():
                    continue
                if job is not None and job.write is not None:
                    group.append(job)
                    continue
                self._guarded(group, self._write_group)
                group = []
                if job is None:
                    return
                self._guarded([job], self._run_alone)
            self._guarded(group, self._write_group)

    def _guarded(self, jobs: list[Job], step: Callable[[list[Job]], None]) -> None:
        """Run a step; should it break, fail its unanswered jobs and keep the writer alive."""
        if not jobs:
            return
        try:
            step(jobs)
        except Exception as e:
            log.exception("writer step failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(Unavailable(f"internal error while writing: {e}"))

    def _run_alone(self, jobs: list[Job]) -> None:
        (job,) = jobs
        try:
            assert job.fn is not None
            result = job.fn()
            self.store.commit()
        except BaseException as e:
            self.store.rollback()
            self._fail(job, e)
        else:
            job.future.set_result(result)

    def _write_group(self, group: list[Job]) -> None:
        now = time.time()
        pending: dict[str, Pending] = {}
        planned: list[tuple[Job, WritePlan]] = []
        reserved = 0
        in_group: dict[str, Memory] = {}
        for job in group:
            assert job.write is not None
            name, batch = job.write
            try:
                memory = in_group.get(name) or self.memories.for_write(name)
                in_group[name] = memory
                p = pending.setdefault(name, memory.pending())
                before = (p.next_seq, p.count, set(p.ids), p.z_dim)
                plan = memory.plan(batch, now, p)
                try:
                    self.memories.check_budget(reserved + plan.new_bytes)
                except ZMemError:
                    p.next_seq, p.count, p.ids, p.z_dim = before
                    raise
                reserved += plan.new_bytes
                planned.append((job, plan))
            except BaseException as e:
                self._fail(job, e)
        try:
            for _, plan in planned:
                self.store.insert(plan.memory.name, plan.rows)
            for name, p in pending.items():
                owner = planned_memory(planned, name)
                if owner is not None:
                    settings = owner.settings.model_copy(update={"z_dim": p.z_dim})
                    self.store.save_memory(name, settings, p.next_seq, owner.total_written + p.count)
            self.store.commit()
        except Exception as e:
            self.store.rollback()
            if len(planned) > 1:
                # Nothing was applied: retry each job alone, so one bad job fails by itself.
                for job, _ in planned:
                    self._write_group([job])
                return
            log.exception("commit failed")
            for job, _ in planned:
                self._fail(job, Unavailable(f"the store could not commit: {e}"))
            return
        for job, plan in planned:
            memory = plan.memory
            if memory.name not in self.memories:
                self.memories.add(memory)
            memory.apply(plan.rows)
            job.future.set_result({**plan.reply, "size": memory.size})
        self._trim({plan.memory for _, plan in planned})

    def _trim(self, touched: set[Memory]) -> None:
        """Delete stored rows that have left the ring, every capacity/10 writes per memory."""
        for memory in touched:
            every = max(1000, memory.settings.capacity // 10)
            if memory.total_written - self._trimmed.get(memory, 0) < every:
                continue
            self._trimmed[memory] = memory.total_written
            with memory.lock:
                ring = memory.ring
                if ring is None or ring.size == 0:
                    continue
                oldest = int(ring.column("seq")[ring.order()[0]])
            try:
                self.store.trim(memory.name, oldest)
                self.store.commit()
            except Exception:
                self.store.rollback()
                log.exception("trimming %r failed; will retry", memory.name)

    @staticmethod
    def _fail(job: Job, e: BaseException) -> None:
        if not isinstance(e, ZMemError):
            log.exception("write job failed", exc_info=e)
            e = Unavailable(f"internal error while writing: {type(e).__name__}")
        job.future.set_exception(e)


def planned_memory(planned: list[tuple[Job, WritePlan]], name: str) -> Memory | None:
    return next((plan.memory for _, plan in planned if plan.memory.name == name), None)
