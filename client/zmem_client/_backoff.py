"""How long the client waits before trying again: one rule for every retrying loop."""

from __future__ import annotations

import math
import random
import time
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER = 60.0
"""A longer Retry-After (or a proxy's nonsense) is cut to this many seconds by the sender's
retries; a query that would have to wait longer takes the 503 as its answer."""


def retry_after_seconds(value: str | bytes | None) -> float | None:
    """Seconds a `Retry-After` value asks to wait: delta-seconds, or an HTTP date (0 once it
    has passed); None when there is none, or one that can't be read (negative, not finite)."""
    text = (value.decode("latin-1") if isinstance(value, bytes) else value or "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            return max(parsedate_to_datetime(text).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def backoff(attempt: int, first: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds before retry number `attempt` (1: the first): `first` doubled per attempt up to
    `cap`, times a jitter in [0.5, 1.5) so that many clients don't retry in step; never sooner
    than the `Retry-After` the service sent (cut to MAX_RETRY_AFTER), so that "Retry-After: 0"
    answered forever cannot become a busy loop."""
    wait = min(cap, first * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.5)
    return wait if retry_after is None else max(wait, min(retry_after, MAX_RETRY_AFTER))
