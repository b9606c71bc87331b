"""`zmem demo`: does the memory regularizer steer a policy away from unreliable z's?

Trains the toy of ``demo.toy`` with several worker processes recording into one memory
per (w_mem, seed) through the real client, at several strengths w_mem (0 and the design's
0.02 included) with the same seeds, runs a kernel check at a larger d, and writes a report
folder (``demo.report``). Starts its own ``zmem serve`` unless given ``--url``.
"""

from __future__ import annotations

from .run import add_arguments, main

__all__ = ["add_arguments", "main"]
