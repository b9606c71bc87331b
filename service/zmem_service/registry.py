"""The memories a service holds, by name, and the rules for creating and replacing them."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from zmem_core import names

from .errors import Conflict, InsufficientStorage, NotFound, ValidationFailed
from .index import CpuEngine, Engine
from .memory import Memory, new_generation
from .querylog import QueryLog
from .settings import MemorySettings, MemorySettingsIn, ServiceSettings
from .store import StoredMemory

log = logging.getLogger("zmem")

DEFAULT = "default"


def check_name(name: str) -> str:
    """`name` when it is a memory name (`zmem_core.names`), else a 422 on the path's name."""
    try:
        return names.check_name(name)
    except ValueError as e:
        raise ValidationFailed.at(["path", "name"], str(e)) from None


class Memories:
    """Name → Memory, and the one factory of memories. `default` always exists (empty,
    z_dim unset, until written)."""

    def __init__(self, settings: ServiceSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or CpuEngine(settings.knn_threads)
        self._items: dict[str, Memory] = {}
        self.loaded = False
        self.skipped: dict[str, str] = {}  # stored memories that could not be loaded, and why
        self.retired: dict[str, int] = {}  # the next seq of deleted memories, by name
        self._reset_default()

    def new(self, name: str, settings: MemorySettings | None = None, generation: str | None = None) -> Memory:
        """A new, empty memory (not yet listed): the only place a `Memory` is built."""
        memory = Memory(
            name,
            settings or self.settings.memory_defaults(),
            self.engine,
            queries=QueryLog(self.settings.recorded_queries),
            room=self.room,
            next_seq=self.retired.get(name, 1),  # seqs are never reused under a name
            generation=generation or new_generation(),
        )
        return memory

    def _reset_default(self) -> None:
        self._items[DEFAULT] = self.new(DEFAULT)

    def restore(self, stored: list[StoredMemory]) -> None:
        """Rebuild from the store; stored settings win over start-up flags (differences logged)."""
        defaults = self.settings.memory_defaults()
        self._reset_default()  # made before `retired` was known
        for s in stored:
            memory = self.new(s.name, s.settings, s.generation)
            plan = memory.plan_rows(s.rows, s.next_seq, s.total_written)  # the stored counters win
            memory.reserve(plan)
            memory.apply(plan)
            self._items[s.name] = memory
            for diff in defaults.model_copy(update={"z_dim": s.settings.z_dim}).differences(s.settings):
                log.warning(
                    "memory %r keeps its stored %s=%r (start-up default is %r)",
                    s.name,
                    diff["field"],
                    diff["requested"],
                    diff["stored"],
                )
        self.loaded = True

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> Memory:
        check_name(name)
        try:
            return self._items[name]
        except KeyError:
            raise NotFound(f"no memory named {name!r}") from None

    def find(self, name: str) -> Memory | None:
        return self._items.get(name)

    def all(self) -> list[Memory]:
        return sorted(self._items.values(), key=lambda m: m.name)

    def for_write(self, name: str) -> Memory:
        """The memory a write goes to, created with the defaults when unknown (not yet listed)."""
        check_name(name)
        return self._items.get(name) or self.new(name)

    def add(self, memory: Memory) -> None:
        """List `memory` under its name, replacing (and releasing) any memory listed there."""
        old = self._items.get(memory.name)
        self._items[memory.name] = memory
        if old is not None and old is not memory:
            old.clear()

    def remove(self, name: str) -> None:
        memory = self.get(name)
        self.retired[name] = max(memory.next_seq, self.retired.get(name, 1))
        memory.clear()
        del self._items[name]
        if name == DEFAULT:
            self._reset_default()

    def room(self) -> int:
        """Bytes the memory budget (--max-memory-bytes) has left."""
        return self.settings.max_memory_bytes - self.total_bytes()

    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self._items.values())

    def check_budget(self, extra: int, unlisted: int = 0) -> None:
        """Raise InsufficientStorage (507) unless `extra` more bytes fit in --max-memory-bytes.

        `unlisted`: bytes already held by memories being created that aren't listed yet."""
        limit = self.settings.max_memory_bytes
        used = self.total_bytes() + unlisted
        if extra > 0 and used + extra > limit:
            raise InsufficientStorage(
                f"this write would grow the memories to {used + extra} bytes; the limit "
                f"(--max-memory-bytes) is {limit}"
            )

    def resolve_put(self, name: str, body: MemorySettingsIn) -> tuple[MemorySettings, bool]:
        """Settings a PUT leads to, and whether they replace the current ones.

        Raises Conflict naming each given field that differs from a memory whose
        settings are fixed (it has a z_dim or holds episodes).
        """
        try:
            wanted = self.settings.resolve(body)
        except ValidationError as e:
            errors: list[dict[str, Any]] = [
                {"loc": ["body", *err["loc"]], "msg": err["msg"].removeprefix("Value error, ")}
                for err in e.errors()
            ]
            raise ValidationFailed(str(errors[0]["msg"]), errors=errors) from None
        current = self._items.get(name)
        if current is None or (current.settings.z_dim is None and current.size == 0):
            return wanted, current is None or current.settings != wanted
        given = body.model_dump(exclude_none=True)
        stored = current.settings
        if "risk" in given:
            given["risk"] = {**stored.risk.model_dump(), **given["risk"]}
        requested = stored.model_copy(update={k: wanted.__dict__[k] for k in given})
        diffs = stored.differences(requested)
        if diffs:
            raise conflict(name, diffs)
        return stored, False


def conflict(name: str, diffs: list[dict[str, Any]]) -> Conflict:
    text = "; ".join(f"{d['field']}: stored {d['stored']!r}, requested {d['requested']!r}" for d in diffs)
    return Conflict(f"memory {name!r} has different settings: {text}", conflicts=diffs)
