"""A request's body in and its answer out, on the loop when small, admitted to a pool when large.

Bodies are read from the ASGI `receive` channel against the declared and the
configured limits (413), and, while they hold a decode slot, against the minimum
transfer rate (408): a body that trickles keeps its slot only while it keeps pace.
Answers are safetensors when the client accepts them, JSON otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import numpy as np

from zmem_core.wire import SAFETENSORS

from ..episodes import EpisodeBatch
from ..errors import BadRequest, PayloadTooLarge, RequestTimeout
from ..service import Query
from ..settings import ServiceSettings
from .codecs import (
    JSON,
    check_safetensors_size,
    decode_episodes,
    decode_queries,
    decode_query,
    encode_json,
    encode_safetensors,
    safetensors_size,
)
from .edge import Call
from .pools import Codecs, Ticket
from .streaming import GRACE, Answer, SentInChunks

T = TypeVar("T")
# Bodies and answers up to these sizes are decoded/encoded on the event loop: below them
# a hop to a pool thread (~60 µs) costs more than the work (benchmarks/bench_hostile.py).
INLINE_JSON_BYTES = 2048
INLINE_SAFETENSORS_BYTES = 256 * 1024
INLINE_JSON_FLOATS = 256
LARGE_ANSWER_BYTES = 1 << 20
"""Answers above this hold one of the answer slots until they are sent (`respond`)."""
SMALL_HEADER_BYTES = 64 * 1024
"""More than any header of a small answer: its metadata are a few scalars."""
BYTES_PER_JSON_NUMBER = 48
"""Room for one JSON number, its separator and some indentation (a float64 in full takes ~25)."""


def _gone() -> BadRequest:
    return BadRequest("the client closed the connection before the body was complete")


async def read_body(call: Call, limit: int, rate: float | None = None) -> bytes:
    """The request body, refusing (413) one over `limit` bytes before or while reading it; with
    `rate`, a body more than GRACE seconds behind `rate` bytes/s is refused (408)."""
    declared = call.head.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if rate is None:
            message = await call.receive()
        else:
            left = start + GRACE + size / rate - loop.time()
            try:
                message = await asyncio.wait_for(call.receive(), max(left, 0.0))
            except TimeoutError:
                raise RequestTimeout(
                    f"the body arrived at under {rate:g} bytes/s (--min-transfer-rate): "
                    f"{size} bytes in {loop.time() - start:.1f} s"
                ) from None
        if message["type"] == "http.disconnect":
            raise _gone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body over {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def body_chunks(call: Call) -> AsyncIterator[bytes]:
    """The body as it arrives (for bodies streamed to disk); a client that goes away is a 400."""
    while True:
        message = await call.receive()
        if message["type"] == "http.disconnect":
            raise _gone()
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


async def decode_body(
    call: Call,
    settings: ServiceSettings,
    decode: Callable[[bytes], T],
    limit: int | None = None,
    *,
    write: bool = False,
) -> T:
    """Read the body (at most `limit` bytes, default max_body_bytes) and decode it: on the loop
    when small, else admitted to a decode pool (the writes' own for `write`) before the body
    is read, so large bodies in memory stay bounded."""
    limit = settings.max_body_bytes if limit is None else min(limit, settings.max_body_bytes)
    head = call.head
    inline = INLINE_SAFETENSORS_BYTES if head.media_type == SAFETENSORS else INLINE_JSON_BYTES
    declared = head.content_length
    if declared is not None and declared <= inline:
        return decode(await read_body(call, limit))
    codecs: Codecs = call.state.codecs
    pool = codecs.decode_writes if write else codecs.decode
    async with pool.admitted(head.peer) as ticket:
        body = await read_body(call, limit, settings.min_transfer_rate)
        ticket.work()
        return decode(body) if len(body) <= inline else await pool.run(decode, body)


async def read_episodes(call: Call, settings: ServiceSettings) -> EpisodeBatch:
    """The request's episodes, decoded (400/408/413/415/422 as the module says)."""
    decode = partial(decode_episodes, content_type=call.head.media_type, max_batch=settings.max_batch)
    return await decode_body(call, settings, decode, write=True)


async def read_query(call: Call, settings: ServiceSettings) -> Query:
    """The request's neighbours/risk query, k/sigma/record from the query string when the body lacks them."""
    params, kind, rows = call.head.query(), call.head.media_type, settings.max_batch
    return await decode_body(call, settings, lambda body: decode_query(body, kind, params, rows))


async def read_queries(call: Call, settings: ServiceSettings) -> tuple[dict[str, np.ndarray], str | None]:
    """The recorded-query columns of `POST …/queries`; a body too long for max_batch rows is a 413
    before it is parsed."""
    rows, kind = settings.max_batch, call.head.media_type
    per_number = 8 if kind == SAFETENSORS else BYTES_PER_JSON_NUMBER
    limit = 3 * rows * per_number + 4096
    return await decode_body(call, settings, lambda body: decode_queries(body, kind, rows), limit)


# -- answers -----------------------------------------------------------------------------


def answer_bytes(floats: int, rows: int, k: int) -> int:
    """An upper bound on the safetensors answer of `floats` neighbour floats (rows × k × z_dim)
    with their risk targets, distances and seqs."""
    return 4 * floats + 16 * rows * k + 1024


async def answer_ticket(call: Call, nbytes: int) -> Ticket | None:
    """An answer slot for an answer of about `nbytes` bytes, taken before the work (503 when
    none comes free in time); None when the answer is small enough to need none."""
    if nbytes <= LARGE_ANSWER_BYTES:
        return None
    codecs: Codecs = call.state.codecs
    return await codecs.answers.take(call.head.peer)


async def respond(
    call: Call,
    settings: ServiceSettings,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    ticket: Ticket | None = None,
) -> Answer | SentInChunks:
    """An answer as safetensors when the client accepts it, JSON otherwise; at most
    `max_response_bytes` (else 422 on `k`, saying when safetensors would fit).

    A large answer (over LARGE_ANSWER_BYTES) holds one of the service's answer slots (the
    `ticket` taken before the work, else one taken now: 503 when none comes free) until
    its last byte is handed over, and goes out in chunks under the connection's flow
    control (`SentInChunks`): answers nobody reads can't pile up in memory."""
    codecs: Codecs = call.state.codecs
    data = sum(a.nbytes for a in arrays.values())
    if data + SMALL_HEADER_BYTES <= LARGE_ANSWER_BYTES:
        # Small whatever its header: no slot, and the exact size only if a limit needs it.
        if ticket is not None:
            ticket.release()
        body, media_type = await _encode(call, settings, codecs, arrays, meta, None)
        return Answer(body, media_type)
    st_size = safetensors_size(arrays, meta)
    if st_size <= LARGE_ANSWER_BYTES:
        if ticket is not None:
            ticket.release()
        body, media_type = await _encode(call, settings, codecs, arrays, meta, st_size)
        return Answer(body, media_type)
    if ticket is None:
        ticket = await codecs.answers.take(call.head.peer)
    try:
        body, media_type = await _encode(call, settings, codecs, arrays, meta, st_size)
    except BaseException:
        ticket.release()
        raise
    ticket.transfer()
    return SentInChunks(
        body,
        media_type,
        done=ticket.release,
        progressed=ticket.progressed,
        stall=settings.body_timeout,
        rate=settings.min_transfer_rate,
    )


async def _encode(
    call: Call,
    settings: ServiceSettings,
    codecs: Codecs,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    st_size: int | None,
) -> tuple[bytes, str]:
    """(body, media type) of an answer whose safetensors form takes `st_size` bytes (None: not
    measured, the answer is small). The answer is already computed: the encode pool queues it
    rather than refusing it."""
    limit = settings.max_response_bytes
    if call.head.wants(SAFETENSORS):
        if st_size is None or st_size <= INLINE_SAFETENSORS_BYTES:
            body = encode_safetensors(arrays, meta)
            check_safetensors_size(len(body), limit)
            return body, SAFETENSORS
        check_safetensors_size(st_size, limit)
        return await codecs.encode.run(encode_safetensors, arrays, meta), SAFETENSORS
    if sum(a.size for a in arrays.values()) <= INLINE_JSON_FLOATS:
        return encode_json(meta, arrays, limit, st_size), JSON
    return await codecs.encode.run(encode_json, meta, arrays, limit, st_size), JSON
