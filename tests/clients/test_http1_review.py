"""Http1Transport and meshlib.AsyncClient at the edges a third review found: a full pool served
first come first served, bounded waits that keep both timeouts and cancellations, the try's
deadline owning the timeouts it causes and stopping a late request from being sent, ALPN, the
per-host bound across TLS names, and mirrored copies kept off the calls' own pool.

Servers are the raw asyncio servers of `tests.rawserver`; tests wait by polling or events.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import httpx
import pytest
import trustme

import meshlib
from meshlib.clients._aio import within
from meshlib.clients._http1 import TRY_DEADLINE, Http1Transport
from tests.clients.test_async_client_edges import ROUTE, SHADOW, URL, make_mesh, virtual_service
from tests.rawserver import (
    OK,
    Peer,
    Server,
    ThreadServer,
    answering,
    held_until,
    run,
    wait_until,
    wait_until_sync,
)

TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 1.0}


def get(url: str, **extensions: Any) -> httpx.Request:
    return httpx.Request("GET", url, extensions={"timeout": TIMEOUTS, **extensions})


async def fetch(transport: Http1Transport, request: httpx.Request) -> bytes:
    response = await transport.handle_async_request(request)
    try:
        return await response.aread()
    finally:
        await response.aclose()


def test_a_waiting_request_is_served_before_a_busy_caller_takes_the_connection_again() -> None:
    """max_connections=1 and a task calling in a loop: a request that waits gets the
    connection at the next release (it used to wait for its pool timeout while the looping
    task took the connection back each time)."""

    async def main() -> float:
        async with Server(answering(OK)) as server:
            transport = Http1Transport(max_connections=1)
            stop = asyncio.Event()

            async def hog() -> None:
                while not stop.is_set():
                    await fetch(transport, get(server.url + "/hog"))

            task = asyncio.create_task(hog())
            await wait_until(lambda: len(server.heads) >= 3, "the looping task to run")
            started = time.monotonic()
            assert await fetch(transport, get(server.url + "/waiter")) == b"ok"
            waited = time.monotonic() - started
            stop.set()
            await task
            await transport.aclose()
            return waited

    assert run(main) < 0.8  # well before the pool timeout (1 s) it used to wait for


def test_within_keeps_a_timeout_in_a_task_that_once_swallowed_a_cancellation() -> None:
    """Code that catches CancelledError (cleanup) and then makes a call: a connect timeout
    there is still a timeout, not a CancelledError."""

    async def main() -> str:
        try:
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass  # swallowed, without uncancel(): the task's count stays raised on 3.11
        try:
            await within(asyncio.sleep(10), 0.05)
        except asyncio.TimeoutError:
            return "timeout"
        return "no timeout"

    assert run(main) == "timeout"


def test_within_never_loses_the_callers_cancellation() -> None:
    async def main() -> str:
        task = asyncio.create_task(within(asyncio.sleep(10), 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "carried on"

    assert run(main) == "cancelled"


@pytest.mark.parametrize("caller_read", [5.0, 0.5])
def test_the_try_deadline_owns_the_timeout_it_causes(caller_read: float) -> None:
    """Response headers trickling past the route's 1 s timeout end the try with 504 UT even
    when the caller's own read timeout (0.5 s, per read) is shorter than the try: it never
    fired, the try's deadline did."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-Slow: " + b"v" * 80 + b"\r\n"

    async def trickle(peer: Peer) -> None:
        await peer.request()
        for byte in head:
            await peer.send(bytes([byte]))
            await asyncio.sleep(0.02)
        await peer.send(b"\r\nok")
        await peer.reader.read()

    async def main() -> tuple[int, list[str], float]:
        async with Server(trickle) as server:
            with make_mesh(server.port, virtual_service(ROUTE + "\n  timeout: 1s")) as mesh:
                timeout = httpx.Timeout(5.0, read=caller_read)
                async with meshlib.AsyncClient(mesh=mesh, timeout=timeout) as client:
                    started = time.monotonic()
                    response = await client.get(URL)
                    elapsed = time.monotonic() - started
                    return response.status_code, response.extensions["response_flags"], elapsed

    status, flags, elapsed = run(main)
    assert (status, flags) == (504, ["UT"])
    assert elapsed < 1.8


