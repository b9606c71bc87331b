"""The writer: the one thread that changes memories and the store, with group commit.

Every mutation is a writer job: episodes, creating a memory (PUT), deleting one and
importing one; nothing else calls the store. The writer takes every episode write
waiting in the queue, plans each against its memory, reserves the room each needs
(ring, index, budget: this may fail, and then nothing was stored), commits them all
in one transaction, then applies them to the memories and answers each request. A
request is answered only after its commit, so an acknowledged episode survives a
crash; sharing the commit keeps durability cheap under many concurrent writers.
Nothing after a commit can fail for lack of room, and a job that fails changes
nothing.
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
from .errors import Conflict, Unavailable, ZMemError
from .memory import Memory, WritePlan
from .registry import Memories, conflict
from .ring import Columns
from .settings import MemorySettings, MemorySettingsIn
from .store import Store

log = logging.getLogger("zmem")
MAX_GROUP = 256


@dataclass
class Job:
    fn: Callable[[], Any] | None = None  # a non-write job: runs alone in its own transaction
    write: tuple[str, EpisodeBatch] | None = None
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class Writer:
    def __init__(
        self, memories: Memories, store: Store, on_change: Callable[[str], None] | None = None
    ) -> None:
        self.memories = memories
        self.store = store
        self._on_change = on_change or (lambda name: None)
        self.closing = False
        self._queue: queue.Queue[Job | None] = queue.Queue()
        # Per memory object: a re-created memory starts its own count.
        self._trimmed: weakref.WeakKeyDictionary[Memory, int] = weakref.WeakKeyDictionary()
        self._thread = threading.Thread(target=self._run, name="zmem-writer", daemon=True)
        self._thread.start()

    async def write(self, name: str, batch: EpisodeBatch) -> dict[str, Any]:
        """Store a batch of episodes (grouped with other writes into one commit)."""
        return await self._submit(Job(write=(name, batch)))

    async def put(self, name: str, body: MemorySettingsIn) -> tuple[MemorySettings, bool]:
        """Create `name` with settings (or confirm them); whether anything changed."""

        def put() -> tuple[MemorySettings, bool]:
            settings, changed = self.memories.resolve_put(name, body)
            if changed:
                memory = self.memories.new(name, settings)
                self.store.save_memory(name, settings, memory.next_seq, 0, memory.generation)
                self.store.commit()  # the registry follows the store, never leads it
                self.memories.add(memory)
                self._on_change(name)
            return settings, changed

        return await self._call(put)

    async def delete(self, name: str) -> None:
        def delete() -> None:
            memory = self.memories.get(name)
            self.store.delete_memory(name, memory.next_seq)
            self.store.commit()
            self.memories.remove(name)
            self._on_change(name)

        await self._call(delete)

    async def import_rows(self, name: str, settings: MemorySettings, rows: Columns) -> dict[str, Any]:
        """Load exported rows into an empty memory (a fresh incarnation, new generation)."""

        def load() -> dict[str, Any]:
            current = self.memories.find(name)
            if current is not None and current.size:
                raise Conflict(f"memory {name!r} holds {current.size} episodes; import needs an empty memory")
            if current is not None and current.settings.z_dim is not None:
                diffs = current.settings.differences(settings)
                if diffs:
                    raise conflict(name, diffs)
            kept = rows.take(slice(max(0, len(rows) - settings.capacity), None))
            memory = self.memories.new(name, settings)
            assert settings.z_dim is not None
            self.memories.check_budget(memory.bytes_for(kept) - (current.nbytes if current else 0))
            plan = memory.plan_rows(kept)  # the file's seqs are kept
            memory.reserve(plan)
            self.store.save_memory(name, settings, plan.next_seq, plan.total_written, memory.generation)
            self.store.insert(name, kept)
            self.store.commit()
            memory.apply(plan)
            self.memories.add(memory)
            self._on_change(name)
            return {"imported": len(kept), "size": memory.size}

        result: dict[str, Any] = await self._call(load)
        return result

    async def _call(self, fn: Callable[[], Any]) -> Any:
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
        last: dict[str, WritePlan] = {}  # each memory's last accepted plan: the next one follows it
        planned: list[tuple[Job, WritePlan]] = []
        in_group: dict[str, Memory] = {}
        for job in group:
            assert job.write is not None
            name, batch = job.write
            try:
                memory = in_group.get(name) or self.memories.for_write(name)
                in_group[name] = memory
                plan = memory.plan(batch, now, last.get(name))
                unlisted = sum(m.nbytes for m in in_group.values() if self.memories.find(m.name) is not m)
                self.memories.check_budget(plan.new_bytes, unlisted)
                memory.reserve(plan)
                last[name] = plan  # accepted: a refused plan is dropped, and nothing changed
                planned.append((job, plan))
            except BaseException as e:
                self._fail(job, e)
        try:
            for _, plan in planned:
                self.store.insert(plan.memory.name, plan.rows)
            for name, plan in last.items():
                owner = plan.memory
                settings = owner.settings.model_copy(update={"z_dim": plan.z_dim})
                self.store.save_memory(name, settings, plan.next_seq, plan.total_written, owner.generation)
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
            if self.memories.find(memory.name) is not memory:
                self.memories.add(memory)
            memory.apply(plan)
            self._on_change(memory.name)
            job.future.set_result({**plan.reply, "size": memory.size})
        self._trim({plan.memory for _, plan in planned})

    def _trim(self, touched: set[Memory]) -> None:
        """Delete stored rows that have left the ring, every capacity/10 writes per memory."""
        for memory in touched:
            every = max(1000, memory.settings.capacity // 10)
            if memory.total_written - self._trimmed.get(memory, 0) < every:
                continue
            self._trimmed[memory] = memory.total_written
            oldest = memory.oldest_seq()
            if oldest is None:
                continue
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
