"""The durable store: SQLite (WAL) is the source of truth; rings are rebuilt from it.

One connection, owned by the writer thread. A memory row holds its settings (JSON),
counters and generation; an episode row holds one episode with `z` as float32
bytes. A write is acknowledged only after the transaction holding it commits, and
many requests share one commit (see `writer.py`). `NullStore` keeps nothing
(`--durability none`). The file records its schema version (`PRAGMA user_version`)
and is migrated forward on open; a file from a newer release is refused.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .ring import FLOAT_FIELDS, Columns
from .settings import MemorySettings

log = logging.getLogger("zmem")

SCHEMA_VERSION = 2
"""1: release 0.1.0 (recorded no version: `user_version` 0). 2: memories carry a generation.
(The `retired` table, the next seq of deleted memories, and the `state` table, which marks a
store open while a server runs on it, were added within version 2: older readers of version 2
ignore them.)"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    total_written INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retired (
    name TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS episodes (
    memory TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    z BLOB NOT NULL,
    soft_bind REAL NOT NULL, cone_vol REAL NOT NULL, lambda_bind REAL NOT NULL,
    E_T REAL NOT NULL, lambda_T REAL NOT NULL, Hr REAL NOT NULL,
    risk_target REAL NOT NULL,
    id TEXT, worker TEXT,
    PRIMARY KEY (memory, seq)
) WITHOUT ROWID;
"""
COLUMNS = ("seq", "ts", "z", *FLOAT_FIELDS, "risk_target", "id", "worker")


class StoreUnreadable(Exception):
    """The store can't be opened or read at all: the service must not start on it."""


@dataclass
class StoredMemory:
    name: str
    settings: MemorySettings
    next_seq: int
    total_written: int
    rows: Columns  # the last `capacity` episodes, oldest first
    generation: str | None = None


class Store(Protocol):
    def load(self) -> tuple[list[StoredMemory], dict[str, str]]: ...
    def save_memory(
        self, name: str, settings: MemorySettings, next_seq: int, total_written: int, generation: str
    ) -> None: ...
    def insert(self, name: str, rows: Columns) -> None: ...
    def delete_memory(self, name: str, next_seq: int) -> None: ...
    def retired(self) -> dict[str, int]: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def trim(self, name: str, keep_from_seq: int) -> None: ...
    def close(self) -> None: ...


class NullStore:
    """Keeps nothing: a restart starts empty."""

    def load(self) -> tuple[list[StoredMemory], dict[str, str]]:
        return [], {}

    def save_memory(
        self, name: str, settings: MemorySettings, next_seq: int, total_written: int, generation: str
    ) -> None:
        pass

    def insert(self, name: str, rows: Columns) -> None:
        pass

    def delete_memory(self, name: str, next_seq: int) -> None:
        pass

    def retired(self) -> dict[str, int]:
        return {}

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def trim(self, name: str, keep_from_seq: int) -> None:
        pass

    def close(self) -> None:
        pass


