"""zmem client: record RL episodes into a zmem service and use its memory as a torch loss term.

mem = ZMemClient("http://127.0.0.1:8000")
mem.record(z, soft_bind=0.9, cone_vol=0.3, lambda_bind=0.1)
loss = loss + 0.02 * mem.risk(z)

The names below load on first use (PEP 562), so that a private module (`_risk`: torch only)
can be imported without the HTTP client's dependencies.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import ZMemClient
    from ._exceptions import (
        ClientClosed,
        EpisodesDropped,
        FlushTimeout,
        HTTPError,
        NoSuchMemory,
        QueueFull,
        ReplicaError,
        ReplicaLagWarning,
        RequestRejected,
        SendFailed,
        ServerError,
        Timeout,
        TransportError,
        ZMemError,
        ZMemWarning,
    )
    from ._report import log_to
    from ._risk import Regularizer, kernel_risk
    from ._sources import Lag

from zmem_core import __version__ as __version__

# Retries, feed errors and dropped records go to this logger; configure logging to see them.
logging.getLogger("zmem_client").addHandler(logging.NullHandler())

__all__ = [
    "ClientClosed",
    "EpisodesDropped",
    "FlushTimeout",
    "HTTPError",
    "Lag",
    "NoSuchMemory",
    "QueueFull",
    "Regularizer",
    "ReplicaError",
    "ReplicaLagWarning",
    "RequestRejected",
    "SendFailed",
    "ServerError",
    "Timeout",
    "TransportError",
    "ZMemClient",
    "ZMemError",
    "ZMemWarning",
    "kernel_risk",
    "log_to",
]

_MODULE_OF = {
    "ZMemClient": "._client",
    "Regularizer": "._risk",
    "kernel_risk": "._risk",
    "log_to": "._report",
    "Lag": "._sources",
}
_MODULE_OF.update({name: "._exceptions" for name in __all__ if name not in _MODULE_OF})


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
