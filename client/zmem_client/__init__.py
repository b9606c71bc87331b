"""zmem client: record RL episodes into a zmem service and use its memory as a torch loss term.

mem = ZMemClient("http://127.0.0.1:8000")
mem.record(z, soft_bind=0.9, cone_vol=0.3, lambda_bind=0.1)
loss = loss + 0.02 * mem.risk(z)
"""

from ._client import ZMemClient
from ._exceptions import (
    ClientClosed,
    FlushTimeout,
    HTTPError,
    NoSuchMemory,
    QueueFull,
    RequestRejected,
    SendFailed,
    ServerError,
    Timeout,
    TransportError,
    ZMemError,
    ZMemWarning,
)
from ._risk import Regularizer, kernel_risk

__version__ = "0.1.0"

__all__ = [
    "ClientClosed",
    "FlushTimeout",
    "HTTPError",
    "NoSuchMemory",
    "QueueFull",
    "Regularizer",
    "RequestRejected",
    "SendFailed",
    "ServerError",
    "Timeout",
    "TransportError",
    "ZMemClient",
    "ZMemError",
    "ZMemWarning",
    "kernel_risk",
]
