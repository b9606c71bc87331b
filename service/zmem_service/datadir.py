"""One server per data dir: an OS file lock, taken before the server listens.

Two services writing one SQLite store would each believe they own its sequence
numbers (both then answer 503 on every write), so `zmem serve` takes an exclusive
`flock` on `<data dir>/zmem.lock` first and keeps it for the life of the process.
The kernel drops the lock when the process ends however it ends, `kill -9`
included, so there is never a stale lock to clean up. The file holds the holder's
pid, which is all it is for: the lock is the open file, not the file's presence.

`--durability none` keeps nothing on disk and never creates the data dir, so it
takes no lock: throwaway servers may share a path that none of them uses.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "zmem.lock"


class DataDirInUse(RuntimeError):
    """Another live process holds the data dir; `pid` is its pid (None if it could not be read)."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid could not be read"
        super().__init__(
            f"data dir {data_dir} is in use by another zmem serve ({holder}); "
            "one server per data dir: stop that one or pass another --data-dir"
        )


class DataDirLock:
    """An exclusive lock on a data dir, held until `release()` or the process's end."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        data_dir.mkdir(parents=True, exist_ok=True)
        # Not O_TRUNC: the holder's pid must stay readable until we hold the lock.
        # Python opens it non-inheritable, so no child process can keep the lock alive.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise DataDirInUse(data_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _holder_pid(fd: int, wait: float = 1.0) -> int | None:
    """The pid in the lock file; the holder writes it just after locking, so wait a moment."""
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