def test_a_request_is_not_sent_once_its_try_deadline_has_passed() -> None:
    """The try's time runs out while the request waits for a connection: it is never sent
    (an upstream would do work whose answer is dropped, or twice with a retry)."""

    async def main() -> tuple[type[BaseException], list[bytes]]:
        release = asyncio.Event()
        async with Server(held_until(release)) as server:
            transport = Http1Transport(max_connections=1)
            held = asyncio.create_task(fetch(transport, get(server.url + "/held")))
            await wait_until(lambda: server.requests == [b"/held"], "the first request")
            deadline = time.monotonic() + 0.2
            # the connection frees up after the deadline, well within the pool timeout
            asyncio.get_running_loop().call_later(0.4, release.set)
            request = httpx.Request(
                "POST",
                server.url + "/charge",
                content=b"x",
                extensions={"timeout": TIMEOUTS, TRY_DEADLINE: deadline},
            )
            error: type[BaseException] = type(None)  # type: ignore[assignment]
            try:
                await fetch(transport, request)
            except httpx.TimeoutException as exc:
                error = type(exc)
            await held
            await transport.aclose()
            return error, server.requests

    error, requests = run(main)
    assert issubclass(error, httpx.TimeoutException)
    assert requests == [b"/held"]


def test_a_server_choosing_h2_by_alpn_is_refused() -> None:
    """An app's own SSLContext may offer h2 (it serves HTTP/2 elsewhere); the transport
    speaks HTTP/1.1 only, so a server choosing h2 is a ConnectError, not garbled bytes."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_context.set_alpn_protocols(["h2", "http/1.1"])

    async def main() -> None:
        async with Server(answering(OK), ssl_context=server_context) as server:
            transport = Http1Transport(verify=client_context)
            url = f"https://localhost:{server.port}/"
            with pytest.raises(httpx.ConnectError, match="h2"):
                await fetch(transport, get(url))
            await transport.aclose()

    run(main)


def test_the_per_host_bound_counts_a_host_once_across_tls_names() -> None:
    """max_connections_per_host=1: the host's only connection, idle under another TLS name,
    is replaced for a request under a new name instead of the request waiting for its pool
    timeout."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("one.test", "two.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def main() -> list[bytes]:
        async with Server(answering(OK), ssl_context=server_context) as server:
            transport = Http1Transport(verify=client_context, max_connections_per_host=1)
            url = f"https://127.0.0.1:{server.port}/"
            bodies = [
                await fetch(transport, get(url, sni_hostname=name))
                for name in ("one.test", "two.test")
            ]
            assert transport._pool is not None and transport._pool.total == 1
            await transport.aclose()
            return bodies

    assert run(main) == [b"ok", b"ok"]


def test_mirrored_copies_held_by_a_slow_shadow_never_hold_up_the_calls() -> None:
    """A shadow that never answers holds every copy: the copies fill a pool of their own
    (100 connections, the rest waiting there), and the calls themselves go on at once."""

    async def main() -> tuple[list[int], int]:
        release = asyncio.Event()
        async with Server(held_until(release)) as shadow, Server(answering(OK)) as api:
            documents = (virtual_service(ROUTE + f"\n  mirror: {{host: {SHADOW}}}"),)
            with make_mesh(api.port, *documents, shadow_port=shadow.port) as mesh:
                async with meshlib.AsyncClient(mesh=mesh, timeout=2.0) as client:
                    statuses = [(await client.get(URL)).status_code for _ in range(120)]
                    await wait_until(lambda: shadow.connections == 100, "the copies' pool")
                    release.set()
                    return statuses, shadow.connections

    statuses, shadow_connections = run(main)
    assert statuses == [200] * 120
    assert shadow_connections == 100


@pytest.mark.parametrize("how", ["transport", "instrument"])
def test_copies_beside_a_stock_inner_transport_have_a_pool_of_their_own(how: str) -> None:
    """The same with an inner transport that is httpx's own (given as `transport=`, or a stock
    client under `instrument()`): copies go through a pool like it, of their own, not the
    caller's two connections, which a held shadow would otherwise take."""

    async def main() -> list[int]:
        release = asyncio.Event()
        async with Server(held_until(release)) as shadow, Server(answering(OK)) as api:
            documents = (virtual_service(ROUTE + f"\n  mirror: {{host: {SHADOW}}}"),)
            with make_mesh(api.port, *documents, shadow_port=shadow.port) as mesh:
                limits = httpx.Limits(max_connections=2)
                timeout = httpx.Timeout(2.0, pool=0.5)
                if how == "transport":
                    inner = httpx.AsyncHTTPTransport(limits=limits)
                    client = meshlib.AsyncClient(mesh=mesh, transport=inner, timeout=timeout)
                else:
                    meshlib.instrument(mesh)
                    client = httpx.AsyncClient(limits=limits, timeout=timeout)
                try:
                    async with client:
                        statuses = [(await client.get(URL)).status_code for _ in range(10)]
                        await wait_until(lambda: shadow.connections == 10, "the copies held")
                        release.set()
                finally:
                    meshlib.uninstrument()
                return statuses

    assert run(main) == [200] * 10


