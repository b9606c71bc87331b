"""A generation names one history: where it may have been cut (a backup restored, an unclean
stop under `--durability normal`), the memory gets a new generation and a replica that had
followed further starts over, equal to the service again; where it can't have been cut (a
clean stop, `kill -9` under `--durability full`), replicas keep what they hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from zmem_client import ZMemClient
from zmem_service.store import SqliteStore

from .server import Server
from .test_replica_e2e import assert_agree, assert_mirror, record

pytestmark = pytest.mark.e2e
D = 8
FLAGS = ("--capacity", "300", "--min-size", "20", "--k", "16")


def generation(url: str) -> str:
    r = httpx.get(url + "/changes", params={"after": 0, "limit": 1}, headers={"accept": "application/json"})
    r.raise_for_status()
    return str(r.json()["generation"])


def backup(data_dir: Path, dest: Path) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "zmem_service.cli", "backup", "--data-dir", str(data_dir), str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def restore(data_dir: Path, copy: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"{SqliteStore.FILE}{suffix}").unlink(missing_ok=True)
    shutil.copy(copy, data_dir / SqliteStore.FILE)


def test_a_replica_that_followed_past_a_restored_backup_starts_over(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    srv = Server(tmp_path / "data", *FLAGS).start()
    service = ZMemClient(srv.url)
    replica = ZMemClient(srv.url, replica=True, max_lag=120.0)
    try:
        record(service, rng, 100)
        service.flush()
        said = backup(srv.data_dir, tmp_path / "copy.sqlite3")
        assert "new generations" in said
        record(service, rng, 50)  # the replica follows past the backup's newest row
        service.flush()
        assert replica.replica is not None
        replica.replica.sync()
        before = replica.replica.state.generation
        assert before == generation(srv.url)

        srv.stop()
        restore(srv.data_dir, tmp_path / "copy.sqlite3")
        srv.restart()
        assert generation(srv.url) != before
        # New writes take seqs the replica already holds under the old history.
        record(service, rng, 80)
        service.flush()
        replica.replica.sync()
        assert replica.replica.state.generation == generation(srv.url)
        export = service.export()
        assert export["seq"].tolist() == list(range(1, 181))
        assert_mirror(replica, export)
        assert_agree(service, replica, torch.from_numpy(rng.standard_normal((4, D))))
    finally:
        service.close()
        replica.close()
        srv.stop()


def test_after_an_unclean_stop_under_durability_normal_replicas_start_over(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    srv = Server(tmp_path / "data", *FLAGS, "--durability", "normal").start()
    service = ZMemClient(srv.url)
    replica = ZMemClient(srv.url, replica=True, max_lag=120.0)
    try:
        record(service, rng, 120)
        service.flush()
        assert replica.replica is not None
        replica.replica.sync()
        first = generation(srv.url)

        srv.stop()  # a clean stop cuts nothing: the generation stays
        srv.restart()
        assert generation(srv.url) == first

        srv.kill()  # kill -9: under normal durability acknowledged rows may be gone
        srv.restart()
        second = generation(srv.url)
        assert second != first
        assert "stopped without closing it" in srv.log.read_text()
        record(service, rng, 60)
        service.flush()
        replica.replica.sync()
        assert replica.replica.state.generation == second
        assert_mirror(replica, service.export())
        assert_agree(service, replica, torch.from_numpy(rng.standard_normal((4, D))))

        srv.kill()  # a second unclean stop, right after a start that minted: new again
        srv.restart()
        assert generation(srv.url) not in (first, second)
    finally:
        service.close()
        replica.close()
        srv.stop()


def test_kill_9_under_durability_full_keeps_the_generation(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", *FLAGS).start()
    try:
        eps = [
            {"z": [float(i)] * D, "soft_bind": 0.5, "cone_vol": 1.0, "lambda_bind": 0.0} for i in range(30)
        ]
        httpx.post(srv.url + "/episodes", json={"episodes": eps}).raise_for_status()
        first = generation(srv.url)
        srv.kill()  # full durability: every acknowledged row is on disk, the history is whole
        srv.restart()
        assert generation(srv.url) == first
    finally:
        srv.stop()
