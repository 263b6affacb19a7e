"""meshlib.AsyncClient and its HTTP/1.1 transport at the edges a second audit found: default
pool limits, answers a server sends before reading the request, `Connection: close` from the
caller or from `maxRequestsPerConnection`, idle connections the server closed while the event
loop was busy, try deadlines against a trickling server, connections left behind by a
cancelled drain or a failed mirror, request framing, cancellations lost by
`asyncio.wait_for`, pool bookkeeping per origin, TLS SNI, header whitespace and `trust_env`.

Servers are asyncio servers on 127.0.0.1 writing exact bytes: on the test's own loop, or on a
loop in a thread of their own where the test blocks its loop or uses a sync client. Tests
wait by polling state or events (a sleep is only ever the behaviour under test); every client,
server and mesh is closed before the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import textwrap
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx
import pytest
import trustme

import meshlib
from meshlib.clients._http1 import Http1Transport
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
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
from tests.upstream import loopback_service, mesh_for

HOST = "api.default.svc.cluster.local"
SHADOW = "shadow.default.svc.cluster.local"
URL = f"http://{HOST}:9080/"
ROUTE = f"- route: [{{destination: {{host: {HOST}}}}}]"


# -- helpers --------------------------------------------------------------------------------


def client_for(via: str, server: Server, mesh: Mesh) -> tuple[httpx.AsyncClient, str]:
    """The client and URL a test calls `server` with: `Http1Transport` directly
    ("transport"), or `meshlib.AsyncClient` through `mesh` ("mesh")."""
    if via == "transport":
        return httpx.AsyncClient(transport=Http1Transport(), timeout=2.0), server.url + "/"
    return meshlib.AsyncClient(mesh=mesh, timeout=2.0), URL


def virtual_service(http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: api, namespace: default}}\nspec:\n  hosts: [{HOST}]\n  http:\n"
        + textwrap.indent(textwrap.dedent(http).strip(), "  ")
        + "\n"
    )


def destination_rule(traffic_policy: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: api, namespace: default}}\nspec:\n  host: {HOST}\n"
        "  trafficPolicy:\n" + textwrap.indent(textwrap.dedent(traffic_policy).strip(), "    ")
    )


def make_mesh(port: int, *documents: str, shadow_port: int | None = None) -> Mesh:
    """A mesh where HOST (port 9080) is 127.0.0.1:`port`, and SHADOW 127.0.0.1:`shadow_port`."""
    policy = loopback_service(HOST, port)
    if shadow_port is not None:
        policy += "---\n" + loopback_service(SHADOW, shadow_port)
    for document in documents:
        policy += "---\n" + document
    mesh: Mesh = mesh_for(MeshConfig(service="client"), policy)
    return mesh


def inner(client: httpx.AsyncClient) -> Http1Transport:
    """The Http1Transport under a meshlib.AsyncClient's mesh transport."""
    transport = client._transport._inner  # type: ignore[attr-defined]
    assert isinstance(transport, Http1Transport)
    return transport


def pool_total(transport: Http1Transport) -> int:
    pool = transport._pool
    return 0 if pool is None else pool.total


def waiters(transport: Http1Transport) -> int:
    pool = transport._pool
    return 0 if pool is None else len(pool.waiters)


# -- 1. default pool limits -----------------------------------------------------------------


