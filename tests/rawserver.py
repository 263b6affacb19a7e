"""Small asyncio HTTP/1.1 servers on 127.0.0.1 that write exact bytes: for what a well-behaved
server never does (early answers, trickling, stray bytes, closes at the wrong moment).

`async with Server(handler) as server`: `handler(peer)` serves each connection on the running
loop; the server counts connections and records each request's head and body. At exit it
stops every handler, closes every socket and re-raises a handler's unexpected error.
`with ThreadServer(handler) as server`: the same on a loop of its own in a thread, for tests
that block their own loop or use a sync client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def run(main: Callable[[], Coroutine[Any, Any, T]], loop: str = "asyncio") -> T:
    """`main()` on a fresh event loop: asyncio's, or uvloop's (skipped if not installed)."""
    if loop == "asyncio":
        return asyncio.run(main())
    uvloop = pytest.importorskip("uvloop")
    event_loop = uvloop.new_event_loop()
    try:
        return event_loop.run_until_complete(main())  # type: ignore[no-any-return]
    finally:
        event_loop.run_until_complete(event_loop.shutdown_asyncgens())
        event_loop.close()


async def wait_until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def wait_until_sync(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """`wait_until` for a thread without an event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class Peer:
    """One connection the server accepted."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer

    async def head(self) -> bytes:
        """The next request's head, recorded in `server.heads`."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.server.heads.append(head)
        return head

    async def body(self, head: bytes) -> bytes:
        """The body `head` announces (Content-Length or chunked), recorded in `server.bodies`."""
        lines = head.lower().split(b"\r\n")
        body = b""
        if any(line.startswith(b"transfer-encoding:") and b"chunked" in line for line in lines):
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                body += (await self.reader.readexactly(size + 2))[:-2]
                if not size:
                    break
        else:
            for line in lines:
                if line.startswith(b"content-length:"):
                    body = await self.reader.readexactly(int(line.split(b":", 1)[1]))
                    break
        self.server.bodies.append(body)
        return body

    async def request(self) -> bytes:
        """Read a whole request; its target."""
        head = await self.head()
        await self.body(head)
        return target(head)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def target(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


class Server:
    """An asyncio server on 127.0.0.1 whose `handler(peer)` serves each connection."""

    def __init__(
        self, handler: Callable[[Peer], Awaitable[None]], ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.port = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.active = 0  # connections whose handler has not returned
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[bytes]:
        """The targets of the requests received, in order."""
        return [target(head) for head in self.heads]

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks)  # each handler swallows its own cancellation
        await self.drop()
        await self._server.wait_closed()
        if self.errors and exc_info[0] is None:
            raise self.errors[0]

    async def drop(self) -> None:
        """Close every connection from the server's side."""
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def finished(self) -> None:
        """Until every connection's handler has returned (they end when the client closes)."""
        await wait_until(lambda: self.active == 0, "the server's connections to end")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        self.active += 1
        try:
            await self.handler(Peer(self, reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.close()


class ThreadServer:
    """`with ThreadServer(handler) as server`: a `Server` on an event loop of its own, in a
    thread, so that it serves while the test's loop is blocked or the test is synchronous."""

    def __init__(self, handler: Callable[[Peer], Awaitable[None]]) -> None:
        self.server = Server(handler)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the server's loop and wait for it (blocking the caller)."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=10)

    def __enter__(self) -> Server:
        self.thread.start()
        return self.call(self.server.__aenter__())

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.call(self.server.__aexit__(*exc_info))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def answering(reply: bytes | Callable[[bytes], bytes]) -> Callable[[Peer], Awaitable[None]]:
    """A handler answering every request on its connection with `reply` (or
    `reply(target)`)."""

    async def handle(peer: Peer) -> None:
        while True:
            requested = await peer.request()
            await peer.send(reply(requested) if callable(reply) else reply)

    return handle


def held_until(release: asyncio.Event) -> Callable[[Peer], Awaitable[None]]:
    """A handler answering OK to each request once `release` is set: it holds connections."""

    async def handle(peer: Peer) -> None:
        while True:
            await peer.request()
            await release.wait()
            await peer.send(OK)

    return handle
