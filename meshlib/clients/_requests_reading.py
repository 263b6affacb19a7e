"""Reading and discarding response bodies for meshlib's requests adapter
(`meshlib.clients.requests`): a body read whole within its try's deadline, a bounded drain of
one nobody will read, and the connection closed when draining would take too long.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.exceptions import ChunkedEncodingError, ContentDecodingError
from urllib3 import HTTPResponse
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

from meshlib.clients._common import DRAIN_BYTES, DRAIN_SECONDS, BodyTooLate


def _read_whole(response: requests.Response, until: float | None) -> None:
    """Read the body of a response the caller reads whole (`stream=False`) within its try, as
    Envoy's timeouts and in-flight counts cover the whole response: the route deadline
    (`until`, `time.monotonic()`) bounds it. The bytes are kept where `response.content`
    finds them, decoded as requests decodes them (and its errors raised as it raises them)."""
    raw = response.raw
    if until is None or raw is None:  # (no raw: an adapter gave the body already)
        response.content  # noqa: B018 - requests reads and keeps the body
        return
    chunks = []
    if isinstance(raw, HTTPResponse):
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise BodyTooLate
            try:
                chunk = _read_some(raw, left, decode_content=True)
            except ProtocolError as exc:
                raise ChunkedEncodingError(exc) from exc
            except DecodeError as exc:
                raise ContentDecodingError(exc) from exc
            except ReadTimeoutError as exc:
                raise requests.ConnectionError(exc) from exc
            except SSLError as exc:
                raise requests.exceptions.SSLError(exc) from exc
            if not chunk:
                break
            chunks.append(chunk)
    else:  # another adapter's `raw`: the deadline is checked between its reads
        for chunk in response.iter_content(_CHUNK):
            if time.monotonic() > until:
                raise BodyTooLate
            chunks.append(chunk)
    response._content = b"".join(chunks)
    response._content_consumed = True  # type: ignore[attr-defined]


_CHUNK = 64 * 1024


# A read waits for the time left when that is sooner than its own read timeout by more than
# this (seconds); setting a socket's timeout is a system call, saved when it changes nothing.
_SLACK = 0.01


def _read_some(raw: HTTPResponse, left: float, *, decode_content: bool) -> bytes:
    """What of `raw`'s body has come (up to `_CHUNK` bytes; b"" at its end), waiting at most
    `left` seconds for it: `BodyTooLate` if none came by then.

    urllib3's `read(amt)` waits for all `amt` bytes, each wait bounded by the read timeout
    alone, so a body that trickles in would overshoot any deadline by far; `read1` returns
    what one receive gives, and the socket's timeout is cut to the time left. (Once the body
    is in, the connection is back in its pool, maybe another request's: it is not touched;
    urllib3 sets the timeout of a connection it reuses.)"""
    connection = raw.connection
    sock = connection.sock if connection is not None else None
    shortened = False
    if sock is not None:
        own = sock.gettimeout()
        if own is None or own > left + _SLACK:
            sock.settimeout(left)
            shortened = True
    try:
        return raw.read1(_CHUNK, decode_content=decode_content) or b""
    except ReadTimeoutError:
        if shortened:
            raise BodyTooLate from None
        raise


def _drained(raw: HTTPResponse, seconds: float, most: int | None) -> bool:
    """Read and drop the rest of `raw`'s body, if it comes within `seconds` and is at most
    `most` bytes (None: any size): whether it was read to its end (then the connection can
    be used again). Never raises."""
    until = time.monotonic() + seconds
    read = 0
    with contextlib.suppress(Exception):  # a discarded answer never fails the call
        while most is None or read <= most:
            left = until - time.monotonic()
            if left <= 0:
                break
            chunk = _read_some(raw, left, decode_content=False)
            if not chunk:
                return True
            read += len(chunk)
    return False


def _discard(
    response: requests.Response,
    seconds: float,
    most: int | None,
    keep: Callable[[], bool] | None = None,
) -> None:
    """Drop a response nobody reads (a retried one, a mirrored copy's): its body is read
    (see `_drained`) so that its connection goes back to the pool, or the connection is
    closed when the body is bigger or slower than that, as Envoy resets such a stream, or
    when `keep()`, asked once the body is read, says the pool is not to have it."""
    raw = response.raw
    # Held from the start: urllib3 puts the connection back in the pool itself once the body
    # is read whole, before `keep()` can be asked.
    connection = getattr(raw, "connection", None) if keep is not None else None
    if isinstance(raw, HTTPResponse) and _drained(raw, seconds, most) and (keep is None or keep()):
        raw.release_conn()
    else:
        response.close()
        if connection is not None:
            connection.close()  # idle in the pool already, maybe: no socket stays open


def _close(response: Any) -> None:
    """Discard a response that will be retried: a small body that comes at once is read so
    the connection can be kept, else the connection is closed (see DRAIN_BYTES): however its
    body crawls or stalls, the retry waits no more than DRAIN_SECONDS for it."""
    if response is not None:
        _discard(response, DRAIN_SECONDS, DRAIN_BYTES)
