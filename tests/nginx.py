"""A real nginx (Debian's package) on a loopback port, configured with the shipped
`docker/nginx/zmem-fanout.conf.template`, rendered as the nginx image renders it."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from .server import free_port

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docker" / "nginx" / "zmem-fanout.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def render(upstream: str, listen: str, cache_dir: str) -> str:
    """The template with its three variables set (nginx's own `$variables` left alone)."""
    text = TEMPLATE.read_text()
    for name, value in (("ZMEM_UPSTREAM", upstream), ("ZMEM_LISTEN", listen), ("ZMEM_CACHE_DIR", cache_dir)):
        text = text.replace("${" + name + "}", value)
    return text


class Nginx:
    """nginx in the foreground with everything under `prefix`; `url` is where it listens."""

    def __init__(self, prefix: Path, upstream: str) -> None:
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "zmem-fanout.conf").write_text(
            render(upstream, f"127.0.0.1:{self.port}", str(prefix / "cache"))
        )
        temps = "\n".join(
            f"  {kind}_temp_path {prefix / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # As root nginx would hand its workers to `nobody`, who can't write here: keep them ours.
        user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n{temps}\n  include {prefix / 'zmem-fanout.conf'};\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Nginx:
        check = subprocess.run(
            [NGINX, "-t", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
            capture_output=True,
            text=True,
        )
        if check.returncode:
            raise RuntimeError(f"nginx -t refused the config:\n{check.stderr}")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(self.url + "/healthz", timeout=1.0)
                return self
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nginx did not start:\n{(self.prefix / 'error.log').read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
