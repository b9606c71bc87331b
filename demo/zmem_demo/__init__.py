"""`zmem demo`: does the memory regularizer steer a policy away from unreliable z's?

Trains the toy of ``zmem_demo.toy`` with several worker processes recording into one
memory per (w_mem, seed) through the real client, at several strengths w_mem (0 and the
design's 0.02 included) with the same seeds, runs a kernel check at a larger d, and writes
a report folder (``zmem_demo.report``). Starts its own ``zmem serve`` unless given ``--url``.

It drives both sides, so it sits above them: it imports `zmem_client` (and, through
`zmem serve` in a subprocess, runs the service); neither imports it, except the `zmem`
command, which dispatches `zmem demo` here.
"""

from __future__ import annotations

from .run import add_arguments, main

__all__ = ["add_arguments", "main"]