@pytest.mark.parametrize("via", ["requests", "mirrors"])
def test_default_pool_limits_are_httpxs(via: str) -> None:
    """Without `limits=`, meshlib.AsyncClient's transport has httpx's defaults (100
    connections, 20 kept alive), also when it falls back to httpx's own transport; 110
    concurrent requests, or mirrored copies to a shadow holding them, never have more than
    100 sockets open: the rest wait for a connection, and all are answered."""
    fallback = meshlib.AsyncClient(http2=True)
    pool = fallback._transport._inner._pool  # type: ignore[attr-defined]
    assert (pool._max_connections, pool._max_keepalive_connections) == (100, 20)
    run(fallback.aclose)
    count = 110

    async def main() -> None:
        release = asyncio.Event()

        held = held_until(release)

        async with Server(held) as slow, Server(answering(OK)) as api:
            if via == "requests":
                documents: tuple[str, ...] = ()
                target = slow
            else:
                mirror = f"  mirror: {{host: {SHADOW}}}"
                documents = (virtual_service(ROUTE + "\n" + mirror),)
                target = api
            with make_mesh(target.port, *documents, shadow_port=slow.port) as mesh:
                async with meshlib.AsyncClient(mesh=mesh) as c:
                    transport = inner(c)
                    assert transport._max_connections == 100
                    assert transport._max_idle == 20
                    assert transport._keepalive_expiry == 5.0
                    if via == "requests":
                        calls = [asyncio.create_task(c.get(URL)) for _ in range(count)]
                    else:  # each call is answered at once; its copy waits at the shadow
                        statuses = [(await c.get(URL)).status_code for _ in range(count)]
                        assert statuses == [200] * count
                    # copies go through a pool of their own, with the same limits
                    pools = [transport, c._transport._mirroring_transport()]  # type: ignore[attr-defined]
                    await wait_until(
                        lambda: slow.connections + sum(map(waiters, pools)) >= count,
                        "every request to be sent or to wait for a connection",
                    )
                    assert slow.connections <= 100
                    assert all(pool_total(pool) <= 100 for pool in pools)
                    release.set()
                    if via == "requests":
                        responses = await asyncio.gather(*calls)
                        assert [r.status_code for r in responses] == [200] * count
                    else:
                        await wait_until(
                            lambda: len(slow.heads) == count, "every copy to reach the shadow"
                        )
                    assert slow.connections <= 100

    run(main)


# -- 2. an answer sent at once on accept ----------------------------------------------------

BANNER = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def banner(peer: Peer) -> None:
    """Answers before reading anything, and closes."""
    await peer.send(BANNER)


@pytest.mark.parametrize("via", ["transport", "mesh"])
def test_an_answer_sent_on_accept_is_the_response(via: str) -> None:
    """A server that answers a 503 with `Connection: close` as soon as it accepts, before
    reading the request: each call gets that 503 (not RuntimeError), sequential or
    concurrent, directly and through the mesh (which retries it, then gives it)."""

    retries = "  retries: {attempts: 2, retryOn: 'reset,connect-failure,5xx'}"
    # On a loop of its own, the server answers as it accepts, whatever the client is doing.
    with (
        ThreadServer(banner) as server,
        make_mesh(server.port, virtual_service(ROUTE + "\n" + retries)) as mesh,
    ):

        async def main() -> list[int]:
            c, url = client_for(via, server, mesh)
            async with c:
                statuses = [(await c.get(url)).status_code for _ in range(10)]
                together = await asyncio.gather(*[c.get(url) for _ in range(20)])
            return statuses + [r.status_code for r in together]

        assert run(main) == [503] * 30


# -- 3. Connection: close from the caller, or from maxRequestsPerConnection -----------------


async def closes_lazily(peer: Peer) -> None:
    """Answers without saying `Connection: close`; after a request that said it, closes
    (without answering) as soon as anything more comes on the connection."""
    while True:
        await peer.request()
        await peer.send(OK)
        if b"connection: close" in peer.server.heads[-1].lower():
            await peer.reader.read(1)
            return


@pytest.mark.parametrize("via", ["transport", "mesh"])
def test_connection_close_in_the_request_is_not_reused(via: str) -> None:
    """A request header `Connection: close` (the app's, or the mesh's at
    `maxRequestsPerConnection: 1`) means its connection is not used again: 20 calls to a
    server that closes after such a request without saying so all succeed, one connection
    each."""

    async def main() -> None:
        async with Server(closes_lazily) as server:
            rule = destination_rule("connectionPool:\n  http: {maxRequestsPerConnection: 1}")
            with make_mesh(server.port, rule) as mesh:
                c, url = client_for(via, server, mesh)
                headers = {"Connection": "close"} if via == "transport" else {}
                async with c:
                    statuses = [(await c.get(url, headers=headers)).status_code for _ in range(20)]
            assert statuses == [200] * 20
            assert server.connections == 20
            assert all(b"connection: close" in head.lower() for head in server.heads)

    run(main)


# -- 4. an idle connection closed while the loop was blocked --------------------------------


@pytest.mark.parametrize("blocked", [0.15, 0.0], ids=["blocked-150ms", "not-blocked"])
@pytest.mark.parametrize("via", ["transport", "mesh"])
def test_an_idle_connection_closed_while_the_loop_was_blocked_is_not_reused(
    via: str, blocked: float
) -> None:
    """The server closes an idle connection while the client's event loop is blocked (sync
    work), or just before the next call, so the client has not seen the close: the next call
    goes out on a new connection and succeeds, directly and through the mesh."""
    threads = ThreadServer(answering(OK))
    with threads as server:

        async def main() -> None:
            with make_mesh(server.port) as mesh:
                c, url = client_for(via, server, mesh)
                async with c:
                    assert (await c.get(url)).status_code == 200
                    threads.call(server.drop())  # this loop blocks until the server closed it
                    time.sleep(blocked)  # the loop stays blocked: what is under test
                    response = await c.get(url)
                    assert response.status_code == 200 and response.content == b"ok"
            assert server.connections == 2

        run(main)


