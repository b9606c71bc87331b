"""A replica as `ZMemClient(replica=True)` uses it, for tests that make the replica themselves
(with test-only settings: a short long poll, a small record queue): `risk_and_size` and
`neighbors` go through a client whose source it is; everything else is the replica's."""

from __future__ import annotations

from typing import Any

import httpx

from zmem_client import ZMemClient
from zmem_client._replica import Replica


class ReplicaClient:
    def __init__(self, url: str, prefix: str, *, transport: httpx.BaseTransport, **kw: Any) -> None:
        memory = "default" if prefix == "/" else prefix.strip("/").split("/")[-1]
        self.replica = Replica(url, prefix, memory=memory, transport=transport, **kw)
        self.client = ZMemClient(url, memory=memory, transport=transport, timeout=kw.get("timeout", 10.0))
        self.client._source = self.replica

    def risk_and_size(self, z: Any, **kw: Any) -> Any:
        return self.client.risk_and_size(z, **kw)

    def neighbors(self, z: Any, k: int | None = None, sigma: float | str | None = None) -> dict[str, Any]:
        return self.client.neighbors(z, k, sigma)

    def close(self, timeout: float = 5.0) -> None:
        self.replica.close(timeout)
        self.client.close(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)
