"""Reading a response within its try, and discarding one that will be retried.

Envoy's timeouts and in-flight counts cover the whole response, body included, so a response
the caller reads whole (every `send` but `stream=True`) is read by the mesh inside its try:
`_Reading` marks those requests while a meshlib client's `send` runs (the client sets it, the
transport reads it); `_read_whole` / `_aread_whole` read the body under the route deadline and
hand the bytes to httpx as if httpx had read them (`_hand_over`, over `_httpx_body.hold`).
`_close` / `_aclose` drain, within bounds, and close a response the retry policy discards, so
its connection goes back to the pool.

Split out of `meshlib.clients.httpx`, and, like it, not compiled: mypyc mis-builds the async
`try/except` around awaits in `_aread_whole` and `_aclose` (see pyproject.toml).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import time
from collections.abc import Mapping
from typing import Any

import httpx

from meshlib.clients._aio import within
from meshlib.clients._common import DRAIN_BYTES, DRAIN_SECONDS, BodyTooLate
from meshlib.clients._httpx_body import hold


class _Reading:
    """While a `send(stream=False)` runs (`with _Reading(request.extensions):`), the requests
    whose caller reads the whole body, so that the mesh reads it within the try (see
    `_read_whole`), named by their extensions: the request an auth flow sends again is the
    same object, and each redirect's new request, whose extensions httpx copies, is added
    (`_ClientMixin._build_redirect_request`, in `meshlib.clients.httpx`). Emptied when the
    send ends: a task started meanwhile, which keeps this object in its copy of the context,
    does not find a later send of its own marked."""

    __slots__ = ("_token", "first", "more")

    def __init__(self, extensions: dict[str, Any]) -> None:
        self.first: dict[str, Any] | None = extensions  # the request `send` was handed
        self.more: list[dict[str, Any]] = []  # redirects' (rare: no list lookup for most)

    def marks(self, extensions: object) -> bool:
        return extensions is self.first or any(marked is extensions for marked in self.more)

    def __enter__(self) -> None:
        self._token = _READ_WHOLE.set(self)

    def __exit__(self, *exc_info: object) -> None:
        _READ_WHOLE.reset(self._token)
        self.first = None
        self.more.clear()


# Set by meshlib's clients while their `send` runs. A context variable, not a key in the
# request's extensions: the caller's Request is left as it was (it may be sent again, streamed,
# through another client), and a call made meanwhile for another request (an event hook's) is
# not read whole for it.
_READ_WHOLE: contextvars.ContextVar[_Reading | None] = contextvars.ContextVar(
    "meshlib.read_whole", default=None
)


def _read_whole(
    response: httpx.Response,
    until: float | None,
    headers: Mapping[str, str] | None,
    started: float,
) -> None:
    """Read the body of a response the caller reads whole (not streamed) within its try, as
    Envoy's timeouts and in-flight counts cover the whole response: the route deadline
    (`until`, `time.monotonic()`) bounds it, checked between reads (each read is bounded by
    the try's read timeout). The response then holds the bytes, read again as httpx would."""
    stream = response.stream
    if isinstance(stream, httpx.ByteStream):  # it came whole
        _hand_over(response, b"".join(stream), headers, started)
        return
    assert isinstance(stream, httpx.SyncByteStream)
    chunks = []
    try:
        for chunk in stream:
            if until is not None and time.monotonic() > until:
                raise BodyTooLate
            chunks.append(chunk)
    finally:
        stream.close()
    _hand_over(response, b"".join(chunks), headers, started)


async def _aread_whole(
    response: httpx.Response,
    until: float | None,
    headers: Mapping[str, str] | None,
    started: float,
) -> None:
    """`_read_whole` for asyncio: the route deadline bounds the whole read."""
    stream = response.stream
    if isinstance(stream, httpx.ByteStream):  # it came whole
        _hand_over(response, b"".join(stream), headers, started)
        return
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        if until is None:
            body = await _joined(stream)
        else:
            try:
                body = await within(_joined(stream), until - time.monotonic())
            except asyncio.TimeoutError:
                raise BodyTooLate from None
    finally:
        await stream.aclose()
    _hand_over(response, body, headers, started)


def _hand_over(
    response: httpx.Response, body: bytes, headers: Mapping[str, str] | None, started: float
) -> None:
    """`response` holding `body`, read as httpx would read it (see `_httpx_body`); `elapsed`
    set as httpx sets it, when the body is in. `headers` are those `_MeshTransportBase._result`
    read (None: unknown, so the body is left for httpx to decode)."""
    encoded = headers is None or "content-encoding" in headers
    hold(response, body, encoded)
    if not encoded:
        response.elapsed = datetime.timedelta(seconds=time.perf_counter() - started)


async def _joined(stream: httpx.AsyncByteStream) -> bytes:
    return b"".join([chunk async for chunk in stream])


def _close(response: Any) -> None:
    """Discard a response that will be retried (see DRAIN_BYTES)."""
    if response is None:
        return
    until = time.monotonic() + DRAIN_SECONDS
    read = 0
    try:
        with contextlib.suppress(Exception):  # a discarded answer never fails the call
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > DRAIN_BYTES or time.monotonic() > until:
                    break
    finally:
        response.close()  # also when interrupted: its connection is given back


async def _aclose(response: Any) -> None:
    """`_close` for asyncio."""
    if response is None:
        return
    try:
        with contextlib.suppress(Exception):  # a discarded answer never fails the call
            await within(_drain(response), DRAIN_SECONDS)
    finally:
        await response.aclose()  # also when cancelled: its connection is given back


async def _drain(response: httpx.Response) -> None:
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read > DRAIN_BYTES:
            return
