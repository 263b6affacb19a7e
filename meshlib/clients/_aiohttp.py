"""An httpx transport over aiohttp: httpx's API, aiohttp's connection pool.

Why: httpx's default async transport (httpcore 1.0.x) collapses under concurrency
(encode/httpx#3215). Measured by `python -m bench async_client` (uvicorn on loopback, same
2 cores): stock `httpx.AsyncClient` drops from ~1,700 req/s with one task to ~550 with 64; over
this transport it does ~3,500 and ~5,000 (8-10x). Two causes in httpcore 1.0.9:

- `AsyncConnectionPool._assign_requests_to_connections` runs on every request start and every
  response close and is quadratic in the pool's connections (its keep-alive count builds a list
  of all connections once per idle connection) and linear in connections for each queued request,
  plus a `poll()` syscall per idle connection per pass (`has_expired`). At 64 tasks this
  bookkeeping is most of the CPU; keeping more connections alive makes it slower, not faster.
- Every pool primitive it creates calls `current_async_library()`, which retries
  `import sniffio` (no longer installed with anyio 4.x): a failed import, i.e. a `sys.path`
  scan, several times per request.

aiohttp's connector keeps idle connections in per-host deques and waiters in a queue: O(1) per
request. This module adapts it to `httpx.AsyncBaseTransport`, so users keep `httpx.AsyncClient`
(auth, redirects, cookies, event hooks, decoding stay httpx's; aiohttp only moves bytes):

- the request goes out with exactly httpx's headers (aiohttp never adds its own User-Agent,
  Accept, Accept-Encoding or Content-Type where httpx left one out) and body (bytes, or streamed
  from the request's async byte stream with chunked transfer encoding);
- the response comes back with its raw header list (repeated fields and case kept), undecoded
  bytes (`auto_decompress=False`; httpx decodes), streamed, and the connection returns to
  the pool when httpx closes the response (a body that came whole with the headers is handed
  over as bytes and its connection released at once);
- aiohttp errors become the matching httpx exceptions (`raise ... from exc`);
- `request.extensions["timeout"]` (httpx.Timeout) maps to `aiohttp.ClientTimeout`: connect ->
  `sock_connect`, read -> `sock_read`, pool + connect -> `connect` (aiohttp's bound on waiting
  for a pooled connection plus opening it). aiohttp has no write timeout: `write` is ignored.

Differences from httpx's own transport: HTTP/1.1 only; a bodiless request whose method is not
GET/HEAD/OPTIONS/TRACE (e.g. DELETE) carries `Content-Length: 0`, which aiohttp always adds;
aiohttp times pool wait and connect as one phase, so its connect timeout becomes
`httpx.PoolTimeout` when the transport's in-flight count says the request had to queue for a
connection, else `httpx.ConnectTimeout`. aiohttp's HTTP parser (llhttp) refuses some
malformed responses h11 accepts — a repeated `Content-Length`, a body on a 204, both
`Transfer-Encoding: chunked` and `Content-Length`, more body than `Content-Length` says — which
then fail as `httpx.RemoteProtocolError` (the mesh answers 503 UR); and aiohttp's own resend of
an idempotent request whose kept-alive connection closed is switched off.

One aiohttp session per transport, created on first use inside the running event loop and
recreated if the transport is used from another loop; `aclose()` closes it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx
from yarl import URL

from meshlib.clients._httpx_headers import decoded

__all__ = ["AiohttpTransport"]

# aiohttp adds these when a request lacks them; httpx already sent what it means to send.
_AUTO_HEADERS = (
    ("user-agent", "User-Agent"),
    ("accept", "Accept"),
    ("accept-encoding", "Accept-Encoding"),
)
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None)
_READ_CHUNK = 65_536
_TIMEOUT_CACHE_SIZE = 64
_MAX_HEADERS = 1000  # header lines per response (aiohttp's default, 128, refuses real ones)
_SESSION_PARAMETERS = frozenset(inspect.signature(aiohttp.ClientSession.__init__).parameters)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=AiohttpTransport())`: httpx's API over aiohttp's pool.

    `verify` is passed to aiohttp as its `ssl` argument: True verifies with the default
    context, False does not verify, an `ssl.SSLContext` is used as is, and a path to a CA
    bundle file or directory verifies against it (as httpx still accepts). `max_connections`
    bounds the pool (None: unbounded), `max_connections_per_host` each host (None: only the
    total bound); a request beyond them waits up to its pool timeout. `keepalive_expiry`
    closes connections idle for longer (None: kept until the server closes them).
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | str | bool = True,
        max_connections: int | None = 100,
        max_connections_per_host: int | None = None,
        keepalive_expiry: float | None = 5.0,
    ) -> None:
        for name, value in (
            ("max_connections", max_connections),
            ("max_connections_per_host", max_connections_per_host),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self._verify = _ssl_context(verify) if isinstance(verify, str) else verify
        self._max_connections = max_connections
        self._max_connections_per_host = max_connections_per_host
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeouts: dict[tuple[float | None, float | None, float | None], aiohttp.ClientTimeout]
        self._timeouts = {}
        self._in_flight = 0  # requests holding or waiting for a connection

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme = request.url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol {scheme + '://'!r}.", request=request
            )
        session = self._session
        if session is None or self._loop is not asyncio.get_running_loop() or session.closed:
            session = await self._new_session()
        headers = decoded(request.headers)
        outgoing = request.stream
        data: Any
        if isinstance(outgoing, httpx.ByteStream):
            # Bytes known up front (also when the request was built with `stream=`, as the
            # mesh builds each attempt's, and so is not marked read): sent whole, not chunked.
            data = b"".join(outgoing) or None
        else:
            try:
                data = request.content or None
            except httpx.RequestNotRead:
                data = _RequestBody(request)
        names = {name for name, _ in headers}  # lowercase
        # aiohttp frames the body itself (Content-Length for bytes, chunks for a stream) and
        # refuses a preset chunked header; a streamed body read in advance keeps httpx's.
        if "transfer-encoding" in names:
            headers = [
                (k, v)
                for k, v in headers
                if not (k == "transfer-encoding" and v.strip().lower() == "chunked")
            ]
        queued = self._max_connections is not None and self._in_flight >= self._max_connections
        self._in_flight += 1
        try:
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                skip_auto_headers=_skip_auto_headers(names, request.method, data is not None),
                allow_redirects=False,
                timeout=self._client_timeout(request.extensions.get("timeout")),
            )
        except BaseException as exc:
            self._in_flight -= 1
            if isinstance(data, _RequestBody) and data.error is not None:
                raise data.error from None  # the app's own body failed: its error, as httpx's
            if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError):
                raise _map_error(exc, request, queued=queued, reading=False) from exc
            raise
        if response.status < 100 or response.status == 101:
            # Not a final answer httpx accepts on this path (h11 refuses them too).
            self._in_flight -= 1
            response.close()
            raise httpx.RemoteProtocolError(
                f"invalid response status {response.status}", request=request
            )
        stream: httpx.AsyncByteStream
        if response.content.is_eof():
            # The whole body came with the headers (the common small response): hand it over
            # as bytes and give the connection back now, without a streaming round trip.
            self._in_flight -= 1
            try:
                body = response.content.read_nowait()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                response.close()
                raise _map_error(exc, request, queued=False, reading=True) from exc
            response.release()
            stream = httpx.ByteStream(body)
        else:
            stream = _ResponseStream(self, response, request)
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=stream,
            extensions={
                "http_version": _http_version(response.version),
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        session, loop = self._session, self._loop
        self._session = self._loop = None
        if session is not None and loop is not None:
            await _close_session(session, loop)

    async def _new_session(self) -> aiohttp.ClientSession:
        """A session for the running loop, closing the one made for another loop, if any."""
        loop = asyncio.get_running_loop()
        session = self._session
        options: dict[str, Any] = {}
        if "max_headers" in _SESSION_PARAMETERS:  # newer aiohttp counts header lines
            options["max_headers"] = _MAX_HEADERS
        self._session = aiohttp.ClientSession(
            **options,
            connector=aiohttp.TCPConnector(
                ssl=self._verify,
                limit=self._max_connections or 0,
                limit_per_host=self._max_connections_per_host or 0,
                keepalive_timeout=self._keepalive_expiry,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies
            auto_decompress=False,  # httpx decodes Content-Encoding
            timeout=_NO_TIMEOUT,
            trust_env=False,  # proxies and .netrc are httpx's business
            requote_redirect_url=False,
            max_line_size=65_536,  # h11's limit is on the whole header block: 64 KiB
            max_field_size=65_536,
        )
        # aiohttp sends an idempotent request again, once, when a kept-alive connection closes
        # before the answer (RFC 9112 allows it); in the mesh a request is sent twice only
        # when the route's retry policy says so (retryOn `reset`).
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False
        old_loop, self._loop = self._loop, loop
        if session is not None and old_loop is not None:
            await _close_session(session, old_loop)
        return self._session

    def _client_timeout(self, timeout: Mapping[str, float | None] | None) -> aiohttp.ClientTimeout:
        if not timeout:
            return _NO_TIMEOUT
        connect, read, pool = timeout.get("connect"), timeout.get("read"), timeout.get("pool")
        key = (connect, read, pool)
        cached = self._timeouts.get(key)
        if cached is None:
            if len(self._timeouts) >= _TIMEOUT_CACHE_SIZE:
                self._timeouts.clear()
            cached = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None,
                connect=None if connect is None or pool is None else connect + pool,
                sock_connect=connect,
                sock_read=read,
            )
        return cached


class _ResponseStream(httpx.AsyncByteStream):
    """The body of an aiohttp response, as httpx reads it; releases the connection on aclose."""

    def __init__(
        self, transport: AiohttpTransport, response: aiohttp.ClientResponse, request: httpx.Request
    ) -> None:
        self._transport = transport
        self._response = response
        self._request = request
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _map_error(exc, self._request, queued=False, reading=True) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._in_flight -= 1
        response = self._response
        if response.content.at_eof():
            response.release()  # fully read: the connection goes back to the pool
        else:
            response.close()  # unread bytes on the wire: the connection cannot be reused


def _skip_auto_headers(names: set[str], method: str, has_body: bool) -> list[str] | None:
    """The aiohttp default headers to suppress: those httpx left out of the request, whose
    header `names` (lowercase) are given.

    None (aiohttp's fast path) when httpx sent them all, as `httpx.AsyncClient` does by default.
    """
    skip = [name for lower, name in _AUTO_HEADERS if lower not in names]
    if "content-type" not in names and (has_body or method in _BODY_METHODS):
        skip.append("Content-Type")  # aiohttp would add application/octet-stream
    return skip or None


def _http_version(version: aiohttp.HttpVersion | None) -> bytes:
    if version is None:
        return b"HTTP/1.1"
    return b"HTTP/%d.%d" % (version.major, version.minor)


class _RequestBody:
    """A request's async byte stream as aiohttp sends it, keeping the error the stream itself
    raised (the app's generator failing): that is the app's error, not the network's."""

    def __init__(self, request: httpx.Request) -> None:
        stream = request.stream
        if not isinstance(stream, httpx.AsyncByteStream):
            raise RuntimeError("AiohttpTransport needs an async request stream (httpx.AsyncClient)")
        self._stream = stream
        self.error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


def _ssl_context(path: str) -> ssl.SSLContext:
    """A verifying context trusting the CA bundle at `path` (a file or a directory)."""
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


def _map_error(
    exc: BaseException, request: httpx.Request, *, queued: bool, reading: bool
) -> httpx.TransportError:
    """The httpx exception for an aiohttp (or asyncio timeout) error."""
    message = str(exc) or type(exc).__name__
    error: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # aiohttp's connect phase covers both waiting for a pool slot and opening a socket.
        error = httpx.PoolTimeout if queued else httpx.ConnectTimeout
    elif isinstance(exc, asyncio.TimeoutError):
        error = httpx.ReadTimeout  # sock_read: no bytes from the server in time
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = httpx.ConnectError  # refused, DNS, TLS handshake or certificate
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        error = httpx.RemoteProtocolError  # closed without (the rest of) a response
    elif isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        error = httpx.RemoteProtocolError  # malformed or truncated HTTP message
    elif isinstance(exc, aiohttp.ClientOSError):
        error = httpx.ReadError if reading else httpx.WriteError
    elif isinstance(exc, aiohttp.ClientConnectionError):
        error = httpx.NetworkError
    else:
        error = httpx.TransportError
    return error(message, request=request)


async def _close_session(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop) -> None:
    """Close `session`, which belongs to `loop`, from whatever loop is running now."""
    if loop is asyncio.get_running_loop() or loop.is_closed():
        # On a closed loop aiohttp only marks the session closed: its sockets went with the loop.
        await session.close()
    elif loop.is_running():  # another thread's loop: close it there
        future = asyncio.run_coroutine_threadsafe(session.close(), loop)
        await asyncio.wrap_future(future)
    else:  # a loop that is neither running nor closed cannot be driven from here
        session.detach()
