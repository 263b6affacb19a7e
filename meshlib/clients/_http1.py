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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import select
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NoReturn, cast

import httptools
import httpx

from meshlib._text import ascii_int
from meshlib.clients._aio import trio_running, within
from meshlib.clients._httpx_headers import from_raw

__all__ = ["Http1Transport"]

_HEADER_LIMIT = 65_536  # bytes of response header block (h11's limit is on the whole block)
_PAUSE_READING = 262_144  # unread response bytes at which reading pauses
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_RESPONSE = "Server disconnected without sending a response."
_CUT_SHORT = "peer closed connection without sending complete message body"
_CLOSED = "Cannot send a request, as the transport has been closed."
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token characters
_METHODS_SEEN: set[str] = set()  # methods already checked to be tokens
_LAST_CHUNK = b"0\r\n\r\n"
_CONTROLS = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # not HT, LF, CR
# request.extensions key: when (time.monotonic()) the response headers must have come, at the
# latest. The mesh sets it from a try's time (per-try timeout, route deadline), which the read
# timeout alone — counted from the last bytes received — would not bound.
TRY_DEADLINE = "meshlib.try_deadline"
# request.extensions key: a try's time in seconds, counted from when it has a connection
# (TRY_DEADLINE is then moved up to that end, if sooner).
TRY_TIMEOUT = "meshlib.try_timeout"

Origin = tuple[str, str, int, str]  # scheme, host, port, TLS server name


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


class _Outgoing:
    """A request as it goes on the wire: its head, checked, and how its body is framed."""

    __slots__ = ("body", "chunked", "close", "head", "length", "stream")

    def __init__(self, request: httpx.Request) -> None:
        method = request.method
        if method not in _METHODS_SEEN:
            if not (method.isascii() and _TOKEN.fullmatch(method.encode())):
                raise httpx.LocalProtocolError(f"Illegal method {method!r}", request=request)
            if len(_METHODS_SEEN) < 64:
                _METHODS_SEEN.add(method)
        raw = request.headers.raw
        names = [name for name, _ in raw]
        if raw and (b"" in names or not _TOKEN.fullmatch(b"".join(names))):
            raise httpx.LocalProtocolError("Illegal header name", request=request)
        head = b"".join(
            [
                b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), request.url.raw_path),
                *[b"%s: %s\r\n" % pair for pair in _host_first(raw)],
                b"\r\n",
            ]
        )
        # CR or LF in a value would split the message (request smuggling): a head with more
        # line breaks than it has lines is refused, and so is any other control character
        # but a tab (RFC 9110 §5.5), as h11 refuses them for httpx's own transport.
        lines = len(raw) + 2
        if (
            head.count(b"\n") != lines
            or head.count(b"\r") != lines
            or len(head.translate(None, _CONTROLS)) != len(head)
        ):
            raise httpx.LocalProtocolError(
                "Illegal character (CR, LF or another control character) in the request target"
                " or a header",
                request=request,
            )
        self.head = head
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        self.close = False  # the request says `Connection: close`
        for name, value in raw:
            if len(name) == 14 and name.lower() == b"content-length":
                lengths.add(value.strip())
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                codings += _tokens(value)
            elif len(name) == 10 and name.lower() == b"connection":
                self.close = self.close or b"close" in _tokens(value)
        # The body's framing must be unambiguous, or the server reads a different message
        # than the one sent: one Content-Length, or chunked as the last and only chunking.
        self.chunked = bool(codings)
        if codings and (codings[-1] != b"chunked" or codings.count(b"chunked") != 1):
            raise httpx.LocalProtocolError(
                f"Transfer-Encoding {b', '.join(codings).decode('latin-1')!r} does not end in"
                " chunked: the body cannot be framed",
                request=request,
            )
        length = None
        if lengths and not codings:
            if len(lengths) > 1:
                raise httpx.LocalProtocolError("Conflicting Content-Length", request=request)
            length = ascii_int(lengths.pop().decode("latin-1"), 19)
            if length is None:
                raise httpx.LocalProtocolError("Illegal Content-Length", request=request)
        elif lengths:
            raise httpx.LocalProtocolError(
                "Both Content-Length and Transfer-Encoding", request=request
            )
        self.length = length
        stream = request.stream
        self.stream = stream
        self.body: bytes | None = None
        if isinstance(stream, httpx.ByteStream):  # bytes known up front: checked, framed now
            data = b"".join(stream)
            framed = self.framed(data, request)
            self.check_complete(len(data), request)
            self.body = framed + _LAST_CHUNK if self.chunked else framed

    def framed(self, data: bytes, request: httpx.Request, sent: int = 0) -> bytes:
        """`data` as it goes on the wire after `sent` bytes of body."""
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if self.length is None:
            if data:
                raise httpx.LocalProtocolError(
                    "Request body without Content-Length or Transfer-Encoding", request=request
                )
        elif sent + len(data) > self.length:
            raise httpx.LocalProtocolError(
                "Too much data for declared Content-Length", request=request
            )
        return data

    def check_complete(self, sent: int, request: httpx.Request) -> None:
        if self.length is not None and sent != self.length:
            raise httpx.LocalProtocolError(
                "Too little data for declared Content-Length", request=request
            )


