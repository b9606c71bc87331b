"""Memory stays bounded by --max-memory-bytes whatever clients send (issue: hostile loads).

    python -m benchmarks.bench_memory [--budget-mib 256] [--readers 32]

Starts `zmem serve` with a memory budget, fills it to the budget with 128-character
ids, then runs at once: `readers` concurrent `/export` and `/stats` calls, zip-bomb
imports (a small body that would unpack to far more than the budget), and recorded
queries. Prints the server's RSS before, after filling and at its peak (VmHWM),
against the budget. The test suite runs a scaled-down version (tests/test_bounded.py).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import zipfile
from pathlib import Path

import httpx
import numpy as np
import safetensors.numpy

from tests.server import Server
from zmem_service.ring import FLOAT_FIELDS

MIB = 2**20


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def zip_bomb(rows: int, d: int = 32) -> bytes:
    """A valid-looking export of `rows` rows of zeros: every member is there with the right
    shape and dtype, and the whole unpacks to ~1000 times its size."""
    buf = io.BytesIO()
    members = {"z": ("<f4", (rows, d)), "seq": ("<i8", (rows,)), "ts": ("<f8", (rows,))}
    members.update({f: ("<f4", (rows,)) for f in (*FLOAT_FIELDS, "risk_target")})
    members.update({"id": ("<U1", (rows,)), "worker": ("<U1", (rows,))})
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (descr, shape) in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                header = io.BytesIO()
                spec = {"descr": descr, "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(header, spec)
                f.write(header.getvalue())
                left = int(np.prod(shape)) * np.dtype(descr).itemsize
                chunk = bytes(min(left, 16 * MIB))
                while left:
                    f.write(chunk[: min(left, len(chunk))])
                    left -= min(left, len(chunk))
        with zf.open("settings.npy", "w") as f:
            np.lib.format.write_array(f, np.array('{"capacity": 100}'))
    return buf.getvalue()


def fill(url: str, d: int, batch: int = 5000) -> int:
    """Write episodes with 128-character ids until the budget refuses (507); how many fit."""
    rng = np.random.default_rng(0)
    written = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        while True:
            body = safetensors.numpy.save(
                {
                    "z": rng.standard_normal((batch, d)).astype(np.float32),
                    "soft_bind": np.full(batch, 0.5, np.float32),
                    "cone_vol": np.ones(batch, np.float32),
                    "lambda_bind": np.zeros(batch, np.float32),
                },
                metadata={"id": __import__("json").dumps([f"{written + i:0128d}" for i in range(batch)])},
            )
            r = http.post("/episodes", content=body, headers={"content-type": "application/x-safetensors"})
            if r.status_code == 507:
                return written
            r.raise_for_status()
            written += batch


def run(budget: int, readers: int, bombs: int, bomb_rows: int, d: int = 32) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(
            Path(tmp) / "data",
            "--max-memory-bytes",
            str(budget),
            "--capacity",
            "10000000",
            "--min-size",
            "1",
            "--durability",
            "none",
        ).start()
        try:
            assert srv.proc is not None
            pid = srv.proc.pid
            idle = status_kib(pid, "VmRSS") * 1024
            rows = fill(srv.url, d)
            filled = status_kib(pid, "VmRSS") * 1024
            bomb = zip_bomb(bomb_rows, d)
            codes: list[int] = []

            def get(path: str) -> None:
                with httpx.Client(base_url=srv.url, timeout=300) as http:
                    r = http.get(path)
                    codes.append(r.status_code)

            def post_bomb(i: int) -> None:
                r = httpx.post(f"{srv.url}/memories/bomb{i}/import", content=bomb, timeout=300)
                codes.append(r.status_code)

            def query() -> None:
                q = np.random.default_rng(1).standard_normal((64, d)).astype(np.float32)
                with httpx.Client(base_url=srv.url, timeout=300) as http:
                    for _ in range(20):
                        r = http.post("/neighbors", json={"z": q.tolist(), "k": 8, "record": True})
                        codes.append(r.status_code)

            threads = [threading.Thread(target=get, args=("/export",)) for _ in range(readers)]
            threads += [threading.Thread(target=get, args=("/stats",)) for _ in range(readers)]
            threads += [threading.Thread(target=post_bomb, args=(i,)) for i in range(bombs)]
            threads += [threading.Thread(target=query) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peak = status_kib(pid, "VmHWM") * 1024
            alive = httpx.get(srv.url + "/healthz", timeout=10).status_code == 200
        finally:
            srv.stop()
    return {
        "budget": budget,
        "rows": rows,
        "idle_rss": idle,
        "filled_rss": filled,
        "peak_rss": peak,
        "bomb_bytes": len(bomb),
        "bomb_unpacked": bomb_rows * d * 4,
        "codes": sorted(set(codes)),  # type: ignore[dict-item]
        "alive": alive,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--readers", type=int, default=32)
    ap.add_argument("--bombs", type=int, default=4)
    args = ap.parse_args()
    r = run(args.budget_mib * MIB, args.readers, args.bombs, bomb_rows=16 * args.budget_mib * MIB // 128)
    print(f"\nmemory under hostile loads: budget {args.budget_mib} MiB, {r['rows']} episodes, 128-char ids")
    print(f"{'':44} {'MiB':>9}")
    for key in ("idle_rss", "filled_rss", "peak_rss"):
        print(f"{key:44} {r[key] / MIB:9.1f}")
    cost = (r["peak_rss"] - r["idle_rss"]) / MIB
    print(f"{'peak - idle (what the memories and loads cost)':44} {cost:9.1f}")
    print(f"zip bomb: {r['bomb_bytes'] / MIB:.1f} MiB body, {r['bomb_unpacked'] / MIB:.0f} MiB unpacked")
    print(f"answers seen: {r['codes']}; server alive afterwards: {r['alive']}")


if __name__ == "__main__":
    main()
