"""An asyncio HTTP/1.1 transport for httpx: httptools (llhttp) parses, a small pool reuses.

Why not httpx's own async transport: httpcore 1.0.x collapses under concurrency
(encode/httpx#3215). Its `AsyncConnectionPool._assign_requests_to_connections` runs on every
request start and response close and is quadratic in the pool's connections, with a `poll()`
syscall per idle connection per pass, and every pool primitive it creates retries a failing
`import sniffio`. At 64 tasks that bookkeeping is most of the CPU: stock `httpx.AsyncClient`
does ~600-750 req/s on the project's 2-core machine.

Why not aiohttp (meshlib's transport until the sixth session): it keeps throughput, but a
request through `aiohttp.ClientSession` costs ~60 µs of client CPU here, most of it features
httpx already has (cookies, redirects, auth, tracing hooks, header merging, its own timeouts).
This transport does only what a transport must — pool, write, parse — at ~25 µs (`python -m
bench async_client`, rows (b) and (d)). The parsing is llhttp's (through httptools, the parser
uvicorn uses): only the framing around it is written here.

What it does, as httpx's own transport does:

- the request goes out with exactly httpx's headers and body: bytes with their
  `Content-Length`, a streamed body chunked when httpx said `Transfer-Encoding: chunked`
  (raw otherwise), nothing added. A header name or value with CR, LF or NUL is refused
  (`httpx.LocalProtocolError`);
- the response comes back with its raw header list (repeated fields and case kept) and the
  undecoded body (httpx decodes); a body that came whole with the headers is handed over as
  bytes and its connection returns to the pool at once, a longer one is streamed (reading pauses
  while more than 256 KiB wait unread) and its connection returns when httpx closes the
  response after reading it all (closed earlier, the connection is dropped);
- informational answers (1xx but 101) are skipped; a 101, a status below 100, a malformed
  message, a header block over 64 KiB, or a connection closed before the message ends raise
  `httpx.RemoteProtocolError`; a body without length ends when the server closes;
- `request.extensions["timeout"]`: `connect` bounds opening a connection (TCP and TLS)
  (`httpx.ConnectTimeout`), `pool` waiting for one when the pool is full (`httpx.PoolTimeout`),
  `write` each wait for the socket to take more of the request (`httpx.WriteTimeout`), `read`
  each wait for more of the response (`httpx.ReadTimeout`);
- errors map to httpx's: refused, DNS and TLS failures `httpx.ConnectError`, a reset while
  sending `httpx.WriteError`, while receiving `httpx.ReadError`, an app's failing request
  body generator raises the app's own error;
- a request is sent once: a kept-alive connection the server closed under it is an error
  (`RemoteProtocolError`), never sent again here (in the mesh, the retry policy decides);
- `verify` as httpx takes it (`httpx.create_ssl_context`: True, False, a CA bundle path or an
  `ssl.SSLContext`), ALPN `http/1.1`.

HTTP/1.1 only (HTTP/2 and proxies go through httpx's own transports). Connections belong to
the event loop that opened them: used from another loop, the transport starts a new pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import cast

import httptools
import httpx

from meshlib.clients._httpx_headers import from_raw

__all__ = ["Http1Transport"]

_HEADER_LIMIT = 65_536  # bytes of response header block (h11's limit is on the whole block)
_PAUSE_READING = 262_144  # unread response bytes at which reading pauses
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_RESPONSE = "Server disconnected without sending a response."
_CUT_SHORT = "peer closed connection without sending complete message body"

Origin = tuple[str, str, int]  # scheme, host, port


class Http1Transport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=Http1Transport())`: httpx's API, a lean HTTP/1.1 pool.

    `max_connections` bounds the pool (None: unbounded), `max_connections_per_host` each
    origin (None: only the total bound); a request beyond them waits, first come first
    served, up to its pool timeout. `keepalive_expiry` closes connections idle for longer
    (None: kept until the server closes them).
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
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None  # made on the first https request
        self._max_connections = max_connections
        self._max_per_host = max_connections_per_host
        self._keepalive_expiry = keepalive_expiry
        self._pool = _Pool(self)
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol {scheme + '://'!r}.", request=request
            )
        if self._closed:
            raise RuntimeError("Cannot send a request, as the transport has been closed.")
        timeout = request.extensions.get("timeout") or {}
        head = _head(request)
        pool = self._pool
        if pool.loop is not asyncio.get_running_loop():
            pool = self._pool = _Pool(self)  # the old loop's connections went with it
        origin = (scheme, url.raw_host.decode("ascii"), url.port or _DEFAULT_PORTS[scheme])
        connection = await pool.acquire(origin, request, timeout)
        try:
            await connection.send(request, head, timeout.get("write"))
            await connection.wait_head(request, timeout.get("read"))
        except BaseException:
            pool.discard(connection)  # cancelled or failed mid-exchange: its state is unknown
            raise
        if connection.complete:  # the whole body came with the headers: the common case
            body = connection.take_body()
            response = connection.response(httpx.ByteStream(body))
            pool.release(connection)
            return response
        return connection.response(_ResponseStream(pool, connection, request, timeout.get("read")))

    async def aclose(self) -> None:
        self._closed = True
        self._pool.close()

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self._verify
            if isinstance(verify, ssl.SSLContext):
                self._ssl = verify  # the app's, as it made it
            else:
                if isinstance(verify, str):  # a CA bundle file or directory
                    directory = os.path.isdir(verify)
                    self._ssl = ssl.create_default_context(
                        cafile=None if directory else verify, capath=verify if directory else None
                    )
                else:
                    self._ssl = httpx.create_ssl_context(verify=verify)
                self._ssl.set_alpn_protocols(["http/1.1"])
        return self._ssl


def _head(request: httpx.Request) -> bytes:
    """The request line and headers, as bytes. httpx lets any bytes into a header; a CR, LF
    or NUL would split the message (request smuggling), so a head holding more line breaks
    than it has lines is refused."""
    url = request.url
    target = url.raw_path
    raw = request.headers.raw
    head = b"".join(
        [
            b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), target),
            *[b"%s: %s\r\n" % pair for pair in raw],
            b"\r\n",
        ]
    )
    lines = len(raw) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        raise httpx.LocalProtocolError(
            "Illegal character (CR, LF or NUL) in the request line or a header", request=request
        )
    return head


class _Pool:
    """Connections by origin for one event loop: idle ones reused last-in first-out, a
    bounded total, waiters served first come first served."""

    def __init__(self, transport: Http1Transport) -> None:
        self.transport = transport
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None  # made outside a loop: the first request makes a new pool
        self.idle: dict[Origin, list[_Connection]] = {}
        self.open: dict[Origin, int] = {}  # connections per origin, idle or busy
        self.total = 0
        self.waiters: collections.deque[tuple[Origin, asyncio.Future[None]]] = collections.deque()
        self.connections: set[_Connection] = set()

    async def acquire(
        self, origin: Origin, request: httpx.Request, timeout: Mapping[str, float | None]
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = None
        woken_before = False
        while True:
            connection = self._idle_connection(origin, loop.time())
            if connection is not None:
                return connection
            if self._may_open(origin) or self._evict_idle():
                return await self._connect(origin, request, timeout.get("connect"))
            pool_timeout = timeout.get("pool")
            if deadline is None and pool_timeout is not None:
                deadline = loop.time() + pool_timeout
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise httpx.PoolTimeout("Timed out waiting for a connection", request=request)
            waiter: asyncio.Future[None] = loop.create_future()
            entry = (origin, waiter)
            # Woken but beaten to the room (another origin's limit): keep its place in line.
            (self.waiters.appendleft if woken_before else self.waiters.append)(entry)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                self._forget(entry)
                raise httpx.PoolTimeout(
                    "Timed out waiting for a connection", request=request
                ) from None
            except BaseException:
                self._forget(entry)
                if waiter.done() and not waiter.cancelled():
                    self._wake(origin)  # woken as it gave up: the turn passes on
                    self._wake(None)
                raise
            woken_before = True

    def _idle_connection(self, origin: Origin, now: float) -> _Connection | None:
        idle = self.idle.get(origin)
        expiry = self.transport._keepalive_expiry
        while idle:
            connection = idle.pop()
            if connection.closed or (expiry is not None and now - connection.idle_since > expiry):
                self._close(connection)
                continue
            return connection
        return None

    def _may_open(self, origin: Origin) -> bool:
        limit, per_host = self.transport._max_connections, self.transport._max_per_host
        return (limit is None or self.total < limit) and (
            per_host is None or self.open.get(origin, 0) < per_host
        )

    def _evict_idle(self) -> bool:
        """At the total bound, an idle connection to another origin makes room."""
        for idle in self.idle.values():
            if idle:
                self._close(idle.pop(0))  # the longest idle
                return True
        return False

    async def _connect(
        self, origin: Origin, request: httpx.Request, timeout: float | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        scheme, host, port = origin
        connection = _Connection(self, origin)
        self.total += 1
        self.open[origin] = self.open.get(origin, 0) + 1
        self.connections.add(connection)
        ssl_context = self.transport.ssl_context() if scheme == "https" else None
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: connection,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            self._close(connection)
            raise httpx.ConnectTimeout("Timed out opening a connection", request=request) from None
        except (OSError, ssl.SSLError) as exc:
            self._close(connection)
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        except BaseException:
            self._close(connection)
            raise
        return connection

    def release(self, connection: _Connection) -> None:
        """A connection whose response was read to the end goes back to the pool (or is closed
        if it cannot carry another request)."""
        if not connection.reusable or self.transport._closed or self.loop is None:
            self._close(connection)
            return
        connection.reset()
        connection.idle_since = self.loop.time()
        self.idle.setdefault(connection.origin, []).append(connection)
        self._wake(connection.origin)

    def discard(self, connection: _Connection) -> None:
        self._close(connection)

    def lost(self, connection: _Connection) -> None:
        """The server closed `connection`: forget it if idle (a busy one is closed by its
        request, which sees the error)."""
        idle = self.idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self._close(connection)

    def close(self) -> None:
        for connection in list(self.connections):
            self._close(connection)
        self.idle.clear()

    def _close(self, connection: _Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self.total -= 1
        left = self.open[connection.origin] - 1
        if left:
            self.open[connection.origin] = left
        else:
            del self.open[connection.origin]
        connection.close()
        self._wake(None)

    def _wake(self, origin: Origin | None) -> None:
        """Wake the first waiter that can go on: for an idle connection of `origin`, the first
        waiting for that origin; for a freed slot (`origin` None), the first allowed a new
        connection."""
        for entry in self.waiters:
            waiting_for, waiter = entry
            if waiter.done():
                continue
            if waiting_for == origin if origin is not None else self._may_open(waiting_for):
                waiter.set_result(None)
                self._forget(entry)
                return

    def _forget(self, entry: tuple[Origin, asyncio.Future[None]]) -> None:
        with contextlib.suppress(ValueError):  # already woken and removed
            self.waiters.remove(entry)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes a request, parses its response with llhttp."""

    def __init__(self, pool: _Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.closed = False  # the socket is gone (closed here, or by the server)
        self.idle_since = 0.0
        self.reusable = False  # the last response leaves it able to carry another request
        self.complete = False  # the response has been received to its end
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._busy = False  # a request is in flight
        self._head_only = False  # the request was HEAD: its response has no body
        self._status = 0
        self._reason = b""
        self._version = b"HTTP/1.1"
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding: the body's end is known
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._writing_paused = False
        self._error: httpx.TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None  # the reader, waiting for bytes
        self._drain: asyncio.Future[None] | None = None  # the writer, waiting for the socket

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes: no isinstance check
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            self._fail(httpx.RemoteProtocolError("Unexpected data on an idle connection"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            ours = exc.__context__  # raised by a callback below
            if isinstance(ours, httpx.TransportError):
                self._fail(ours)
            else:
                self._fail(httpx.RemoteProtocolError(f"Malformed HTTP response: {exc}"), exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._busy and not self.complete:
            if self._headers_done and not self._framed:
                self._finish_message()  # a body without a length ends when the server closes
                self.reusable = False
            elif self._error is None:
                message = _CUT_SHORT if self._headers_done else _NO_RESPONSE
                if exc is None:
                    self._error = httpx.RemoteProtocolError(message)
                else:
                    self._error = httpx.ReadError(f"{message}: {exc}")
                    self._error.__cause__ = exc
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)  # the writer sees `closed`
        if not self._busy:
            self.pool.lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._header_bytes = 0
        self._framed = False

    def on_status(self, status: bytes) -> None:
        self._reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > _HEADER_LIMIT:
            raise httpx.RemoteProtocolError("Response header block too large")
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # informational: the final answer follows
        if status < 100 or status == 101:
            raise httpx.RemoteProtocolError(f"Invalid response status {status}")
        self._status = status
        version = parser.get_http_version()
        self._version = b"HTTP/1.1" if version == "1.1" else b"HTTP/" + version.encode("ascii")
        self._headers_done = True
        if self._head_only:  # no body follows, whatever Content-Length says
            self._finish_message()
            self._parser = httptools.HttpResponseParser(self)  # the next message starts anew
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_READING and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done and not self.complete:  # not the end of a 1xx
            self._finish_message()
            self._wake()

    def _finish_message(self) -> None:
        self.complete = True
        self.reusable = self._parser.should_keep_alive() and not self.closed

    # -- the request, from the task that sends it ---------------------------------------------

    async def send(self, request: httpx.Request, head: bytes, timeout: float | None) -> None:
        self._busy = True
        self._head_only = request.method == "HEAD"
        transport = self._transport
        assert transport is not None
        chunked = "chunked" in (request.headers.get("transfer-encoding") or "").lower()
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)
            if chunked:
                body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
            transport.write(head + body if body else head)  # one write, one syscall
            await self._drained(request, timeout)
            return
        if not isinstance(stream, httpx.AsyncByteStream):
            raise RuntimeError("Http1Transport needs an async request stream (httpx.AsyncClient)")
        transport.write(head)
        async for chunk in stream:  # an app's failing generator raises its own error
            if chunk:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if not await self._drained(request, timeout):
                return  # the answer came already (an early 413, say): it is what counts
        if chunked:
            transport.write(b"0\r\n\r\n")
        await self._drained(request, timeout)

    async def _drained(self, request: httpx.Request, timeout: float | None) -> bool:
        """Wait while the socket's buffer is full; False when sending should stop because
        the server already answered and closed."""
        while True:
            if self.closed:
                if self._headers_done:
                    return False
                raise self._error_for(request, "Connection lost while sending the request")
            if not self._writing_paused:
                return True
            drain = self._drain = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(drain, timeout)
            except asyncio.TimeoutError:
                raise httpx.WriteTimeout("Timed out sending the request", request=request) from None
            finally:
                self._drain = None

    async def wait_head(self, request: httpx.Request, timeout: float | None) -> None:
        while not self._headers_done:
            await self._wait(request, timeout)

    async def read_chunk(self, request: httpx.Request, timeout: float | None) -> bytes:
        """The next bytes of the body; b"" at its end."""
        body = self._body
        while not body:
            if self.complete:
                return b""
            await self._wait(request, timeout)
        chunk = body.popleft()
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= _PAUSE_READING // 2 and not self.closed:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return chunk

    async def _wait(self, request: httpx.Request, timeout: float | None) -> None:
        """Wait for the next event from the server, at most `timeout` seconds."""
        if self._error is not None:
            raise self._error_for(request)
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except _TimedOut:
            raise httpx.ReadTimeout("Timed out reading the response", request=request) from None
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None and not self._body and not self.complete:
            raise self._error_for(request)

    def _error_for(self, request: httpx.Request, message: str = "") -> httpx.TransportError:
        error = self._error or httpx.WriteError(message)
        error.request = request
        return error

    def take_body(self) -> bytes:
        body = self._body
        self._buffered = 0
        if len(body) == 1:
            return body.pop()
        joined = b"".join(body)
        body.clear()
        return joined

    def response(self, stream: httpx.AsyncByteStream) -> httpx.Response:
        return httpx.Response(
            self._status,
            headers=from_raw(self._headers),
            stream=stream,
            extensions={"http_version": self._version, "reason_phrase": self._reason},
        )

    def reset(self) -> None:
        """Ready for the next request on this connection."""
        self._busy = False
        self.complete = False
        self._headers_done = False
        self._headers = []
        self._body.clear()
        self._buffered = 0

    def close(self) -> None:
        self.reusable = False
        if self._error is None:
            self._error = httpx.ReadError("The connection was closed")
        self._wake()
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.close()

    def _fail(self, error: httpx.TransportError, cause: BaseException | None = None) -> None:
        if self._error is None:
            if cause is not None:
                error.__cause__ = cause
            self._error = error
        self.reusable = False
        self._wake()
        if self._transport is not None:
            self._transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _TimedOut(Exception):
    """Set on a reader's waiter when its read timeout passes."""


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_TimedOut())


class _ResponseStream(httpx.AsyncByteStream):
    """A body longer than what came with the headers, read as httpx asks; the connection
    goes back to the pool when it was read to the end, and is dropped if closed before."""

    def __init__(
        self,
        pool: _Pool,
        connection: _Connection,
        request: httpx.Request,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._request = request
        self._timeout = timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while chunk := await connection.read_chunk(self._request, self._timeout):
            yield chunk

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        connection = self._connection
        if connection.complete and not connection._body:
            self._pool.release(connection)
        else:
            self._pool.discard(connection)
