"""The `zmem` command. Imports are lazy: `serve` needs no torch, `demo` no FastAPI."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Annotated, Any, Literal, get_args, get_origin


def serve_flags() -> dict[str, tuple[str, dict[str, Any]]]:
    """`zmem serve`'s flags, one per `ServiceSettings` field with a description: field name →
    (flag, `add_argument` keywords). Values stay strings; the settings model parses them,
    as it parses the `ZMEM_*` variables."""
    from .settings import ServiceSettings, is_byte_size

    flags: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, field in ServiceSettings.model_fields.items():
        if not field.description:
            continue
        env = f"ZMEM_{name.upper()}"
        default = "" if field.default is None else f" (default: {shown(field.default, is_byte_size(field))})"
        text = f"{field.description}{default} [{env}]".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flags[name] = (flag, {"action": argparse.BooleanOptionalAction, "default": None, "help": text})
            continue
        options: dict[str, Any] = {"help": text, "dest": name}
        choices = get_args(get_args(field.annotation)[0]) if get_origin(field.annotation) is Annotated else ()
        choices = choices or (get_args(field.annotation) if get_origin(field.annotation) is Literal else ())
        if choices:
            options["metavar"] = "{" + ",".join(choices) + "}"
        elif is_byte_size(field):
            options["metavar"] = "SIZE"
        flags[name] = (flag, options)
    return flags


def shown(value: Any, byte_size: bool = False) -> str:
    """A default as the help shows it: sizes in their largest whole binary unit."""
    if byte_size:
        for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value % factor == 0:
                return f"{value // factor} {unit}"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parser() -> argparse.ArgumentParser:
    """The `zmem` command line: `serve`, `backup` and `demo`."""
    command = argparse.ArgumentParser(prog="zmem", description="zmem: an RL z-memory service")
    sub = command.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service (every flag also has a ZMEM_* variable)")
    try:
        flags = serve_flags()
    except ModuleNotFoundError:  # a client-only install: `serve` says what is missing when run
        serve.add_argument("flags", nargs=argparse.REMAINDER)
        flags = {}
    for flag, options in flags.values():
        serve.add_argument(flag, **options)
    backup = sub.add_parser("backup", help="copy a live data dir's store consistently")
    backup.add_argument("--data-dir", default=None, help="the service's data dir [ZMEM_DATA_DIR]")
    backup.add_argument("dest", help="file to write (a SQLite database)")
    demo = sub.add_parser("demo", help="show the regularizer at work on a toy; writes a report folder")
    # The demo drives the client and the service, so it lives above both (zmem_demo); the
    # command only dispatches to it (pyproject.toml's import contract names this one import).
    from zmem_demo import add_arguments

    add_arguments(demo)
    return command


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "backup":
            return _backup(args)
        if args.command == "demo":
            from zmem_demo import main as demo_main

            return demo_main(args)
    except ModuleNotFoundError as e:  # e.g. `zmem serve` where only the client extra is installed
        print(
            f"zmem {args.command}: {e}: this environment lacks the service's packages; "
            "pip install 'zmem[service]'",
            file=sys.stderr,
        )
        return 2
    return 2


def _cannot_listen(host: str, port: int) -> str | None:
    """Why `host:port` can't be listened on now (in use, no such address), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _backup(args: argparse.Namespace) -> int:
    """SQLite's online backup: a consistent copy while the service keeps writing."""
    import sqlite3
    from pathlib import Path

    from .store import SqliteStore, mark_as_backup

    data_dir = Path(args.data_dir or os.environ.get("ZMEM_DATA_DIR", "zmem-data"))
    source = data_dir / SqliteStore.FILE
    if not source.exists():
        print(f"zmem backup: no store at {source}", file=sys.stderr)
        return 2
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        dst = sqlite3.connect(args.dest)
        with dst:
            src.backup(dst)
        mark_as_backup(dst)
        n = dst.execute("SELECT COUNT(*) FROM episodes").fetchone()[0]
        src.close()
        dst.close()
    except sqlite3.Error as e:
        print(f"zmem backup: cannot copy {source} to {args.dest}: {e}", file=sys.stderr)
        return 2
    print(
        f"zmem backup: {n} episodes copied to {args.dest} (restore: use it as <data-dir>/{SqliteStore.FILE}; "
        "its memories get new generations when a server opens it, so replicas start over)"
    )
    return 0


# A LogRecord's own attributes; any other is a field the call passed in `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# uvicorn passes its message again with terminal colours.
_DROPPED = frozenset({"color_message"})


class JsonLines(logging.Formatter):
    """A record as one JSON object on one line: `time` (UTC, ISO 8601, ms), `level`, `logger`,
    `message`, then the fields passed in `extra` (an object JSON can't hold as its `str`; with a
    NaN among them or a key JSON can't hold, every one as its `repr`), and `exception` /
    `stack` as text when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _DROPPED and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(line, default=str, allow_nan=False)
        except (TypeError, ValueError):  # NaN, a key JSON can't hold, a cycle: every extra as its repr
            return json.dumps({key: v if isinstance(v, str) else repr(v) for key, v in line.items()})


def configure_logging(level: str, log_format: str) -> None:
    """The process's log on stderr: `level` and above, as text lines or as JSON lines."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .settings import ServiceSettings

    given = {name: getattr(args, name) for name in serve_flags()}
    try:
        settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        for error in e.errors(include_url=False, include_input=False):
            where = (
                "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-") if error["loc"] else ""
            )
            print(f"zmem serve: {where or 'settings'}: {error['msg']}", file=sys.stderr)
        return 2
    from .datadir import DataDirInUse, DataDirLock

    try:  # before anything opens the store or listens; the lock lives as long as this frame
        _lock = None if settings.durability == "none" else DataDirLock(settings.data_dir)
    except (DataDirInUse, OSError) as e:
        print(f"zmem serve: {e}", file=sys.stderr)
        return 2
    problem = _cannot_listen(settings.host, settings.port)
    if problem:  # said before the store loads, not as a failure to load it
        print(f"zmem serve: cannot listen on {settings.host}:{settings.port}: {problem}", file=sys.stderr)
        return 2
    from .http.app import create_app
    from .http.server import serve
    from .metrics import configure_access_log

    try:
        app = create_app(settings)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"zmem serve: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    configure_access_log(settings.access_log or settings.log_level == "debug")
    serve(app, settings, settings.log_level, on_exit=app.state.zmem.signal.close_soon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
