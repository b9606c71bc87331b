"""The `zmem` command's own messages: sizes with units, bad flags and failed backups said plainly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from zmem_service.cli import main, parser
from zmem_service.settings import ServiceSettings, is_byte_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4294967296", 2**32),
        ("4GiB", 4 * 2**30),
        ("4 GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("32MiB", 32 * 2**20),
        ("2GB", 2 * 10**9),
    ],
)
def test_byte_settings_take_units_from_the_environment_as_from_the_flags(
    text: str, value: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    byte_fields = [name for name, f in ServiceSettings.model_fields.items() if is_byte_size(f)]
    assert {"max_body_bytes", "max_import_bytes", "max_memory_bytes", "max_response_bytes"} <= set(
        byte_fields
    )
    assert {"max_header_bytes", "min_transfer_rate"} <= set(byte_fields)
    for name in byte_fields:
        monkeypatch.setenv(f"ZMEM_{name.upper()}", text)
    from_env = ServiceSettings()
    for name in byte_fields:
        monkeypatch.delenv(f"ZMEM_{name.upper()}")
    flags = [arg for name in byte_fields for arg in (f"--{name.replace('_', '-')}", text)]
    args = parser().parse_args(["serve", *flags])
    from_flags = ServiceSettings(**{name: getattr(args, name) for name in byte_fields})
    for name in byte_fields:
        assert getattr(from_env, name) == getattr(from_flags, name) == value
        assert type(getattr(from_env, name)) is int  # code sees plain ints


def test_a_size_that_is_not_one_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path / "data"), "--max-body-bytes", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--max-body-bytes: must be a size in bytes" in err and "'lots'" in err
    monkeypatch.setenv("ZMEM_MAX_MEMORY_BYTES", "4 gigs")
    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    assert "--max-memory-bytes: must be a size in bytes" in capsys.readouterr().err


def test_every_setting_has_a_flag_whose_help_shows_its_real_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    lines = [" ".join(entry.split()) for entry in re.split(r"\n  (?=-)", text)]  # one per flag
    secrets = {name for name, f in ServiceSettings.model_fields.items() if f.annotation == SecretStr | None}
    assert secrets == {"token", "read_token"}  # never flags: a flag's value shows in `ps`
    defaults = ServiceSettings.model_construct()
    for name in ServiceSettings.model_fields.keys() - secrets:
        flag = "--" + name.replace("_", "-")
        line = next((ln for ln in lines if ln.startswith((flag + " ", flag + ","))), None)
        assert line is not None, f"no {flag}"
        assert line.rstrip().endswith(f"[ZMEM_{name.upper()}]"), line
        default = getattr(defaults, name)
        if default is None:
            assert "(default:" not in line, line
            continue
        said = line.rsplit("(default: ", 1)[1].split(")")[0]
        if isinstance(default, bool):
            assert said == ("on" if default else "off"), line
        else:  # the text the help shows parses back to the default ("32 MiB" included)
            assert ServiceSettings(**{name: said}).model_dump()[name] == default, line
    by_flag = {ln.split()[0].rstrip(","): ln for ln in lines if ln}
    assert "(default: 32 MiB)" in by_flag["--max-body-bytes"]
    assert "(default: 4 GiB)" in by_flag["--max-memory-bytes"]
    assert "(default: 127.0.0.1)" in by_flag["--host"]
    assert "(default: info)" in by_flag["--log-level"]


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