class SqliteStore:
    """SQLite in WAL mode; `synchronous` FULL survives power loss, NORMAL a process crash.

    A generation names one history (SPEC §2), so opening the store mints new generations
    where the history may have been cut: for a copy made by `zmem backup` (it clears the
    generations, see `mark_as_backup`), and, under `synchronous` NORMAL, after a server
    stopped without closing the store (power loss may have taken acknowledged rows).
    `minted` names the memories that got one.
    """

    FILE = "zmem.sqlite3"

    def __init__(self, data_dir: Path, synchronous: str = "FULL") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / self.FILE
        self.minted: list[str] = []
        try:
            # isolation_level=None: transactions are explicit (BEGIN … COMMIT).
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # The open marker and minted generations must outlive a power loss whatever the
            # durability: lost, a later start would bring back a generation replicas left.
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate(lossy=synchronous != "FULL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.DatabaseError as e:
            raise StoreUnreadable(f"the store {self.path} can't be opened: {e}") from None
        self._in_tx = False

    def _migrate(self, lossy: bool = False) -> None:
        """Bring the file to SCHEMA_VERSION (a file from a newer release is refused), mint
        the generations the history needs (see the class) and mark the store open."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreUnreadable(
                f"the store {self.path} has schema version {version}, newer than this release "
                f"reads ({SCHEMA_VERSION}): upgrade zmem"
            )
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(memories)")}
            if "generation" not in columns:  # version 1 → 2
                self._db.execute("ALTER TABLE memories ADD COLUMN generation TEXT")
            unclean = self._db.execute("SELECT value FROM state WHERE key = 'open'").fetchone()
            if unclean is not None and lossy:
                self._db.execute("UPDATE memories SET generation = NULL")
                log.warning(
                    "the last server on this store stopped without closing it (pid %s) under "
                    "--durability normal, where acknowledged rows may be gone: every memory gets a new "
                    "generation, so replicas start over",
                    unclean[0],
                )
            missing = self._db.execute("SELECT name FROM memories WHERE generation IS NULL").fetchall()
            for (name,) in missing:
                generation = uuid.uuid4().hex
                self._db.execute("UPDATE memories SET generation = ? WHERE name = ?", (generation, name))
            self.minted = [name for (name,) in missing]
            self._db.execute(
                "INSERT INTO state (key, value) VALUES ('open', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(os.getpid()),),
            )
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def load(self) -> tuple[list[StoredMemory], dict[str, str]]:
        """Every memory that reads back whole, and why each other one was skipped.

        Rows are checked for structure (blob lengths, types, seq order), never against
        today's value rules, so an upgrade never drops a memory written under older
        rules. Raises StoreUnreadable when the file itself can't be read.
        """
        out, skipped = [], {}
        try:
            memories = self._db.execute(
                "SELECT name, settings, next_seq, total_written, generation FROM memories ORDER BY name"
            ).fetchall()
            for name, settings_json, next_seq, total, generation in memories:
                try:
                    settings = MemorySettings.model_validate_json(settings_json)
                except ValueError as e:
                    skipped[name] = f"invalid stored settings: {str(e).splitlines()[0]}"
                    continue
                cur = self._db.execute(
                    f"SELECT {', '.join(COLUMNS)} FROM episodes WHERE memory = ? ORDER BY seq DESC LIMIT ?",
                    (name, settings.capacity),
                )
                rows = cur.fetchall()[::-1]
                try:
                    cols = decode_rows(rows, settings.z_dim or 0)
                    check_counters(cols, next_seq, total)
                except (ValueError, TypeError) as e:
                    skipped[name] = f"corrupt rows: {e}"
                    continue
                out.append(StoredMemory(name, settings, next_seq, total, cols, generation))
        except sqlite3.DatabaseError as e:
            raise StoreUnreadable(f"the store {self.path} can't be read: {e}") from None
        for name, why in skipped.items():
            log.error("memory %r is not loaded (its rows stay in the store): %s", name, why)
        return out, skipped

    def save_memory(
        self, name: str, settings: MemorySettings, next_seq: int, total_written: int, generation: str
    ) -> None:
        self._begin()
        self._db.execute(
            "INSERT INTO memories (name, settings, next_seq, total_written, generation) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET settings = excluded.settings, "
            "next_seq = excluded.next_seq, total_written = excluded.total_written, "
            "generation = excluded.generation",
            (name, settings.model_dump_json(), next_seq, total_written, generation),
        )

    def insert(self, name: str, rows: Columns) -> None:
        if not len(rows):
            return
        self._begin()
        cols = [rows.seq.tolist(), rows.ts.tolist(), [r.tobytes() for r in rows.z]]
        cols += [getattr(rows, f).astype(np.float64).tolist() for f in (*FLOAT_FIELDS, "risk_target")]
        cols += [rows.id.tolist(), rows.worker.tolist()]
        self._db.executemany(
            f"INSERT INTO episodes (memory, {', '.join(COLUMNS)}) "
            f"VALUES (?, {', '.join('?' * len(COLUMNS))})",
            ((name, *r) for r in zip(*cols, strict=True)),
        )

    def delete_memory(self, name: str, next_seq: int) -> None:
        """Delete a memory; its next seq is kept, so a memory made later under the name never
        reuses a seq."""
        self._begin()
        self._db.execute("DELETE FROM episodes WHERE memory = ?", (name,))
        self._db.execute("DELETE FROM memories WHERE name = ?", (name,))
        self._db.execute(
            "INSERT INTO retired (name, next_seq) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
            (name, next_seq),
        )

    def retired(self) -> dict[str, int]:
        """The next seq of each deleted memory's name."""
        try:
            return dict(self._db.execute("SELECT name, next_seq FROM retired").fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreUnreadable(f"the store {self.path} can't be read: {e}") from None

    def trim(self, name: str, keep_from_seq: int) -> None:
        self._begin()
        self._db.execute("DELETE FROM episodes WHERE memory = ? AND seq < ?", (name, keep_from_seq))

    def commit(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Close the store, marking it closed cleanly (see the class)."""
        self.rollback()
        try:
            self._db.execute("DELETE FROM state WHERE key = 'open'")
        finally:
            self._db.close()


def mark_as_backup(db: sqlite3.Connection) -> None:
    """Clear a copy's generations: whoever opens it gets new ones, so replicas that
    followed the live store past the copy's newest row start over (SPEC §2)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(memories)")}
    with db:
        if "generation" in columns:
            db.execute("UPDATE memories SET generation = NULL")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "state" in tables:  # the live server's open marker is not the copy's
            db.execute("DELETE FROM state")


def decode_rows(rows: list[tuple], z_dim: int) -> Columns:
    """Stored rows as columns; ValueError/TypeError name the first row whose structure is wrong."""
    n = len(rows)
    if n == 0:
        return Columns.empty(z_dim)
    by_name = dict(zip(COLUMNS, zip(*rows, strict=True), strict=True))
    for seq, blob in zip(by_name["seq"], by_name["z"], strict=True):
        if not isinstance(blob, bytes) or len(blob) != 4 * z_dim:
            got = f"{len(blob)} bytes" if isinstance(blob, bytes) else repr(blob)[:40]
            raise ValueError(f"seq {seq}: z holds {got}, expected {4 * z_dim} bytes")
    for name in ("seq", "ts", *FLOAT_FIELDS, "risk_target"):
        bad = next((v for v in by_name[name] if isinstance(v, bool) or not isinstance(v, int | float)), None)
        if bad is not None:
            raise TypeError(f"column {name} holds {repr(bad)[:40]}")
    for name in ("id", "worker"):
        bad = next((v for v in by_name[name] if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"column {name} holds {repr(bad)[:40]}")
    seq = np.array(by_name["seq"], np.int64)
    if (np.diff(seq) <= 0).any():
        raise ValueError("seqs do not increase")
    return Columns(
        z=np.frombuffer(b"".join(by_name["z"]), dtype=np.float32).reshape(n, z_dim).copy(),
        seq=seq,
        ts=np.array(by_name["ts"], np.float64),
        id=np.array(by_name["id"], object),
        worker=np.array(by_name["worker"], object),
        **{f: np.array(by_name[f], np.float32) for f in (*FLOAT_FIELDS, "risk_target")},
    )


def check_counters(cols: Columns, next_seq: object, total_written: object) -> None:
    """The counters are integers and every held seq lies in [1, next_seq)."""
    counters_ok = isinstance(next_seq, int) and isinstance(total_written, int)
    if not counters_ok or next_seq < 1 or total_written < 0:  # type: ignore[operator]
        raise ValueError(f"counters next_seq={next_seq!r}, total_written={total_written!r}")
    if len(cols) and (cols.seq[-1] >= next_seq or cols.seq[0] < 1):
        raise ValueError(f"seqs {cols.seq[0]}..{cols.seq[-1]} do not lie below next_seq {next_seq}")


def open_store(data_dir: Path, durability: str) -> Store:
    if durability == "none":
        return NullStore()
    return SqliteStore(data_dir, "FULL" if durability == "full" else "NORMAL")
