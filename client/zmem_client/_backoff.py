"""How long the client waits before trying again: one rule for every retrying loop."""

from __future__ import annotations

import random

MAX_RETRY_AFTER = 60.0
"""A longer Retry-After (or a proxy's nonsense) is cut to this many seconds."""


def backoff(attempt: int, first: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds before retry number `attempt` (1: the first): `first` doubled per attempt up to
    `cap`, times a jitter in [0.5, 1.5) so that many clients don't retry in step; never sooner
    than the `Retry-After` the service sent (cut to MAX_RETRY_AFTER), so that "Retry-After: 0"
    answered forever cannot become a busy loop."""
    wait = min(cap, first * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.5)
    return wait if retry_after is None else max(wait, min(retry_after, MAX_RETRY_AFTER))
