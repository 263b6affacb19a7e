"""One connection of meshlib's HTTP/1.1 transport (`meshlib.clients._http1`): an asyncio
protocol that writes a request, parses its response with llhttp (httptools) and times each
wait; and the response body stream httpx reads from it.
"""

from __future__ import annotations

import asyncio
import collections
import select
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NoReturn, cast

import httptools
import httpx

from meshlib.clients._http1_request import _LAST_CHUNK, _Outgoing, _tokens
from meshlib.clients._httpx_headers import from_raw

if TYPE_CHECKING:
    from meshlib.clients._http1_pool import _Pool

_HEADER_LIMIT = 65_536  # bytes of response header block (h11's limit is on the whole block)
_PAUSE_READING = 262_144  # unread response bytes at which reading pauses
_NO_RESPONSE = "Server disconnected without sending a response."
_CUT_SHORT = "peer closed connection without sending complete message body"
Origin = tuple[str, str, int, str]  # scheme, host, port, TLS server name


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


def _until(timeout: float | None, deadline: float | None) -> float | None:
    """Seconds to wait: `timeout`, or less when `deadline` (time.monotonic()) comes first."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    return left if timeout is None else min(timeout, left)


def _parser_for(connection: _Connection) -> httptools.HttpResponseParser:
    """llhttp, told not to judge keep-alive itself: it would apply a 1xx's `Connection: close`
    (or its HTTP/1.0) to the connection and fail the final answer that follows, which RFC 9110
    §15.2 says a client must read. Whether the connection is reused is decided here, from the
    final answer (`_keeps_alive`)."""
    parser = httptools.HttpResponseParser(connection)
    parser.set_dangerous_leniencies(lenient_keep_alive=True)
    return parser


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
