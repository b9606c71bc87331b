"""The durable store: SQLite (WAL) is the source of truth; rings are rebuilt from it.

One connection, owned by the writer thread. A memory row holds its settings (JSON)
and counters; an episode row holds one episode with `z` as float32 bytes. A write
is acknowledged only after the transaction holding it commits, and many requests
share one commit (see `writer.py`). `NullStore` keeps nothing (`--durability none`).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .ring import FLOAT_FIELDS, Columns
from .settings import MemorySettings

log = logging.getLogger("zmem")

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    total_written INTEGER NOT NULL
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


@dataclass
class StoredMemory:
    name: str
    settings: MemorySettings
    next_seq: int
    total_written: int
    rows: Columns  # the last `capacity` episodes, oldest first


class Store(Protocol):
    def load(self) -> list[StoredMemory]: ...
    def save_memory(self, name: str, settings: MemorySettings, next_seq: int, total_written: int) -> None: ...
    def insert(self, name: str, rows: Columns) -> None: ...
    def delete_memory(self, name: str) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def trim(self, name: str, keep_from_seq: int) -> None: ...
    def close(self) -> None: ...


class NullStore:
    """Keeps nothing: a restart starts empty."""

    def load(self) -> list[StoredMemory]:
        return []

    def save_memory(self, name: str, settings: MemorySettings, next_seq: int, total_written: int) -> None:
        pass

    def insert(self, name: str, rows: Columns) -> None:
        pass

    def delete_memory(self, name: str) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def trim(self, name: str, keep_from_seq: int) -> None:
        pass

    def close(self) -> None:
        pass


class SqliteStore:
    """SQLite in WAL mode; `synchronous` FULL survives power loss, NORMAL a process crash."""

    FILE = "zmem.sqlite3"

    def __init__(self, data_dir: Path, synchronous: str = "FULL") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / self.FILE
        # isolation_level=None: transactions are explicit (BEGIN … COMMIT).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        self._in_tx = False

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def load(self) -> list[StoredMemory]:
        out = []
        for name, settings_json, next_seq, total in self._db.execute(
            "SELECT name, settings, next_seq, total_written FROM memories ORDER BY name"
        ):
            try:
                settings = MemorySettings.model_validate_json(settings_json)
            except ValueError:
                log.exception("memory %r has invalid stored settings; it is not loaded (its rows stay)", name)
                continue
            cur = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM episodes WHERE memory = ? ORDER BY seq DESC LIMIT ?",
                (name, settings.capacity),
            )
            rows = cur.fetchall()[::-1]
            out.append(StoredMemory(name, settings, next_seq, total, decode_rows(rows, settings.z_dim or 0)))
        return out

    def save_memory(self, name: str, settings: MemorySettings, next_seq: int, total_written: int) -> None:
        self._begin()
        self._db.execute(
            "INSERT INTO memories (name, settings, next_seq, total_written) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET settings = excluded.settings, "
            "next_seq = excluded.next_seq, total_written = excluded.total_written",
            (name, settings.model_dump_json(), next_seq, total_written),
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

    def delete_memory(self, name: str) -> None:
        self._begin()
        self._db.execute("DELETE FROM episodes WHERE memory = ?", (name,))
        self._db.execute("DELETE FROM memories WHERE name = ?", (name,))

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
        self.rollback()
        self._db.close()


def decode_rows(rows: list[tuple], z_dim: int) -> Columns:
    n = len(rows)
    if n == 0:
        return Columns.empty(z_dim)
    cols = list(zip(*rows, strict=True))
    by_name = dict(zip(COLUMNS, cols, strict=True))
    z = np.frombuffer(b"".join(by_name["z"]), dtype=np.float32).reshape(n, z_dim).copy()
    return Columns(
        z=z,
        seq=np.array(by_name["seq"], np.int64),
        ts=np.array(by_name["ts"], np.float64),
        id=np.array(by_name["id"], object),
        worker=np.array(by_name["worker"], object),
        **{f: np.array(by_name[f], np.float32) for f in (*FLOAT_FIELDS, "risk_target")},
    )


def open_store(data_dir: Path, durability: str) -> Store:
    if durability == "none":
        return NullStore()
    return SqliteStore(data_dir, "FULL" if durability == "full" else "NORMAL")