_ROOM = "room"  # a waiter's turn: a connection slot reserved for it to open


class _Pool:
    """Connections by origin for one event loop: idle ones reused last in first out, bounded
    in total and per host. When the pool is full, requests wait in line: a released
    connection goes straight to the first waiting for its origin, and freed room to the first
    that may use it — a request arriving later never overtakes them."""

    def __init__(self, transport: Http1Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.idle: dict[Origin, list[_Connection]] = {}  # oldest first
        self.idle_count = 0
        # Slots per host (origin[:3]) and in all: connections, idle or busy, and room reserved
        # for a waiter about to connect.
        self.open: dict[tuple[str, str, int], int] = {}
        self.total = 0
        self.connections: set[_Connection] = set()
        self.waiters: collections.deque[tuple[Origin, asyncio.Future[object]]] = collections.deque()
        self.closed = False

    async def acquire(
        self,
        origin: Origin,
        request: httpx.Request,
        timeout: Mapping[str, float | None],
        deadline: float | None,
    ) -> _Connection:
        if self.closed:
            raise RuntimeError(_CLOSED)
        connection = self._idle_connection(origin)
        if connection is not None:
            return connection
        if self._may_open(origin) or self._make_room(origin):
            self._reserve(origin)
        else:
            turn = await self._wait_turn(origin, request, timeout.get("pool"), deadline)
            if self.closed:  # closed while its turn was on the way: what it got is gone
                if turn is _ROOM:
                    self._unreserve(origin)
                raise RuntimeError(_CLOSED)
            if isinstance(turn, _Connection):
                if turn.usable(self.loop.time()):
                    return turn
                self._retire(turn)  # dead already: its slot is this request's to reconnect
            elif turn is not _ROOM:
                raise RuntimeError(_CLOSED)  # woken by the transport's close()
        return await self._connect(origin, request, timeout.get("connect"), deadline)

    async def _wait_turn(
        self,
        origin: Origin,
        request: httpx.Request,
        pool_timeout: float | None,
        deadline: float | None,
    ) -> object:
        """Wait in line: a connection handed over, `_ROOM` reserved, or None (closed)."""
        waiter: asyncio.Future[object] = self.loop.create_future()
        entry = (origin, waiter)
        self.waiters.append(entry)
        bound = _until(pool_timeout, deadline)
        timer = None if bound is None else self.loop.call_later(bound, _time_out, waiter)
        try:
            return await waiter
        except _TimedOut:
            raise httpx.PoolTimeout("Timed out waiting for a connection", request=request) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._pass_on(origin, waiter.result())  # its turn came as it gave up
            raise
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(ValueError):  # gone if its turn came
                self.waiters.remove(entry)

    def _pass_on(self, origin: Origin, turn: object) -> None:
        if isinstance(turn, _Connection):
            self.release(turn)
        elif turn is _ROOM:
            self._unreserve(origin)
            self._grant()

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self.idle.get(origin)
        found = None
        while idle and found is None:
            connection = idle.pop()  # the most recently used
            self.idle_count -= 1
            if not idle:
                del self.idle[origin]  # only origins with idle connections are kept
            if connection.usable(self.loop.time()):
                found = connection
            else:
                self._close(connection)
            idle = self.idle.get(origin)
        return found

    def _origin_allows(self, origin: Origin) -> bool:
        per_host = self.transport._max_per_host
        return per_host is None or self.open.get(origin[:3], 0) < per_host

    def _may_open(self, origin: Origin) -> bool:
        limit = self.transport._max_connections
        return (limit is None or self.total < limit) and self._origin_allows(origin)

    def _make_room(self, origin: Origin) -> bool:
        """Close idle connections that stand in `origin`'s way — the host's own under
        another TLS name at the per-host bound, the longest idle at the total bound — while
        that gives it room (freed room goes to requests already waiting first)."""
        while not self._may_open(origin):
            victim = self._victim_for(origin)
            if victim is None:
                return False
            self._close(victim)
        return True

    def _victim_for(self, origin: Origin) -> _Connection | None:
        """The idle connection to close to make room for `origin`, taken out of the idle
        lists; None if closing one would not help."""
        host = None if self._origin_allows(origin) else origin[:3]
        oldest: Origin | None = None
        for candidate, idle in self.idle.items():
            if host is not None and candidate[:3] != host:
                continue
            if oldest is None or idle[0].idle_since < self.idle[oldest][0].idle_since:
                oldest = candidate
        return None if oldest is None else self._take_oldest(oldest)

    def _take_oldest(self, origin: Origin) -> _Connection:
        idle = self.idle[origin]
        connection = idle.pop(0)
        self.idle_count -= 1
        if not idle:
            del self.idle[origin]
        return connection

    def _reserve(self, origin: Origin) -> None:
        host = origin[:3]
        self.total += 1
        self.open[host] = self.open.get(host, 0) + 1

    def _unreserve(self, origin: Origin) -> None:
        host = origin[:3]
        self.total -= 1
        left = self.open[host] - 1
        if left:
            self.open[host] = left
        else:
            del self.open[host]

    async def _connect(
        self,
        origin: Origin,
        request: httpx.Request,
        timeout: float | None,
        deadline: float | None,
    ) -> _Connection:
        """A new connection to `origin`, in the slot reserved for it."""
        scheme, host, port, sni = origin
        connection = _Connection(self, origin)
        self.connections.add(connection)
        tls = self.transport._ssl if scheme == "https" else None
        try:
            bound = _until(timeout, deadline)
            if bound is not None and bound <= 0:
                raise asyncio.TimeoutError
            opening = self.loop.create_connection(
                lambda: connection,
                host,
                port,
                ssl=tls,
                server_hostname=sni if tls is not None else None,
            )
            await within(opening, bound)
            if tls is not None:
                _check_alpn(connection)
        except (asyncio.TimeoutError, TimeoutError):
            self._close(connection)
            raise httpx.ConnectTimeout("Timed out opening a connection", request=request) from None
        except OSError as exc:  # refused, DNS, TLS (ssl.SSLError is an OSError)
            self._close(connection)
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        except BaseException:
            self._close(connection)
            raise
        if self.closed:  # the transport was closed meanwhile
            self._close(connection)
            raise RuntimeError(_CLOSED)
        return connection  # (an answer the server sent at once is read as the response)

    def release(self, connection: _Connection) -> None:
        """A connection whose response was read to its end goes to the first request waiting
        for its origin, else back to the pool; it is closed if it cannot carry another."""
        if not connection.reusable or self.closed or connection not in self.connections:
            self._close(connection)
            return
        connection.reset()
        connection.idle_since = now = self.loop.time()
        for entry in self.waiters:
            if entry[0] == connection.origin and not entry[1].done():
                self.waiters.remove(entry)
                # In flight from now on: if the server closes it before the waiter runs, the
                # slot stays the waiter's (connection_lost leaves busy connections alone).
                connection._busy = True
                entry[1].set_result(connection)
                return
        self.idle.setdefault(connection.origin, []).append(connection)
        self.idle_count += 1
        self._prune(now)
        self._grant()  # a request for another origin may replace it

    def discard(self, connection: _Connection) -> None:
        self._close(connection)

    def lost(self, connection: _Connection) -> None:
        """The server closed an idle connection."""
        idle = self.idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self.idle_count -= 1
            if not idle:
                del self.idle[connection.origin]
        self._close(connection)

    def close(self) -> None:
        self.closed = True
        for connection in list(self.connections):
            self._retire(connection)
            self._unreserve(connection.origin)
        self.idle.clear()
        self.idle_count = 0
        while self.waiters:  # each wakes to find the pool closed
            _, waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _prune(self, now: float) -> None:
        """Close idle connections past their keep-alive expiry, and the longest idle beyond
        `max_keepalive_connections`."""
        expiry = self.transport._keepalive_expiry
        if expiry is not None:
            for origin in [o for o, idle in self.idle.items() if now - idle[0].idle_since > expiry]:
                while origin in self.idle and now - self.idle[origin][0].idle_since > expiry:
                    self._close(self._take_oldest(origin))
        limit = self.transport._max_idle
        while limit is not None and self.idle_count > limit:
            oldest = min(self.idle, key=lambda origin: self.idle[origin][0].idle_since)
            self._close(self._take_oldest(oldest))

    def _retire(self, connection: _Connection) -> None:
        """Close `connection` and forget it, its slot kept (for whoever takes it over)."""
        connection.close()
        self.connections.discard(connection)

    def _close(self, connection: _Connection) -> None:
        """Close `connection` (no longer idle) and give its slot to the first in line."""
        connection.close()
        if connection in self.connections:
            self.connections.discard(connection)
            self._unreserve(connection.origin)
            self._grant()

    def _grant(self) -> None:
        """Give room to requests waiting in line, first come first served, while there is
        room to give (closing idle connections that stand in a waiter's way)."""
        for entry in list(self.waiters):
            origin, waiter = entry
            if waiter.done():
                continue
            while not self._may_open(origin):
                victim = self._victim_for(origin)
                if victim is None:
                    break
                victim.close()
                self.connections.discard(victim)
                self._unreserve(victim.origin)
            if self._may_open(origin):
                self._reserve(origin)
                self.waiters.remove(entry)
                waiter.set_result(_ROOM)


def _until(timeout: float | None, deadline: float | None) -> float | None:
    """Seconds to wait: `timeout`, or less when `deadline` (time.monotonic()) comes first."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    return left if timeout is None else min(timeout, left)


def _check_alpn(connection: _Connection) -> None:
    """An app's own SSLContext may offer h2; this transport speaks HTTP/1.1 only."""
    transport = connection._transport
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    chosen = tls.selected_alpn_protocol() if tls is not None else None
    if chosen not in (None, "http/1.1"):
        raise OSError(f"the server chose {chosen!r} by ALPN; this transport speaks HTTP/1.1")


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes a request, parses its response with llhttp."""

    def __init__(self, pool: _Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.closing = False  # closed, or being closed, from this side
        self.closed = False  # the socket is gone
        self.idle_since = 0.0
        self.reusable = False  # the response just read leaves it able to carry another
        self.complete = False  # the response has been received to its end
        self.error: httpx.TransportError | None = None
        self._transport: asyncio.Transport | None = None
        self._parser = _parser_for(self)
        self._busy = True  # a request is in flight (made for one: an early answer is its)
        self._head_only = False  # the request was HEAD: its response has no body
        self._status = 0
        self._reason = b""
        self._version = b"HTTP/1.1"
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._head_bytes = 0  # bytes received before the final response's headers were whole
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding: the body's end is known
        self._persistent = False  # the final answer lets the connection stay open (§9.3)
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None  # the reader, waiting for bytes
        self._drain: asyncio.Future[None] | None = None  # the writer, waiting for the socket
        self._timer: asyncio.TimerHandle | None = None
        self._last_bytes = 0.0  # when bytes last came (the read timeout counts from there)
        self._close_after = False  # the request said `Connection: close`
        self._poller: select.poll | None = None  # made on the first check before a reuse
        self._refused: httpx.RemoteProtocolError | None = None  # a callback's, for feed_data

    def usable(self, now: float) -> bool:
        expiry = self.pool.transport._keepalive_expiry
        if self.closing or self.closed or self.error is not None:
            return False
        if expiry is not None and now - self.idle_since > expiry:
            return False
        # The server may have closed it without this loop having seen it yet (busy, or the
        # close still in flight): a readable idle socket — EOF, or bytes nobody asked for —
        # is not reused. One poll(2) per reuse, as httpcore does.
        return not self._readable()

    def _readable(self) -> bool:
        try:
            poller = self._poller
            if poller is None:
                sock = self._transport.get_extra_info("socket") if self._transport else None
                if sock is None:
                    return False
                if not hasattr(select, "poll"):  # Windows: select() takes any socket there
                    return bool(select.select([sock], [], [], 0)[0])
                poller = self._poller = select.poll()  # not select(): any descriptor number
                poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True  # a socket poll cannot look at is not one to reuse

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes: no isinstance check
        self._transport = cast(asyncio.Transport, transport)
        if self.closing:  # closed while it was connecting
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._last_bytes = self.loop.time()
        if not self._busy:
            self._fail(httpx.RemoteProtocolError("Unexpected data on an idle connection"))
            return
        heading = not self._headers_done
        if heading:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback below refused the response (`_refuse`), or llhttp did. Not read from
            # exc.__context__: that is whatever exception was being handled, maybe another's.
            ours, self._refused = self._refused, None
            if ours is not None:
                self._fail(ours)
            else:
                self._fail(httpx.RemoteProtocolError(f"Malformed HTTP response: {exc}"), exc)
            return
        if heading and not self._headers_done and self._head_bytes > _HEADER_LIMIT:
            # llhttp hands over a header (or the status line) only once its line ends: an
            # endless one would grow without bound, its bytes keeping the read timeout away.
            self._fail(httpx.RemoteProtocolError("Response header block too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._busy and not self.complete and self.error is None:
            if self._headers_done and not self._framed and exc is None:
                self.complete = True  # a body without a length ends when the server closes
            else:
                message = _CUT_SHORT if self._headers_done else _NO_RESPONSE
                if exc is None:
                    self.error = httpx.RemoteProtocolError(message)
                else:
                    self.error = httpx.ReadError(f"{message}: {exc}")
                    self.error.__cause__ = exc
        self._wake()
        self._wake_writer()  # it finds the connection closed
        if not self._busy:
            self.pool.lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- httptools callbacks -------------------------------------------------------------

    def _refuse(self, message: str) -> NoReturn:
        """Stop the parser from a callback; data_received fails the connection with this."""
        error = self._refused = httpx.RemoteProtocolError(message)
        raise error

    def on_message_begin(self) -> None:
        if self._headers_done:  # a second message: bytes the server had no request for
            self._refuse("Unexpected data after the response")
        self._headers = []
        self._header_bytes = 0
        self._framed = False
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > _HEADER_LIMIT:
            self._refuse("Response header block too large")
        if self._headers_done:
            return  # a trailer of a chunked body: not a response header
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True
        self._headers.append((name, value.rstrip(b" \t")))  # no trailing whitespace, as h11

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # informational: the final answer follows
        if status < 100 or status == 101:
            self._refuse(f"Invalid response status {status}")
        if self._framed and not self._head_only and status not in (204, 304):
            _check_transfer_coding(self._headers, self._refuse)
        self._status = status
        version = parser.get_http_version()
        self._version = b"HTTP/1.1" if version == "1.1" else b"HTTP/" + version.encode("ascii")
        self._headers_done = True
        self._persistent = _keeps_alive(version, self._headers)
        if self._head_only:
            # No body follows, whatever Content-Length says; llhttp cannot be told so, so the
            # next response gets a parser of its own and this one's remaining bytes are extra.
            self.complete = True
            self.reusable = self._persistent and not self._close_after
            self._parser = _parser_for(self)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD answer: the connection is out of step
            self.reusable = False
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_READING and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._headers_done or self.complete:  # a 1xx's end, or a HEAD answer's
            return
        self.complete = True
        self.reusable = (
            self._persistent
            and (self._framed or self._status in (204, 304))  # not a body read until close
            and not self._close_after
            and (self._version == b"HTTP/1.1" or not _has_transfer_encoding(self._headers))
        )
        self._wake()

    # -- the exchange, driven by the task that sends the request -------------------------

    async def send(
        self,
        request: httpx.Request,
        outgoing: _Outgoing,
        timeout: float | None,
        deadline: float | None,
    ) -> None:
        self._busy = True
        self._head_only = request.method == "HEAD"
        self._close_after = outgoing.close
        self._last_bytes = self.loop.time()
        if self._headers_done or self.error is not None:
            # The server answered (or failed) before the request went out, as an overloaded
            # one may on a new connection: that is the answer, and the request is not sent
            # (the server would take it for the next one, and its answer would reach whoever
            # used the connection next), nor is the connection used again.
            self._close_after = True
            self.reusable = False
            return
        if outgoing.body is not None:
            if self._write(outgoing.head + outgoing.body, request):  # one write, one syscall
                await self._drained(request, timeout, deadline)
            return
        stream = outgoing.stream
        if not isinstance(stream, httpx.AsyncByteStream):
            raise RuntimeError("Http1Transport needs an async request stream (httpx.AsyncClient)")
        if not self._write(outgoing.head, request):
            return
        sent = 0
        async for chunk in stream:  # an app's failing generator raises its own error
            data = outgoing.framed(chunk, request, sent)
            sent += len(chunk)
            if data and not (
                self._write(data, request) and await self._drained(request, timeout, deadline)
            ):
                return  # the server answered already (an early 413, say): that answer stands
        outgoing.check_complete(sent, request)
        if outgoing.chunked and not self._write(_LAST_CHUNK, request):
            return
        await self._drained(request, timeout, deadline)

    def _write(self, data: bytes, request: httpx.Request) -> bool:
        """Hand `data` to the socket; False when sending should stop, the server having
        answered and closed."""
        if self.closing or self.closed:
            return self._stopped(request)
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            # A write found the connection reset and closed the transport; connection_lost
            # comes a loop turn later, and a body generator that never awaits would be
            # pulled whole into the dead socket meanwhile.
            return self._stopped(request)
        try:
            transport.write(data)
        except RuntimeError:  # uvloop: the transport closed under us
            return self._stopped(request)
        return True

    async def _drained(
        self, request: httpx.Request, timeout: float | None, deadline: float | None
    ) -> bool:
        """Wait while the socket's buffer is full (`timeout` each time, until `deadline` in
        all); False as `_write`."""
        while True:
            if self.closing or self.closed:
                return self._stopped(request)
            if not self._writing_paused:
                return True
            drain = self._drain = self.loop.create_future()
            bound = _until(timeout, deadline)
            timer = None if bound is None else self.loop.call_later(max(bound, 0), _time_out, drain)
            try:
                await drain
            except _TimedOut:
                raise httpx.WriteTimeout("Timed out sending the request", request=request) from None
            finally:
                self._drain = None
                if timer is not None:
                    timer.cancel()

    def _stopped(self, request: httpx.Request) -> bool:
        if self._headers_done:
            return False
        error = self.error or httpx.WriteError("Connection lost while sending the request")
        error.request = request
        raise error

    async def wait_head(
        self, request: httpx.Request, timeout: float | None, deadline: float | None
    ) -> None:
        while not self._headers_done:
            await self._wait(request, timeout, deadline)

    async def read_chunk(self, request: httpx.Request, timeout: float | None) -> bytes:
        """The next bytes of the body; b"" at its end."""
        body = self._body
        while not body:
            if self.complete:
                return b""
            await self._wait(request, timeout)
        chunk = body.popleft()
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= _PAUSE_READING // 2:
            self._resume_reading()
        return chunk

    async def _wait(
        self, request: httpx.Request, timeout: float | None, deadline: float | None = None
    ) -> None:
        """Wait for the next event from the server: at most `timeout` seconds without a byte
        arriving, and not past `deadline` (`time.monotonic()`)."""
        if self.error is not None:
            raise self._error_for(request)
        waiter = self._waiter = self.loop.create_future()
        if timeout is not None or deadline is not None:
            self._last_bytes = max(self._last_bytes, self.loop.time())
            self._timer = self.loop.call_later(
                self._delay(timeout, deadline), self._check_quiet, waiter, timeout, deadline
            )
        try:
            await waiter
        except _TimedOut:
            raise httpx.ReadTimeout("Timed out reading the response", request=request) from None
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self.error is not None and not self._body and not self.complete:
            raise self._error_for(request)

    def _delay(self, timeout: float | None, deadline: float | None) -> float:
        """Seconds until the read timeout or the deadline passes, whichever is first."""
        delay = float("inf")
        if timeout is not None:
            delay = timeout - (self.loop.time() - self._last_bytes)
        if deadline is not None:
            delay = min(delay, deadline - time.monotonic())
        return max(delay, 0.0)

    def _check_quiet(
        self, waiter: asyncio.Future[None], timeout: float | None, deadline: float | None
    ) -> None:
        """The read timer: bytes that came meanwhile start the read timeout's count again;
        the deadline does not move."""
        if waiter.done():
            return
        delay = self._delay(timeout, deadline)
        if delay > 0.001:  # uvloop's clock counts milliseconds: less is due now
            self._timer = self.loop.call_later(delay, self._check_quiet, waiter, timeout, deadline)
        else:
            waiter.set_exception(_TimedOut())

    def _error_for(self, request: httpx.Request) -> httpx.TransportError:
        error = self.error or httpx.ReadError("The connection was closed")
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
        self._head_bytes = 0
        self._head_only = False
        self._headers_done = False
        self._headers = []
        self._body.clear()
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()

    def close(self) -> None:
        """Close from this side (idempotent); a reader or writer waiting gets an error."""
        self.reusable = False
        if self.closing:
            return
        self.closing = True
        if self.error is None:
            self.error = httpx.ReadError("The connection was closed")
        self._wake()
        self._wake_writer()
        if self._transport is not None and not self.closed:
            self._transport.close()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._transport is not None and not self.closing and not self.closed:
            self._transport.resume_reading()

    def _fail(self, error: httpx.TransportError, cause: BaseException | None = None) -> None:
        if self.error is None:
            if cause is not None:
                error.__cause__ = cause
            self.error = error
        self.reusable = False
        self.closing = True
        self._wake()
        self._wake_writer()  # it stops
        if self._transport is not None and not self.closed:
            self._transport.close()

    def _wake(self) -> None:
        """Wake the reader waiting for the server, if any."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        """Wake the writer waiting for the socket to take more, if any."""
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)


class _TimedOut(Exception):
    """Set on a waiter whose timeout passed."""


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_TimedOut())


def _parser_for(connection: _Connection) -> httptools.HttpResponseParser:
    """llhttp, told not to judge keep-alive itself: it would apply a 1xx's `Connection: close`
    (or its HTTP/1.0) to the connection and fail the final answer that follows, which RFC 9110
    §15.2 says a client must read. Whether the connection is reused is decided here, from the
    final answer (`_keeps_alive`)."""
    parser = httptools.HttpResponseParser(connection)
    parser.set_dangerous_leniencies(lenient_keep_alive=True)
    return parser


def _host_first(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with Host first, as RFC 9112 §3.2 asks and h11 sends them (httpx puts the
    Host it adds first; one the caller or the mesh set comes where it was set)."""
    for i, (name, _) in enumerate(raw):
        if len(name) == 4 and name.lower() == b"host":
            return raw if i == 0 else [raw[i], *raw[:i], *raw[i + 1 :]]
    return raw


