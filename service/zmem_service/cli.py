"""The `zmem` command. Imports are lazy: `serve` needs no torch, `demo` no FastAPI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def byte_size(text: str) -> int:
    """A size in bytes: a plain integer, or a number with a unit (KiB, MiB, GiB, KB, MB, GB)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    clean = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if clean.endswith(unit):
            try:
                return int(float(clean.removesuffix(unit)) * factor)
            except ValueError:
                break
    try:
        return int(clean.removesuffix("b"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4294967296, 4GiB, 512MiB)") from None


SERVE_FLAGS: list[tuple[str, Any, str]] = [
    ("host", str, "address to bind (default 127.0.0.1)"),
    ("port", int, "port (default 8000)"),
    ("data-dir", str, "where the SQLite store lives (default ./zmem-data)"),
    (
        "durability",
        str,
        "full (fsync every commit), normal (survives a crash of the process, "
        "not of the machine) or none (no disk: a restart starts empty)",
    ),
    ("capacity", int, "default capacity of new memories (50000)"),
    ("min-size", int, "default min_size of new memories (min(500, capacity))"),
    ("k", int, "default k of new memories (64)"),
    ("sigma", str, "default sigma of new memories: a number or 'auto' (1.0)"),
    ("device", str, "kNN device: auto (a GPU when usable, else CPU), cpu, cuda or cuda:N"),
    (
        "cuda-graphs",
        str,
        "on a GPU, replay the fixed-shape search from CUDA graphs: on (default) or off; "
        "eager where capture fails, said once in the log",
    ),
    ("knn-threads", int, "OpenMP threads for batched searches (0 = all cores)"),
    ("max-memory-bytes", byte_size, "budget for all memories: rings, ids, recorded queries (4 GiB)"),
    ("max-body-bytes", byte_size, "largest request body (32 MiB)"),
    ("max-import-bytes", byte_size, "largest import file, streamed to a temporary file (16 GiB)"),
    ("max-concurrent-exports", int, "exports built at once; a few more wait, the rest get 503 (2)"),
    ("recorded-queries", int, "recorded queries kept per memory for the diagnostics (100000)"),
    ("max-response-bytes", byte_size, "largest answer body (64 MiB); past it a 422"),
    ("max-header-bytes", byte_size, "largest request line + headers (16 KiB); past it a 431"),
    ("header-timeout", float, "seconds a request's headers may take to arrive (10)"),
    ("body-timeout", float, "seconds a request body may send nothing before the connection closes (30)"),
    ("keep-alive-timeout", int, "seconds an idle keep-alive connection stays open (5)"),
    (
        "min-transfer-rate",
        byte_size,
        "bytes/s a large body or answer must keep up, 2 s of grace, while it holds one of the "
        "slots they share (1 MiB); slower ones are dropped",
    ),
    ("max-connections", int, "open connections at once (1000, less if the open-file limit is lower)"),
    ("token-file", str, "file holding the read+write bearer token"),
    ("read-token-file", str, "file holding the read-only bearer token"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zmem", description="zmem: an RL z-memory service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service (every flag also has a ZMEM_* variable)")
    for flag, kind, text in SERVE_FLAGS:
        env = "ZMEM_" + flag.upper().replace("-", "_")
        serve.add_argument(f"--{flag}", type=kind, help=f"{text} [{env}]")
    serve.add_argument(
        "--log-level",
        type=str.lower,
        default=os.environ.get("ZMEM_LOG_LEVEL", "info").lower(),
        choices=["critical", "error", "warning", "info", "debug"],
        help="how much the service logs: critical, error, warning, info (default) or debug [ZMEM_LOG_LEVEL]",
    )
    backup = sub.add_parser("backup", help="copy a live data dir's store consistently")
    backup.add_argument("--data-dir", default=None, help="the service's data dir [ZMEM_DATA_DIR]")
    backup.add_argument("dest", help="file to write (a SQLite database)")
    demo = sub.add_parser("demo", help="show the regularizer at work on a toy; writes a report folder")
    # The demo drives the client and the service, so it lives above both (zmem_demo); the
    # command only dispatches to it (pyproject.toml's import contract names this one import).
    from zmem_demo import add_arguments

    add_arguments(demo)
    args = parser.parse_args(argv)
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
    import os
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


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .settings import ServiceSettings

    given: dict[str, Any] = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in SERVE_FLAGS
    }
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

    try:
        app = create_app(settings)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"zmem serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(app, settings, args.log_level, on_exit=app.state.zmem.signal.close_soon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
