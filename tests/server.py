"""A real `zmem serve` process on a loopback port, for end-to-end tests; and polling.

Ports: `free_port()` asks the kernel for an unused port and lets it go, so another
process can take it before `zmem serve` binds it. Rather than pass a bound socket
into uvicorn (the CLI has no flag for that), `Server.start` notices the loser's
"address already in use" and starts again on a new port; only a port the server
has already served on (a restart after `kill -9`) is kept fixed.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")

# Set by conftest.py for the test being set up or run: a Server refuses to start in a
# test without the e2e mark, so `-m "not e2e"` never starts a server.
current_test_is_e2e = True
PORT_TRIES = 5
_log_ids = itertools.count()


def wait_until(condition: Callable[[], T], timeout: float = 30.0, what: str = "the condition") -> T:
    """Poll `condition` until it returns something truthy (and return that), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(port: int, data_dir: Path, *args: str) -> list[str]:
    """The `zmem serve` command line the tests run (this interpreter, this checkout)."""
    return [
        sys.executable,
        "-m",
        "zmem_service.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
        *args,
    ]


class Server:
    """`zmem serve` in a subprocess; `start()` returns when /readyz says 200.

    `port` pins the port (it must be free); by default one is picked, and picked
    again if another process takes it first.
    """

    def __init__(
        self, data_dir: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.env = env or {}
        self.port = port or free_port()
        self._port_fixed = port is not None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{data_dir.name}-{next(_log_ids)}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        if not current_test_is_e2e:
            raise RuntimeError("this test starts a real server: mark it @pytest.mark.e2e")
        for _ in range(PORT_TRIES):
            offset = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    serve_command(self.port, self.data_dir, *self.args),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env},
                )
            if self._wait_ready(timeout):
                self._port_fixed = True  # a restart comes back where clients look for it
                return self
            said = self.log.read_bytes()[offset:].decode(errors="replace")
            if self._port_fixed or "address already in use" not in said.lower():
                raise RuntimeError(f"zmem serve exited with {self.proc.returncode}:\n{said}")
            self.port = free_port()
        raise RuntimeError(f"zmem serve lost the race for a free port {PORT_TRIES} times")

    def _wait_ready(self, timeout: float) -> bool:
        """True once /readyz says 200; False if the process exited first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"zmem serve not ready after {timeout}s:\n{self.log.read_text()}")

    def restart(self, *args: str) -> Server:
        """Start again on the same port and data dir (with `args` when given)."""
        if args:
            self.args = list(args)
        return self.start()

    def kill(self) -> None:
        """`kill -9`: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the graceful path."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else None
