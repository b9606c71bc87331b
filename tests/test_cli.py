"""The `zmem` command's own messages: sizes with units, bad flags and failed backups said plainly."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from zmem_service.cli import byte_size, main


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4294967296", 2**32),
        ("4GiB", 4 * 2**30),
        ("4 GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
    ],
)
def test_sizes_take_units(text: str, value: int) -> None:
    assert byte_size(text) == value


def test_a_size_that_is_not_one_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        byte_size("lots")


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--durability", "fast"], "zmem serve: --durability: Input should be"),
        (["--capacity", "100", "--min-size", "600"], "min_size (600) must be <= capacity (100)"),
    ],
)
def test_invalid_settings_are_one_line_each(
    flags: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path / "data"), *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and "pydantic.dev" not in err and "input_value" not in err


def test_a_backup_that_cannot_be_written_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zmem_service.store import SqliteStore

    SqliteStore(tmp_path / "data").close()
    assert main(["backup", "--data-dir", str(tmp_path / "data"), str(tmp_path / "missing" / "copy.db")]) == 2
    assert "zmem backup: cannot copy" in capsys.readouterr().err


def test_a_port_in_use_is_said_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--durability", "none"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
