"""An asyncio HTTP/1.1 transport for httpx: httptools (llhttp) parses, a small pool reuses.

Why not httpx's own async transport: httpcore 1.0.x collapses under concurrency
(encode/httpx#3215). Its `AsyncConnectionPool._assign_requests_to_connections` runs on every
request start and response close and is quadratic in the pool's connections, with a `poll()`
syscall per idle connection per pass, and every pool primitive it creates retries a failing
`import sniffio`. At 64 tasks that bookkeeping is most of the CPU: stock `httpx.AsyncClient`
does ~550-760 req/s on the project's 2-core machine.

Why not aiohttp (meshlib's transport until the sixth session): it keeps throughput, but a
request through `aiohttp.ClientSession` costs ~60 µs of client CPU here, most of it features
httpx already has (cookies, redirects, auth, tracing hooks, header merging, its own timeouts).
This transport does only what a transport must — pool, write, parse — at ~25 µs (`python -m
bench async_client`). The parsing is llhttp's (through httptools, the parser uvicorn uses):
only the framing around it is written here.

What it does, as httpx's own transport does:

- the request goes out with exactly httpx's headers and body: bytes with their
  `Content-Length`, a streamed body chunked when httpx said `Transfer-Encoding: chunked`,
  nothing added. Refused before anything is sent (`httpx.LocalProtocolError`): a method or
  header name that is not an RFC 9110 token, a control character (CR, LF, NUL ...; a tab is
  fine) in a header value, ambiguous framing (two `Content-Length` values, both framing
  headers, a transfer coding not ending in `chunked`); a streamed body that turns out
  longer or shorter than its `Content-Length` is stopped there — each would desynchronise
  the connection. A request saying `Connection: close` leaves its connection closed after
  the response;
- the response comes back with its raw header list (repeated fields and case kept; trailers
  are not merged in) and the undecoded body (httpx decodes); a body that came whole with the
  headers is handed over as bytes and its connection returns to the pool at once, a longer
  one is streamed (reading pauses while more than 256 KiB wait unread) and its connection
  returns when httpx closes the response after reading it all (closed earlier, the connection
  is dropped);
- informational answers (1xx but 101) are skipped, and say nothing of the connection (their
  `Connection: close` or HTTP/1.0 does not end it: the final answer decides); a transfer
  coding other than `chunked` alone (`gzip, chunked`), which llhttp would leave undone, is
  refused as httpx refuses it; a 101, a status below 100, a malformed
  message, a header block over 64 KiB, or a connection closed before the message ends raise
  `httpx.RemoteProtocolError` (`httpx.ReadError` when the connection was reset); a body
  without length ends when the server closes cleanly; bytes after the response close the
  connection, the response stands;
- `request.extensions["timeout"]`: `connect` bounds opening a connection, TLS included
  (`httpx.ConnectTimeout`), `pool` waiting for one when the pool is full (`httpx.PoolTimeout`),
  `write` each wait for the socket to take more of the request (`httpx.WriteTimeout`), `read`
  each wait for bytes of the response (`httpx.ReadTimeout`);
- refused, DNS and TLS failures are `httpx.ConnectError`, a reset `httpx.ReadError` (also
  while sending, as httpx's), an app's failing request body generator raises the app's error;
- a request is sent once: a kept-alive connection the server closed under it is an error,
  never sent again here (in the mesh, the retry policy decides). An idle connection is
  checked before it is reused (a readable socket means the server closed it or sent bytes
  nobody asked for), as httpcore does; bytes the server sends before the request is written
  are read as its response (an overloaded server's 503);
- `TRY_DEADLINE` in `request.extensions` (the mesh sets it from the route deadline) bounds
  the whole exchange up to the response headers — waiting for a connection, connecting,
  sending, waiting for the headers — which the per-phase timeouts do not; `TRY_TIMEOUT` (a
  try's time, in seconds) brings it closer once the request has its connection, as Envoy
  starts its per-try timer then; a request whose deadline passed before it could be sent is
  not sent;
- `verify` as httpx takes it (True, False, a CA bundle path or an `ssl.SSLContext`); ALPN
  `http/1.1` on the contexts it makes (an app's own context is used as it is, and a server
  choosing `h2` on it is a `ConnectError`); the pool limits and keep-alive expiry of
  `httpx.Limits`. When the pool is full, requests wait in line, first come first served.

HTTP/1.1 only (HTTP/2 and proxies go through httpx's own transports). Connections belong to
the event loop that opened them: used from another loop, the transport starts a new pool, and
connections still pooled in the old one are left to the garbage collector (close the client
before its event loop ends, as with httpx). It runs on asyncio (and uvloop): a caller under
trio is served by httpx's own transport, made with the same settings.

The transport is this module; the rest lives beside it, each below the one before it:
`_http1_pool` (connections per origin within the limits, the queue of waiting requests),
`_http1_connection` (one connection: sending, parsing the response with llhttp, each wait
timed; the body stream httpx reads) and `_http1_request` (a request checked and framed for
the wire).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import httpx

from meshlib.clients._aio import trio_running
from meshlib.clients._http1_connection import _ResponseStream
from meshlib.clients._http1_pool import _CLOSED, _Pool
from meshlib.clients._http1_request import _Outgoing

__all__ = ["Http1Transport"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# request.extensions key: when (time.monotonic()) the response headers must have come, at the
# latest. The mesh sets it from a try's time (per-try timeout, route deadline), which the read
# timeout alone — counted from the last bytes received — would not bound.
TRY_DEADLINE = "meshlib.try_deadline"
# request.extensions key: a try's time in seconds, counted from when it has a connection
# (TRY_DEADLINE is then moved up to that end, if sooner).
TRY_TIMEOUT = "meshlib.try_timeout"


class Http1Transport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=Http1Transport())`: httpx's API, a lean HTTP/1.1 pool.

    `max_connections` bounds the pool (None: unbounded), `max_connections_per_host` each
    origin (None: only the total bound); a request beyond them waits, first come first
    served, up to its pool timeout. At most `max_keepalive_connections` idle connections are
    kept (None: all), each for `keepalive_expiry` seconds (None: until the server closes it).
    `trust_env` lets `SSL_CERT_FILE` / `SSL_CERT_DIR` choose the CAs when `verify` is True.
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | str | bool = True,
        max_connections: int | None = 100,
        max_connections_per_host: int | None = None,
        max_keepalive_connections: int | None = 20,
        keepalive_expiry: float | None = 5.0,
        trust_env: bool = True,
    ) -> None:
        for name, value in (
            ("max_connections", max_connections),
            ("max_connections_per_host", max_connections_per_host),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self._ssl = _ssl_context(verify, trust_env)  # made now, as httpx does: a bad path fails
        self._max_connections = max_connections
        self._max_per_host = max_connections_per_host
        self._max_idle = max_keepalive_connections
        self._keepalive_expiry = keepalive_expiry
        self._pool: _Pool | None = None
        self._closed = False
        self._off_asyncio: httpx.AsyncHTTPTransport | None = None  # see _for_trio

    def _for_trio(self) -> httpx.AsyncHTTPTransport:
        """httpx's own transport with these settings, for callers under trio: this pool runs
        on asyncio only."""
        if self._off_asyncio is None:
            self._off_asyncio = httpx.AsyncHTTPTransport(
                verify=self._ssl,
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=self._max_idle,
                    keepalive_expiry=self._keepalive_expiry,
                ),
            )
        return self._off_asyncio

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol {scheme + '://'!r}.", request=request
            )
        if self._closed:
            raise RuntimeError(_CLOSED)
        outgoing = _Outgoing(request)
        timeout = request.extensions.get("timeout") or {}
        pool = self._pool
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if trio_running() is None:
                raise
            return await self._for_trio().handle_async_request(request)
        if pool is None or pool.loop is not loop:
            pool = self._pool = _Pool(self, loop)  # the old loop's connections went with it
        host = url.raw_host.decode("ascii")
        sni = request.extensions.get("sni_hostname") or host
        origin = (scheme, host, url.port or _DEFAULT_PORTS[scheme], sni)
        extensions = request.extensions
        deadline = extensions.get(TRY_DEADLINE)
        connection = await pool.acquire(origin, request, timeout, deadline)
        try_time = extensions.get(TRY_TIMEOUT)
        if try_time is not None:  # the try's time starts now it has a connection
            due = time.monotonic() + try_time
            if deadline is None or due < deadline:
                deadline = extensions[TRY_DEADLINE] = due  # what the mesh reads on a timeout
        if deadline is not None and time.monotonic() >= deadline:
            pool.release(connection)  # never used: back to the pool (or closed, if new)
            raise httpx.WriteTimeout(
                "The try's time ran out before the request was sent", request=request
            )
        try:
            await connection.send(request, outgoing, timeout.get("write"), deadline)
            await connection.wait_head(request, timeout.get("read"), deadline)
        except BaseException:
            pool.discard(connection)  # cancelled or failed mid-exchange: its state is unknown
            raise
        if connection.complete:  # the whole body came with the headers: the common case
            response = connection.response(httpx.ByteStream(connection.take_body()))
            pool.release(connection)
            return response
        return connection.response(_ResponseStream(connection, request, timeout.get("read")))

    async def aclose(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        if self._off_asyncio is not None:
            await self._off_asyncio.aclose()

    def sibling(self) -> Http1Transport:
        """A transport with the same settings and a pool of its own."""
        twin = Http1Transport.__new__(Http1Transport)
        twin.__dict__.update(self.__dict__)  # closed if this one is
        twin._pool = None
        twin._off_asyncio = None
        return twin


def _ssl_context(verify: ssl.SSLContext | str | bool, trust_env: bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify  # the app's, as it made it
    if isinstance(verify, str):  # a CA bundle file or directory, as httpx still accepts
        directory = os.path.isdir(verify)
        context = ssl.create_default_context(
            cafile=None if directory else verify, capath=verify if directory else None
        )
    else:
        context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
    context.set_alpn_protocols(["http/1.1"])
    return context