# -- 5. the try's deadline bounds a trickling answer ----------------------------------------


@pytest.mark.parametrize(
    ("route", "seconds"),
    [
        pytest.param("  timeout: 300ms", 0.3, id="route-timeout"),
        pytest.param(
            "  retries: {attempts: 1, perTryTimeout: 200ms, retryOn: connect-failure}",
            0.2,
            id="per-try-timeout",
        ),
    ],
)
def test_the_try_deadline_bounds_response_headers_that_trickle(route: str, seconds: float) -> None:
    """Response headers trickling one byte every 20 ms (each wait for bytes well under the
    read timeout; 2 s in all): the route's timeout or per-try timeout ends the try at its
    time, 504 UT, not when the headers are in."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"".join(
        b"X-Header-%d: value\r\n" % i for i in range(4)
    )

    async def trickle(peer: Peer) -> None:
        await peer.request()
        for byte in head:
            await peer.send(bytes([byte]))
            await asyncio.sleep(0.02)  # the trickle is what is under test
        await peer.send(b"\r\nok")
        await peer.reader.read()

    async def main() -> None:
        async with Server(trickle) as server:
            with make_mesh(server.port, virtual_service(ROUTE + "\n" + route)) as mesh:
                async with meshlib.AsyncClient(mesh=mesh) as c:
                    started = time.monotonic()
                    response = await c.get(URL)
                    elapsed = time.monotonic() - started
            assert response.status_code == 504
            assert response.extensions["response_flags"] == ["UT"]
            assert seconds * 0.9 <= elapsed < 2 * seconds, elapsed

    run(main)


def test_the_per_try_time_starts_when_the_try_has_a_connection() -> None:
    """With the client's pool full (one connection, held 300 ms by another call), a try with
    a 200 ms perTryTimeout waits for the connection and then gets its whole 200 ms, as
    Envoy starts its per-try timer once the connection pool hands it a connection: 200."""
    release = asyncio.Event()

    async def main() -> None:
        async with Server(held_until(release)) as server:
            policy = virtual_service(
                f"- match: [{{uri: {{prefix: /held}}}}]\n  route: [{{destination: {{host: {HOST}}}}}]\n"
                + ROUTE
                + "\n  retries: {attempts: 1, perTryTimeout: 200ms, retryOn: connect-failure}"
            )
            with make_mesh(server.port, policy) as mesh:
                limits = httpx.Limits(max_connections=1)
                async with meshlib.AsyncClient(mesh=mesh, limits=limits, timeout=2.0) as c:
                    first = asyncio.ensure_future(c.get(URL + "held"))  # no perTryTimeout
                    await wait_until(lambda: len(server.heads) == 1, "the first call to arrive")
                    second = asyncio.ensure_future(c.get(URL))
                    await asyncio.sleep(0.3)  # the first call holds the only connection
                    release.set()
                    responses = [await first, await second]
        assert [(r.status_code, r.extensions["response_flags"]) for r in responses] == [
            (200, []),
            (200, []),
        ]

    run(main)


# -- 6. a call cancelled while it drains a retried answer -----------------------------------


def test_cancelling_a_call_while_it_drains_a_retried_answer_leaves_no_connection() -> None:
    """A 503 (retried on 5xx) whose body stalls is being drained before the retry when the
    app cancels the call: the call raises CancelledError, and its connection is closed, not
    left busy in the pool."""

    def draining(c: meshlib.AsyncClient) -> bool:
        """A connection whose 503 headers came and whose body someone is waiting for: the
        mesh reads a retried answer's body only to drain it."""
        pool = inner(c)._pool
        return pool is not None and any(
            connection._headers_done and connection._waiter is not None
            for connection in pool.connections
        )

    async def stalls(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 1000\r\n\r\nslow")
        await peer.reader.read()  # until the client closes

    async def main() -> None:
        async with Server(stalls) as server:
            retries = "  retries: {attempts: 2, retryOn: 5xx}"
            with make_mesh(server.port, virtual_service(ROUTE + "\n" + retries)) as mesh:
                async with meshlib.AsyncClient(mesh=mesh, timeout=5.0) as c:
                    for _ in range(3):
                        call = asyncio.create_task(c.get(URL))
                        await wait_until(lambda: draining(c), "the call to drain the 503")
                        call.cancel()
                        with pytest.raises(asyncio.CancelledError):
                            await call
                    transport = inner(c)
                    await wait_until(
                        lambda: server.active == 0, "the server to see every connection closed"
                    )
                    assert pool_total(transport) == 0
            assert server.connections == 3

    run(main)


# -- 7. a mirror whose body read fails ------------------------------------------------------


async def stalls_mid_body(peer: Peer) -> None:
    await peer.request()
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    await peer.reader.read()  # until the client closes


MIRRORED = virtual_service(ROUTE + f"\n  mirror: {{host: {SHADOW}}}")


def test_a_mirror_whose_body_read_fails_leaves_no_connection() -> None:
    """A shadow that stalls mid-body: each copy's read times out (0.2 s) and its connection
    is closed, not left busy; the pool (3 connections) then serves the primary calls."""

    async def main() -> None:
        async with Server(answering(OK)) as api, Server(stalls_mid_body) as shadow:
            with make_mesh(api.port, MIRRORED, shadow_port=shadow.port) as mesh:
                limits = httpx.Limits(max_connections=3)
                async with meshlib.AsyncClient(mesh=mesh, timeout=0.2, limits=limits) as c:
                    transport = inner(c)
                    for _ in range(2):  # the primary's connection and two copies': all three
                        assert (await c.get(URL)).status_code == 200
                    await wait_until(lambda: shadow.connections == 2, "the two copies")
                    mirrors = c._transport._mirrors  # type: ignore[attr-defined]
                    await wait_until(
                        lambda: shadow.active == 0 and not mirrors,
                        "both copies to end, and the shadow to see their connections closed",
                    )
                    assert pool_total(transport) <= 1  # the primary's, idle
                    response = await c.get(URL)  # its copy takes the third connection
                    assert response.status_code == 200 and response.content == b"ok"

    run(main)


def test_a_sync_mirror_whose_body_read_fails_leaves_no_connection() -> None:
    """meshlib.Client: the same stalled shadow; each copy's connection is closed when its
    read times out, and the primary calls are served."""
    limits = httpx.Limits(max_connections=3)
    with (
        ThreadServer(answering(OK)) as api,
        ThreadServer(stalls_mid_body) as shadow,
        make_mesh(api.port, MIRRORED, shadow_port=shadow.port) as mesh,
        meshlib.Client(mesh=mesh, timeout=0.2, limits=limits) as c,
    ):
        for _ in range(2):
            assert c.get(URL).status_code == 200
        wait_until_sync(lambda: shadow.connections == 2, "the two copies")
        wait_until_sync(lambda: shadow.active == 0, "the shadow to see both closed")
        response = c.get(URL)
        assert response.status_code == 200 and response.content == b"ok"
        # Its copy too, before the shadow stops: closing the client waits for no copy.
        wait_until_sync(lambda: shadow.connections == 3 and shadow.active == 0, "the third copy")


# -- 8. request framing ---------------------------------------------------------------------


async def abc() -> AsyncIterator[bytes]:
    yield b"abc"


def framed(
    c: httpx.AsyncClient, url: str, body: str, pairs: list[tuple[str, str]]
) -> Coroutine[Any, Any, httpx.Response]:
    """A POST of `body` ("bytes": b"hello", "stream": b"abc" streamed) with its framing
    headers replaced by `pairs`, sent as they are."""
    request = c.build_request("POST", url, content=b"hello" if body == "bytes" else abc())
    kept = [
        (name, value)
        for name, value in request.headers.multi_items()
        if name not in ("content-length", "transfer-encoding")
    ]
    request.headers = httpx.Headers(kept + pairs)
    return c.send(request)


@pytest.mark.parametrize(
    ("body", "pairs"),
    [
        pytest.param(
            "bytes", [("Content-Length", "50"), ("Content-Length", "5")], id="two-content-lengths"
        ),
        pytest.param("stream", [("Transfer-Encoding", "chunked, gzip")], id="chunked-not-last"),
        pytest.param("stream", [("Transfer-Encoding", "xchunked")], id="xchunked"),
        pytest.param(
            "bytes",
            [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            id="content-length-and-chunked",
        ),
    ],
)
def test_ambiguous_request_framing_is_refused_before_sending(
    body: str, pairs: list[tuple[str, str]]
) -> None:
    """Framing the server could read differently from the client is httpx.LocalProtocolError
    before anything is sent; `Transfer-Encoding: gzip, chunked` then goes out chunked (the
    first bytes the server receives)."""

    async def main() -> None:
        async with Server(answering(OK)) as server:
            async with httpx.AsyncClient(transport=Http1Transport(), timeout=1.0) as c:
                with pytest.raises(httpx.LocalProtocolError):
                    await framed(c, server.url + "/refused", body, pairs)
                response = await framed(
                    c, server.url + "/sent", "stream", [("Transfer-Encoding", "gzip, chunked")]
                )
                assert response.status_code == 200
            assert server.requests == [b"/sent"] and server.connections == 1
            assert b"\r\nTransfer-Encoding: gzip, chunked\r\n" in server.heads[0]
            assert server.bodies == [b"abc"]

    run(main)


# -- 9. a cancellation as the body's last bytes arrive --------------------------------------


@pytest.mark.parametrize("route", ["  timeout: 10s", ""], ids=["route-timeout", "no-timeout"])
def test_a_call_cancelled_as_its_body_completes_raises_cancelled_error(route: str) -> None:
    """The app cancels a meshed call in the same loop iteration as its body's last bytes
    arrive: the call raises CancelledError (asyncio.wait_for on Python < 3.12 returned the
    response instead, the cancellation lost)."""

    async def main() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = asyncio.Event()

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                waiting.set()
                await gate
                yield b"done"

        class Gated(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                return httpx.Response(200, headers={"content-length": "4"}, stream=Body())

        with make_mesh(1, virtual_service(ROUTE + "\n" + route)) as mesh:
            async with meshlib.AsyncClient(mesh=mesh, transport=Gated()) as c:
                call = asyncio.create_task(c.get(URL))
                await waiting.wait()  # the call reads the body

                def both() -> None:
                    gate.set_result(None)  # the last bytes arrive ...
                    call.cancel()  # ... as the app cancels the call

                asyncio.get_running_loop().call_soon(both)
                with pytest.raises(asyncio.CancelledError):
                    await call

    run(main)


# -- 10. no pool entries for origins without idle connections -------------------------------


def test_the_pool_keeps_no_entries_for_origins_without_idle_connections() -> None:
    """`pool.idle` holds an origin only while it has idle connections: not once its last one
    was evicted (max_keepalive_connections), taken for a request, or closed by the server."""

    async def main() -> None:
        release = asyncio.Event()

        held = held_until(release)

        transport = Http1Transport(max_keepalive_connections=2)
        async with contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(Server(answering(OK))) for _ in range(4)]
            slow = await stack.enter_async_context(Server(held))
            c = await stack.enter_async_context(httpx.AsyncClient(transport=transport))
            for server in servers:
                assert (await c.get(server.url + "/")).status_code == 200
            pool = transport._pool
            assert pool is not None
            assert pool.idle_count == 2 and len(pool.idle) == 2, pool.idle  # two were evicted
            assert all(pool.idle.values())

            call = asyncio.create_task(c.get(slow.url + "/"))
            await wait_until(lambda: slow.heads, "the request to the slow server")
            release.set()
            assert (await call).status_code == 200  # slow's connection idle: one evicted
            release.clear()
            call = asyncio.create_task(c.get(slow.url + "/"))
            await wait_until(lambda: len(slow.heads) == 2, "the second request")
            assert len(pool.idle) == 1 and all(pool.idle.values()), pool.idle  # taken
            release.set()
            assert (await call).status_code == 200

            await slow.drop()  # the server closes slow's idle connection
            await wait_until(lambda: pool.idle_count == 1, "the client to see the close")
            assert len(pool.idle) == 1 and all(pool.idle.values()), pool.idle

    run(main)


# -- 11. TLS SNI ----------------------------------------------------------------------------


def test_the_sni_hostname_extension_is_sent_and_checked() -> None:
    """`extensions={"sni_hostname": ...}` is the TLS server name sent and the name the
    certificate is checked against (the URL's host is an IP the certificate does not name);
    requests with different names do not share a connection."""
    ca = trustme.CA()
    certificate = ca.issue_cert("example.test", "other.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(server_context)
    seen: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _context: seen.append(name)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def main() -> None:
        async with Server(answering(OK), server_context) as server:
            with make_mesh(1) as mesh:  # 127.0.0.1 is not in the mesh: passed through
                async with meshlib.AsyncClient(mesh=mesh, verify=client_context) as c:
                    url = server.url + "/"
                    for name in ("example.test", "other.test", "example.test"):
                        response = await c.get(url, extensions={"sni_hostname": name})
                        assert response.status_code == 200 and response.content == b"ok"
                    assert seen == ["example.test", "other.test"]
                    assert server.connections == 2
                    with pytest.raises(httpx.ConnectError, match="certificate"):
                        await c.get(url)  # checked against 127.0.0.1

    run(main)


# -- 12. header whitespace ------------------------------------------------------------------


def test_trailing_whitespace_in_response_header_values_is_stripped() -> None:
    reply = b"HTTP/1.1 200 OK\r\nX-A: v  \t\r\nX-B: a b \r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with (
            Server(answering(reply)) as server,
            httpx.AsyncClient(transport=Http1Transport()) as c,
        ):
            response = await c.get(server.url + "/")
        assert response.headers["x-a"] == "v" and response.headers["x-b"] == "a b"
        assert (b"X-A", b"v") in response.headers.raw

    run(main)


# -- 13. trust_env --------------------------------------------------------------------------


def test_trust_env_false_reaches_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """SSL_CERT_FILE naming a missing file: with trust_env=False it is ignored and the client
    is made; with trust_env=True construction fails with FileNotFoundError — as httpx's own
    AsyncClient does in both cases."""
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/meshlib-test/ca.pem")
    with make_mesh(1) as mesh:
        for make in (httpx.AsyncClient, lambda **kw: meshlib.AsyncClient(mesh=mesh, **kw)):
            with pytest.raises(FileNotFoundError):
                make(trust_env=True)
            client = make(trust_env=False)
            run(client.aclose)


def test_keep_alive_holds_with_descriptors_above_1024() -> None:
    """The check before reusing an idle connection works for any descriptor number (select()
    cannot look past 1024; every connection was dropped and reopened): five calls with pauses
    share one connection in a process with more than 1024 descriptors open."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the descriptor limit ({hard}) is too low to open 1,100 more")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:

        async def main() -> int:
            async with Server(answering(OK)) as server:
                async with httpx.AsyncClient(transport=Http1Transport()) as c:
                    for _ in range(5):
                        assert (await c.get(server.url + "/")).content == b"ok"
                        await asyncio.sleep(0.12)  # idle a while: the reuse check runs
                return server.connections

        assert run(main) == 1
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_exception_is_left_being_handled_after_failed_calls() -> None:
    """Retried failures, a call that cannot connect, failed mirrored copies and a cancelled
    call leave nothing as the exception being handled (`sys.exc_info()`), in the task or in
    the event loop's callbacks, in both builds: compiled code that left one would hand it on
    as the `__context__` of later exceptions (an experiment that compiled the httpx adapter
    saw that, from mypyc's build of its mirror sender's async `try/except`)."""
    import sys

    unavailable = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown"
    hung, release = asyncio.Event(), asyncio.Event()

    async def handle(peer: Peer) -> None:
        while True:
            if await peer.request() == b"/hang":
                hung.set()
                await release.wait()
            await peer.send(unavailable)

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]  # nothing listens once the socket is closed

    async def main() -> None:
        route = ROUTE + "\n  mirror: {host: " + SHADOW + "}"  # copies that cannot connect
        route += '\n  retries: {attempts: 2, retryOn: "connect-failure,5xx"}'
        async with Server(handle) as server:
            with make_mesh(server.port, virtual_service(route), shadow_port=nobody) as mesh:
                async with meshlib.AsyncClient(mesh=mesh, timeout=5.0) as c:
                    assert (await c.get(URL)).status_code == 503  # retried, then answered
                    assert sys.exc_info() == (None, None, None)
                    shadow = f"http://{SHADOW}:9080/"
                    assert (await c.get(shadow)).status_code == 503  # UF: cannot connect
                    assert sys.exc_info() == (None, None, None)
                    call = asyncio.create_task(c.get(URL + "hang"))
                    await hung.wait()
                    call.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await call
                    assert sys.exc_info() == (None, None, None)
                    release.set()
                    await wait_until(lambda: len(server.requests) >= 4, "the calls' requests")
                    # Also where the event loop runs callbacks (protocols' data_received).
                    loop = asyncio.get_running_loop()
                    seen: asyncio.Future[Any] = loop.create_future()
                    loop.call_soon(lambda: seen.set_result(sys.exc_info()))
                    assert await seen == (None, None, None)

    run(main)
