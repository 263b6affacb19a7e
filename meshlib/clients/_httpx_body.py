"""A response body meshlib has read, handed to httpx as if httpx had read it.

meshlib's clients read a response whole within its try (the route's timeouts cover the body).
httpx then reads it again from the bytes: its async read goes through five async generators and
its sync `read()` through three generators, a decoder and two chunkers — ~5 µs per request for
bytes already in hand. When the response has no `Content-Encoding` there is nothing to decode,
and the body is stored where httpx's own read would store it (`Response._content`, with the
stream marked consumed and closed), so `aread()`/`read()` return it at once.

`_content` is private, so it is used only when a probe at import shows httpx keeps the body
there; otherwise the public `read()` does the same, slower. `tests/clients/test_httpx_body.py`
checks both give the same response.
"""

from __future__ import annotations

import httpx

__all__ = ["FAST", "hold"]


def _probe() -> bool:
    try:
        response = httpx.Response(200, stream=httpx.ByteStream(b""))
        response._content = b"probe"
        response.is_stream_consumed = response.is_closed = True
        return response.content == b"probe" and response.text == "probe"
    except Exception:  # any surprise: the public API it is
        return False


FAST = _probe()
"""Whether httpx keeps a read body in `Response._content`."""


def hold(response: httpx.Response, body: bytes, encoded: bool) -> None:
    """`response` with `body` as its stream, read and closed unless it is `encoded`
    (a `Content-Encoding`: httpx decodes it when the app reads it)."""
    response.stream = httpx.ByteStream(body)
    if encoded:
        return
    if FAST:
        response._content = body
        response._num_bytes_downloaded = len(body)
        response.is_stream_consumed = response.is_closed = True
    else:
        response.read()
