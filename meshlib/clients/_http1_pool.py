"""The connection pool of meshlib's HTTP/1.1 transport (`meshlib.clients._http1`): connections
by origin within httpx's limits, idle ones checked before reuse and expired, and requests that
find the pool full served first come, first served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

from meshlib.clients._aio import within
from meshlib.clients._http1_connection import Origin, _Connection, _time_out, _TimedOut, _until

if TYPE_CHECKING:
    from meshlib.clients._http1 import Http1Transport

_CLOSED = "Cannot send a request, as the transport has been closed."
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


def _check_alpn(connection: _Connection) -> None:
    """An app's own SSLContext may offer h2; this transport speaks HTTP/1.1 only."""
    transport = connection._transport
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    chosen = tls.selected_alpn_protocol() if tls is not None else None
    if chosen not in (None, "http/1.1"):
        raise OSError(f"the server chose {chosen!r} by ALPN; this transport speaks HTTP/1.1")
