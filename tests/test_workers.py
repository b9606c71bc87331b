"""Several worker processes record and query one real server at once; nothing is lost."""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle

import httpx
import numpy as np
import pytest
import torch

from zmem_client import ZMemClient

pytestmark = pytest.mark.e2e
PER_WORKER = 600


def work(payload: bytes, rank: int) -> list[str]:
    """One training worker: record an episode per step, query risk every few steps."""
    mem: ZMemClient = pickle.loads(payload)
    rng = np.random.default_rng(rank)
    ids = []
    for step in range(PER_WORKER):
        z = torch.from_numpy(rng.standard_normal((1, 8)).astype(np.float32)) * 0.3
        ids.append(mem.record(z, soft_bind=rng.uniform(), cone_vol=rng.uniform(), lambda_bind=1.0))
        if step % 10 == 0:
            z.requires_grad_(True)
            risk = mem.risk(z)
            risk.backward()
            assert risk.shape == () and torch.isfinite(z.grad).all()
    mem.flush(timeout=60)
    mem.close()
    return ids


def test_four_workers_record_and_query_concurrently(server) -> None:
    payload = pickle.dumps(ZMemClient(server.url, timeout=30))
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(work, [(payload, rank) for rank in range(4)])
    sent = [i for ids in results for i in ids]
    assert len(sent) == len(set(sent)) == 4 * PER_WORKER
    r = httpx.get(server.url + "/export", timeout=30)
    with np.load(io.BytesIO(r.content), allow_pickle=False) as f:
        stored, workers, seq = f["id"].tolist(), f["worker"].tolist(), f["seq"]
    assert sorted(stored) == sorted(sent)
    assert len(set(workers)) == 4
    assert (np.diff(seq) == 1).all()