def test_sync_copies_have_a_pool_of_their_own() -> None:
    """`meshlib.Client` sends copies from a thread pool; they have a connection pool of their
    own too, so a held shadow does not take the two connections its calls are limited to."""
    release = asyncio.Event()
    held = ThreadServer(held_until(release))
    with held as shadow, ThreadServer(answering(OK)) as api:
        documents = (virtual_service(ROUTE + f"\n  mirror: {{host: {SHADOW}}}"),)
        try:
            with make_mesh(api.port, *documents, shadow_port=shadow.port) as mesh:
                limits = httpx.Limits(max_connections=2)
                timeout = httpx.Timeout(2.0, pool=0.5)
                with meshlib.Client(mesh=mesh, limits=limits, timeout=timeout) as client:
                    statuses = [client.get(URL).status_code for _ in range(6)]
                    wait_until_sync(lambda: shadow.connections >= 2, "copies held")
                    held.loop.call_soon_threadsafe(release.set)
                # Closing the client waits for no copy: all six end before the shadow stops.
                wait_until_sync(
                    lambda: len(shadow.heads) == 6 and shadow.active == 0, "every copy to end"
                )
        finally:
            held.loop.call_soon_threadsafe(release.set)
    assert statuses == [200] * 6


async def _stream_then_hand_over(
    server: Server, transport: Http1Transport
) -> tuple[httpx.Response, asyncio.Task[bytes]]:
    """The only connection (max_connections=1) holds a streamed response, read to its end
    but not closed; a second request waits in line for it."""
    first = await transport.handle_async_request(get(server.url + "/first"))
    waiter = asyncio.create_task(fetch(transport, get(server.url + "/second")))
    await wait_until(lambda: transport._pool is not None and transport._pool.waiters, "a waiter")
    stream = first.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    assert b"".join([chunk async for chunk in stream]) == b"hello"
    return first, waiter


async def _slow_body(peer: Peer) -> None:
    """Headers at once, the body only after the client's second look: the first response
    is streamed, not handed over whole."""
    while True:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await asyncio.sleep(0.05)
        await peer.send(b"hello")


def test_closing_the_transport_as_a_connection_is_handed_over_keeps_the_books() -> None:
    """close() between a connection going to a waiter and the waiter running: the waiter
    raises RuntimeError, opens nothing, and the pool's counts stay at zero."""

    async def main() -> tuple[str, int, int]:
        async with Server(_slow_body) as server:
            transport = Http1Transport(max_connections=1)
            first, waiter = await _stream_then_hand_over(server, transport)
            await first.aclose()  # the connection goes to the waiter ...
            await transport.aclose()  # ... and the transport closes before it runs
            try:
                await waiter
                outcome = "answered"
            except RuntimeError:
                outcome = "RuntimeError"
            pool = transport._pool
            assert pool is not None
            return outcome, pool.total, server.connections

    assert run(main) == ("RuntimeError", 0, 1)


def test_a_handed_over_connection_the_server_closes_keeps_its_slot_for_the_waiter() -> None:
    """The server's close of the connection is seen just as it goes to the waiter: the
    waiter reconnects in the same slot, and the pool's counts match its connections (the
    slot used to be freed twice, letting more connections open than the limit)."""

    async def main() -> tuple[bytes, int, int]:
        async with Server(_slow_body) as server:
            transport = Http1Transport(max_connections=1)
            first, waiter = await _stream_then_hand_over(server, transport)
            pool = transport._pool
            assert pool is not None
            (connection,) = pool.connections
            connection._transport.close()  # as the loop does on reading the server's FIN
            await first.aclose()  # handed over in the same step
            body = await waiter
            totals = pool.total, len(pool.connections)
            await transport.aclose()
            return body, *totals

    body, total, connections = run(main)
    assert body == b"hello" and total == connections == 1


def test_no_mirrored_copy_is_sent_after_the_client_is_closed() -> None:
    """A call delayed by a fault when the client closes: its mirror copy, made after the
    delay, is not sent (the copies' pool is made closed, like the client's)."""
    fault = "  fault: {delay: {fixedDelay: 0.2s, percentage: {value: 100}}}"
    document = virtual_service(ROUTE + f"\n  mirror: {{host: {SHADOW}}}\n" + fault)

    async def main() -> int:
        async with Server(answering(OK)) as api, Server(answering(OK)) as shadow:
            with make_mesh(api.port, document, shadow_port=shadow.port) as mesh:
                client = meshlib.AsyncClient(mesh=mesh)
                call = asyncio.create_task(client.get(URL))
                await asyncio.sleep(0.05)  # the call is in its fault delay
                await client.aclose()
                with pytest.raises(RuntimeError):
                    await call
                mirrors = client._transport._mirrors  # type: ignore[attr-defined]
                await wait_until(lambda: not mirrors, "the copy's task to end")
                return shadow.connections

    assert run(main) == 0
