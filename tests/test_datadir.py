"""One server per data dir: a second `zmem serve` on a held dir exits at once, naming the holder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from zmem_service.datadir import LOCK_FILE, DataDirInUse, DataDirLock

from .conftest import episodes
from .server import Server, free_port, serve_command


def test_a_held_dir_names_its_holder_and_a_released_one_can_be_taken(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")  # creates the dir
    assert (tmp_path / "data" / LOCK_FILE).read_text().strip() == str(os.getpid())
    # flock belongs to the open file, so a second open conflicts even in the same process.
    with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}") as info:
        DataDirLock(tmp_path / "data")
    assert info.value.pid == os.getpid() and str(tmp_path / "data") in str(info.value)
    first.release()
    DataDirLock(tmp_path / "data").release()


@pytest.mark.e2e
def test_a_second_server_on_one_data_dir_exits_and_the_first_keeps_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Server(data).start()
    try:
        assert first.proc is not None
        httpx.post(first.url + "/episodes", json={"episodes": episodes(3)}).raise_for_status()
        # Another port, so only the lock can stop it; info logs would show uvicorn starting.
        other = free_port()
        second = subprocess.run(
            [*serve_command(other, data), "--log-level", "info"], capture_output=True, text=True, timeout=60
        )
        assert second.returncode != 0
        assert f"pid {first.proc.pid}" in second.stderr and "one server per data dir" in second.stderr
        assert "Uvicorn running" not in second.stderr + second.stdout  # it never listened
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{other}/readyz")
        # The first never noticed.
        assert httpx.get(first.url + "/readyz").status_code == 200
        httpx.post(first.url + "/episodes", json={"episodes": episodes(2, start=3)}).raise_for_status()
        assert httpx.get(first.url + "/stats").json()["size"] == 5

        first.kill()  # kill -9: no shutdown code runs, the kernel drops the lock
        after = Server(data, port=first.port).start()
        try:
            assert httpx.get(after.url + "/stats").json()["size"] == 5
        finally:
            after.stop()
    finally:
        first.stop()


@pytest.mark.e2e
def test_durability_none_takes_no_lock(tmp_path: Path) -> None:
    """Nothing touches the disk with --durability none, so two throwaway servers may share a path."""
    data = tmp_path / "data"
    a = Server(data, "--durability", "none").start()
    b = Server(data, "--durability", "none").start()
    try:
        assert not data.exists()
    finally:
        a.stop()
        b.stop()