def _check_transfer_coding(
    headers: list[tuple[bytes, bytes]], refuse: Callable[[str], NoReturn]
) -> None:
    """A body's transfer coding must be chunked alone: llhttp undoes chunked and nothing else,
    so `gzip, chunked` (or chunked twice) would reach the caller still encoded. Refused as
    httpx's transport refuses it (RFC 9112 §6.1, §7)."""
    codings = [
        token
        for name, value in headers
        if len(name) == 17 and name.lower() == b"transfer-encoding"
        for token in _tokens(value)
    ]
    if codings and codings != [b"chunked"]:
        refuse("Only Transfer-Encoding: chunked is supported")


def _tokens(value: bytes) -> list[bytes]:
    """The comma-separated tokens of a header value (Connection, Transfer-Encoding), lowercase."""
    return [token.strip().lower() for token in value.split(b",")]


def _has_transfer_encoding(headers: list[tuple[bytes, bytes]]) -> bool:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing, and the
    connection must be closed after it."""
    return any(len(name) == 17 and name.lower() == b"transfer-encoding" for name, _ in headers)


def _keeps_alive(version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """RFC 9112 §9.3, for answers whose framing llhttp cannot judge (to HEAD)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(_tokens(value))
    if b"close" in tokens:
        return False
    return version == "1.1" or b"keep-alive" in tokens


class _ResponseStream(httpx.AsyncByteStream):
    """A body longer than what came with the headers, read as httpx asks; the connection
    goes back to the pool when it was read to the end, and is dropped if closed before."""

    def __init__(
        self, connection: _Connection, request: httpx.Request, timeout: float | None
    ) -> None:
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
            connection.pool.release(connection)
        else:
            connection.pool.discard(connection)
