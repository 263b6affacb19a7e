"""Http1Transport at the edges an audit of its first version found: pool bookkeeping across
origins, closing and cancelling while requests wait, back-pressure left on, response framing a
server gets wrong, and request framing that would desynchronise the connection.

Each test runs its own small asyncio servers on 127.0.0.1 writing exact bytes, and waits by
polling state or events (a server-side sleep is only ever the behaviour under test); every
client and server is closed before the test ends.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from meshlib.clients._http1 import Http1Transport
from meshlib.clients._http1_connection import _Connection
from meshlib.clients._http1_pool import _Pool
from tests.rawserver import OK, Peer, Server, answering, held_until, run, wait_until

PAUSE = 262_144  # the transport's _PAUSE_READING: unread bytes at which it pauses reading
BIG = 300_000  # a body over that: reading pauses before it has all come


# -- helpers --------------------------------------------------------------------------------


def connections(transport: Http1Transport) -> list[Any]:
    """The transport's connections, idle or busy (none before its first request)."""
    pool = transport._pool
    return [] if pool is None else list(pool.connections)


def waiters(transport: Http1Transport) -> int:
    """How many requests wait for room in the pool."""
    pool = transport._pool
    return 0 if pool is None else len(pool.waiters)


def client(transport: Http1Transport, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, **kwargs)


# -- the pool --------------------------------------------------------------------------------


def test_a_waiter_gets_room_when_another_origins_connection_goes_idle() -> None:
    """max_connections=1, held by origin A; a request for origin B waits. When A's
    connection goes idle it makes room for B (closed, B opens its own) instead of the request
    waiting until its pool timeout."""

    async def main() -> None:
        release = asyncio.Event()

        held = held_until(release)

        transport = Http1Transport(max_connections=1)
        async with (
            Server(held) as a,
            Server(answering(OK)) as b,
            client(transport, timeout=httpx.Timeout(5.0, pool=2.0)) as c,
        ):
            first = asyncio.create_task(c.get(a.url + "/"))
            await wait_until(lambda: a.requests, "A to get its request")
            second = asyncio.create_task(c.get(b.url + "/"))
            await wait_until(lambda: waiters(transport) == 1, "B's request to wait")
            release.set()
            assert (await first).content == b"ok"
            assert (await second).content == b"ok"  # not httpx.PoolTimeout
            assert a.connections == 1 and b.connections == 1

    run(main)


def test_max_connections_per_host_is_not_exceeded_by_evicting_another_origins_idle() -> None:
    """max_connections_per_host=1 with room in the total: a second request to a busy origin
    waits for its connection; it neither opens a second one by closing another origin's idle
    connection, nor costs that origin its kept-alive connection."""

    async def main() -> None:
        release = asyncio.Event()

        held = held_until(release)

        transport = Http1Transport(max_connections=10, max_connections_per_host=1)
        async with (
            Server(held) as a,
            Server(answering(OK)) as b,
            client(transport, timeout=httpx.Timeout(5.0, pool=3.0)) as c,
        ):
            assert (await c.get(b.url + "/")).content == b"ok"  # B's connection, now idle
            first = asyncio.create_task(c.get(a.url + "/one"))
            await wait_until(lambda: a.requests == [b"/one"], "A to get the first request")
            second = asyncio.create_task(c.get(a.url + "/two"))
            await wait_until(
                lambda: waiters(transport) == 1 or a.connections > 1,
                "the second request to wait, or to open a connection",
            )
            assert a.connections == 1, "a second connection to A: over max_connections_per_host"
            release.set()
            assert [(await first).content, (await second).content] == [b"ok", b"ok"]
            assert a.connections == 1 and a.requests == [b"/one", b"/two"]
            assert (await c.get(b.url + "/")).content == b"ok"
            assert b.connections == 1, "B's idle connection was closed to make room"

    run(main)


def test_a_missing_ca_bundle_fails_at_construction() -> None:
    """verify="<missing file>" fails when the transport is made, with FileNotFoundError as
    httpx's own transport does — not at each https request, costing a pool slot each time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # httpx: verify=<str> is deprecated
        with pytest.raises(FileNotFoundError):
            httpx.AsyncHTTPTransport(verify="/nonexistent/ca.pem")
    with pytest.raises(FileNotFoundError):
        Http1Transport(verify="/nonexistent/ca.pem")


# -- back-pressure ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["get", "slow-upload"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_body_that_paused_reading_and_came_whole_leaves_the_connection_reading(
    loop: str, how: str
) -> None:
    """A response body over the pause threshold that has come whole by the time the request
    looks (reading paused on its last bytes) is handed over as bytes; the connection goes back
    to the pool reading again, so the next request on it is answered.

    "get": the 300,000 bytes go in one write, after a 1 MiB answer on the same connection has
    grown the socket buffers (uvloop reads them all in one go; asyncio at most 256 KiB per
    read, so there the request always sees the head first). "slow-upload": the server answers
    while the request body is still being sent, in two writes, the second taking the unread
    bytes over the threshold and ending the body, and the rest of the upload follows."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
    first_part = PAUSE - 10  # not yet over the threshold

    async def main() -> None:
        transport = Http1Transport()

        def connection() -> Any:
            (only,) = connections(transport)
            return only

        async def handle(peer: Peer) -> None:
            while True:
                request = await peer.head()
                target = request.split(b" ", 2)[1]
                if target == b"/warm":
                    await peer.body(request)
                    await peer.send(head % 1_048_576 + b"w" * 1_048_576)
                elif target == b"/big" and how == "get":
                    await peer.body(request)
                    await peer.send(head % BIG + b"x" * BIG)
                elif target == b"/big":  # answered before the request body is read
                    await peer.send(head % BIG + b"x" * first_part)
                    await wait_until(
                        lambda: connection()._buffered >= first_part, "the client to read"
                    )
                    await peer.send(b"x" * (BIG - first_part))
                    await peer.body(request)
                else:
                    await peer.body(request)
                    await peer.send(OK)

        async def upload() -> AsyncIterator[bytes]:
            yield b"a"
            await wait_until(lambda: connection().complete, "the whole answer to come")
            yield b"b"

        async with Server(handle) as server, client(transport, timeout=2.0) as c:
            if how == "get":
                assert len((await c.get(server.url + "/warm")).content) == 1_048_576
                big = await c.get(server.url + "/big")
            else:
                big = await c.post(server.url + "/big", content=upload())
            assert big.status_code == 200 and big.content == b"x" * BIG
            after = await c.get(server.url + "/small", timeout=1.0)  # not httpx.ReadTimeout
            assert after.content == b"ok"
            assert server.connections == 1

    run(main, loop)


# -- response framing ------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["same-packet", "streamed"])
def test_bytes_after_a_complete_response_do_not_overwrite_it(streamed: bool) -> None:
    """A second response nobody asked for after the first one's end — in the same packet, or
    after the client has the first one's head — leaves the first one's status, headers and
    body as they were, and the connection is not used again."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: 1\r\n\r\nok"
    extra = b"HTTP/1.1 404 Nope\r\nContent-Length: 3\r\nX-B: 2\r\n\r\nbad"

    async def main() -> None:
        go = asyncio.Event()

        async def handle(peer: Peer) -> None:
            while True:
                await peer.request()
                if streamed:
                    await peer.send(first % 4)
                    await go.wait()
                    await peer.send(b"ok" + extra)
                else:
                    await peer.send(first % 2 + extra)

        async with Server(handle) as server, client(Http1Transport(), timeout=2.0) as c:
            async with c.stream("GET", server.url + "/") as response:
                go.set()
                body = await response.aread()
            assert response.status_code == 200 and response.reason_phrase == "OK"
            assert response.headers["x-a"] == "1" and "x-b" not in response.headers
            assert body == (b"okok" if streamed else b"ok")
            assert (await c.get(server.url + "/")).status_code == 200
            assert server.connections == 2, "the connection out of step was used again"

    run(main)


def test_chunked_trailers_are_not_merged_into_the_response_headers() -> None:
    """A trailer `Content-Encoding: gzip` after a chunked body is not a response header:
    httpx does not try to decode the plain body it came after."""
    reply = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nContent-Encoding: gzip\r\nX-T: 1\r\n\r\n"
    )

    async def main() -> None:
        async with Server(answering(reply)) as server, client(Http1Transport()) as c:
            response = await c.get(server.url + "/")  # not httpx.DecodingError
            assert response.content == b"ok"
            assert "content-encoding" not in response.headers and "x-t" not in response.headers
            assert response.headers["transfer-encoding"] == "chunked"
            assert (await c.get(server.url + "/")).content == b"ok"
            assert server.connections == 1

    run(main)


def test_a_reason_phrase_split_across_two_writes_arrives_whole() -> None:
    async def main() -> None:
        transport = Http1Transport()

        async def handle(peer: Peer) -> None:
            await peer.request()
            await peer.send(b"HTTP/1.1 404 Not Fo")
            await wait_until(
                lambda: any(conn._reason for conn in connections(transport)),
                "the client to parse the first half",
            )
            await peer.send(b"und\r\nContent-Length: 0\r\n\r\n")
            await peer.reader.read()

        async with Server(handle) as server, client(transport, timeout=2.0) as c:
            response = await c.get(server.url + "/")
            assert response.status_code == 404 and response.reason_phrase == "Not Found"

    run(main)


def test_a_body_without_length_cut_by_a_reset_is_a_read_error() -> None:
    """A body that ends when the connection does: a reset (RST) mid-body is httpx.ReadError,
    never a short body returned as if whole; a clean close (FIN) still ends it normally."""

    async def main() -> None:
        cut = asyncio.Event()

        async def handle(peer: Peer) -> None:
            target = await peer.request()
            if target == b"/reset":
                await peer.send(b"HTTP/1.1 200 OK\r\n\r\npartial-body")
                await cut.wait()
                sock = peer.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.writer.transport.abort()  # linger 0: the close is a RST
            else:
                await peer.send(b"HTTP/1.1 200 OK\r\n\r\nfull-body")  # the handler closes: FIN

        async with Server(handle) as server, client(Http1Transport(), timeout=2.0) as c:
            parts: list[bytes] = []
            async with c.stream("GET", server.url + "/reset") as response:
                with pytest.raises(httpx.ReadError):
                    async for part in response.aiter_raw():
                        parts.append(part)
                        cut.set()
            assert parts == [b"partial-body"]
            assert (await c.get(server.url + "/fin")).content == b"full-body"

    run(main)


def test_a_body_without_length_cut_by_the_transports_aclose_raises() -> None:
    """The app closes the transport while a body without length streams: reading on raises
    (httpx.ReadError), even once the socket is gone — the close is not the server's FIN."""

    async def main() -> None:
        transport = Http1Transport()

        async def handle(peer: Peer) -> None:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\n\r\nfirst-part;")
            await peer.reader.read()  # until the client's side is closed

        async with Server(handle) as server, client(transport, timeout=2.0) as c:
            parts: list[bytes] = []
            async with c.stream("GET", server.url + "/") as response:
                with pytest.raises(httpx.ReadError):
                    async for part in response.aiter_raw():
                        parts.append(part)
                        await transport.aclose()
                        await server.finished()  # the server saw the close: the socket is gone
            assert parts == [b"first-part;"]

    run(main)


# -- request framing -------------------------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("case", ["longer", "shorter", "unframed"])
def test_a_streamed_body_that_does_not_match_its_framing_is_refused(case: str) -> None:
    """A streamed body longer than its Content-Length (its excess would be read as a second,
    smuggled request), shorter (the server would wait for the rest), or with neither
    Content-Length nor Transfer-Encoding raises httpx.LocalProtocolError; the server never sees
    the excess, and the next request goes out on a fresh connection and is answered."""
    chunks = {
        "longer": [b"hello", SMUGGLED],
        "shorter": [b"hello"],
        "unframed": [b"hello", SMUGGLED],
    }[case]

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def echo_target(target: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target)

    async def main() -> None:
        transport = Http1Transport()
        async with Server(answering(echo_target)) as server:
            async with client(transport, timeout=1.0) as c:
                request = c.build_request("POST", server.url + "/upload", content=body())
                del request.headers["transfer-encoding"]
                if case != "unframed":
                    request.headers["content-length"] = "5" if case == "longer" else "10"
                with pytest.raises(httpx.LocalProtocolError):
                    await c.send(request)
                assert (await c.get(server.url + "/after")).content == b"/after"
            await server.finished()
            assert b"/smuggled" not in server.requests
            assert server.requests[-1] == b"/after"

    run(main)


def test_a_server_closing_mid_upload_is_an_httpx_error_under_uvloop() -> None:
    """uvloop raises RuntimeError on a write to a closed transport; the transport turns the
    server's close during an upload into an httpx error."""

    async def main() -> None:
        transport = Http1Transport()

        async def handle(peer: Peer) -> None:
            await peer.head()
            await peer.reader.readexactly(len(b"5\r\naaaaa\r\n"))  # then the handler closes

        async def upload() -> AsyncIterator[bytes]:
            yield b"aaaaa"
            await wait_until(
                lambda: any(conn.closed for conn in connections(transport)),
                "the client to see the server's close",
            )
            yield b"bbbbb"

        async with Server(handle) as server, client(transport, timeout=2.0) as c:
            with pytest.raises(httpx.TransportError):  # not RuntimeError
                await c.post(server.url + "/", content=upload())

    run(main, "uvloop")


# -- closing and cancelling ------------------------------------------------------------------


def test_a_request_waiting_for_the_pool_when_the_transport_closes_is_never_sent() -> None:
    async def main() -> None:
        transport = Http1Transport(max_connections=1)

        async def handle(peer: Peer) -> None:
            while True:
                target = await peer.request()
                if target == b"/held":
                    await peer.reader.read()  # never answered: ends when the client closes
                    return
                await peer.send(OK)

        async with Server(handle) as server, client(transport, timeout=3.0) as c:
            first = asyncio.create_task(c.get(server.url + "/held"))
            await wait_until(lambda: server.requests == [b"/held"], "the first request")
            second = asyncio.create_task(c.get(server.url + "/queued"))
            await wait_until(lambda: waiters(transport) == 1, "the second request to wait")
            await transport.aclose()
            with pytest.raises(RuntimeError, match="closed"):
                await second
            with pytest.raises(httpx.ReadError):
                await first
            await server.finished()
            assert server.requests == [b"/held"]

    run(main)


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"max_connections": 1}, id="total-limit"),
        pytest.param({"max_connections": 10, "max_connections_per_host": 1}, id="per-host-limit"),
    ],
)
def test_a_waiter_cancelled_as_its_turn_comes_stays_cancelled_and_passes_the_turn(
    limits: dict[str, int],
) -> None:
    """One connection allowed: /b and /c wait. The connection comes back and wakes /b, and
    /b is cancelled in the same tick: it raises CancelledError (the cancellation is not
    swallowed), /b is never sent, and /c gets the connection — also when the bound is the
    per-host one, where /c cannot open a connection of its own."""

    async def main() -> None:
        finish = asyncio.Event()

        async def handle(peer: Peer) -> None:
            while True:
                if await peer.request() == b"/a":
                    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
                    await finish.wait()
                    await peer.send(b"cd")
                else:
                    await peer.send(OK)

        timeouts = {"connect": 3.0, "read": 3.0, "write": 3.0, "pool": 3.0}
        transport = Http1Transport(**limits)  # type: ignore[arg-type]
        async with Server(handle) as server, transport:

            def request(path: str) -> httpx.Request:
                return httpx.Request("GET", server.url + path, extensions={"timeout": timeouts})

            first = await transport.handle_async_request(request("/a"))
            b = asyncio.create_task(transport.handle_async_request(request("/b")))
            c = asyncio.create_task(transport.handle_async_request(request("/c")))
            await wait_until(lambda: waiters(transport) == 2, "/b and /c to wait")
            finish.set()
            stream = first.stream
            assert isinstance(stream, httpx.AsyncByteStream)
            assert b"".join([chunk async for chunk in stream]) == b"abcd"
            await stream.aclose()  # the connection goes back to the pool: /b's turn
            b.cancel()  # ... and /b is cancelled before it runs
            with pytest.raises(asyncio.CancelledError):
                await b
            third = await c
            assert third.status_code == 200 and await third.aread() == b"ok"
            await transport.aclose()
            await server.finished()
            assert server.requests == [b"/a", b"/c"]

    run(main)


@pytest.mark.parametrize("when", ["before-connection-made", "after-connection-made"])
def test_aclose_while_a_connection_is_opened_leaves_no_socket_open(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transport is closed while a request's connection is being opened (held at a gate
    before, or just after, the socket connects): the request raises RuntimeError, nothing is
    sent, and the socket is closed (the server sees its end)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        connect = loop.create_connection
        entered, gate = asyncio.Event(), asyncio.Event()

        async def gated(*args: Any, **kwargs: Any) -> Any:
            if when == "after-connection-made":
                made = await connect(*args, **kwargs)
                entered.set()
                await gate.wait()
                return made
            entered.set()
            await gate.wait()
            return await connect(*args, **kwargs)

        monkeypatch.setattr(loop, "create_connection", gated)
        transport = Http1Transport()
        async with Server(answering(OK)) as server, client(transport, timeout=2.0) as c:
            request = asyncio.create_task(c.get(server.url + "/"))
            await entered.wait()
            await transport.aclose()
            gate.set()
            with pytest.raises(RuntimeError, match="closed"):
                await request
            await wait_until(lambda: server.connections == 1, "the server to accept")
            await server.finished()  # it saw the client's close
            assert server.requests == []

    run(main)


# -- timeouts, HEAD, refused requests, HTTP/1.0 --------------------------------------------


def test_the_read_timeout_counts_from_the_last_bytes_received() -> None:
    """Response headers trickling in 12 bytes every 0.3 s take longer than the 1 s read
    timeout in all, but no wait for bytes does: the response arrives."""
    reply = b"HTTP/1.1 200 OK\r\nX-Long-Header: abcdefghijkl\r\nContent-Length: 2\r\n\r\nok"

    async def handle(peer: Peer) -> None:
        await peer.request()
        for i in range(0, len(reply), 12):
            if i:
                await asyncio.sleep(0.3)  # the trickle is what is under test
            await peer.send(reply[i : i + 12])
        await peer.reader.read()

    async def main() -> None:
        async with (
            Server(handle) as server,
            client(Http1Transport(), timeout=httpx.Timeout(1.0)) as c,
        ):
            response = await c.get(server.url + "/")  # not httpx.ReadTimeout
            assert response.headers["x-long-header"] == "abcdefghijkl"
            assert response.content == b"ok"

    run(main)


def test_a_body_sent_after_a_head_answer_is_dropped_with_the_connection() -> None:
    """A server that wrongly sends a body after its answer to HEAD (in the same packet): the
    response has no body, and the connection, out of step, is not used again."""

    def reply(target: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" if target == b"/h" else OK

    async def main() -> None:
        async with Server(answering(reply)) as server, client(Http1Transport()) as c:
            head = await c.head(server.url + "/h")
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == "5"
            assert (await c.get(server.url + "/")).content == b"ok"
            assert server.connections == 2

    run(main)


def test_a_head_answer_without_content_length_keeps_the_connection() -> None:
    """HTTP/1.1, no Content-Length, no `Connection: close`, to HEAD: nothing follows the head
    (llhttp alone would read a body until the close), so the connection is reused."""

    async def main() -> None:
        reply = b"HTTP/1.1 200 OK\r\nX-H: 1\r\n\r\n"
        async with Server(answering(reply)) as server, client(Http1Transport()) as c:
            for _ in range(2):
                response = await c.head(server.url + "/")
                assert response.status_code == 200 and response.headers["x-h"] == "1"
            assert server.connections == 1

    run(main)


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        pytest.param("G\u00c9T", {}, id="non-ascii-method"),
        pytest.param("GET /x HTTP/1.1", {}, id="method-with-spaces"),
        pytest.param("GET", {"Bad Name": "x"}, id="header-name-with-space"),
    ],
)
def test_an_illegal_method_or_header_name_is_refused_before_sending(
    method: str, headers: dict[str, str]
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server, client(Http1Transport()) as c:
            with pytest.raises(httpx.LocalProtocolError, match="Illegal"):
                await c.request(method, server.url + "/", headers=headers)
            assert (await c.get(server.url + "/")).content == b"ok"
            assert server.connections == 1 and server.requests == [b"/"]

    run(main)


def test_an_http10_answer_with_keep_alive_keeps_the_connection() -> None:
    """HTTP/1.0 with `Connection: keep-alive` (which httpcore ignores, closing): reused, also
    after an answer to HEAD without Content-Length."""

    def reply(target: bytes) -> bytes:
        if target == b"/head":
            return b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"
        return b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with Server(answering(reply)) as server, client(Http1Transport()) as c:
            assert (await c.get(server.url + "/")).content == b"ok"
            head = await c.head(server.url + "/head")
            assert head.status_code == 200 and head.http_version == "HTTP/1.0"
            assert (await c.get(server.url + "/")).content == b"ok"
            assert server.connections == 1

    run(main)


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "Malformed HTTP response"),  # llhttp refuses it
        (b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", "Invalid response status 99"),
    ],
)
def test_a_refused_reply_is_its_own_error_whatever_is_being_handled(
    reply: bytes, said: str
) -> None:
    """The error a malformed reply gets comes from the parser or the callback that refused
    it, never from the exception being handled when the bytes arrived (it was read from the
    parser error's __context__: under the compiled build an earlier mirror's ReadTimeout was
    still there, and a garbage reply failed as that timeout)."""

    async def main() -> None:
        pool = _Pool(Http1Transport(), asyncio.get_running_loop())
        connection = _Connection(pool, ("http", "127.0.0.1", 80, "127.0.0.1"))
        try:
            raise httpx.ReadTimeout("another request's")
        except httpx.ReadTimeout:
            connection.data_received(reply)
        assert isinstance(connection.error, httpx.RemoteProtocolError)
        assert said in str(connection.error)

    asyncio.run(main())


# -- a third review: transfer codings, interim answers, Host -------------------------------


@pytest.mark.parametrize(
    "codings",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: identity, chunked\r\n",
    ],
    ids=["gzip-chunked", "chunked-twice", "split-over-two-lines", "identity-chunked"],
)
def test_a_transfer_coding_other_than_chunked_alone_is_refused(codings: bytes) -> None:
    """llhttp undoes chunked and nothing else: a body also gzip-coded (or chunked twice) would
    reach the caller still encoded, as a 200. It is refused, as httpx's transport refuses it,
    and the connection is not used again."""
    inner = b"2\r\nok\r\n0\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)
    reply = b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n" + body

    async def main() -> None:
        transport = Http1Transport()
        async with Server(answering(reply)) as server, client(transport) as c:
            with pytest.raises(httpx.RemoteProtocolError, match="Only Transfer-Encoding: chunked"):
                await c.get(server.url + "/")
            assert connections(transport) == []

    run(main)


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 100 Continue\r\n\r\n",
        b"HTTP/1.0 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0-100", "http-1.0-103"],
)
def test_an_interim_answer_says_nothing_of_the_connection(interim: bytes) -> None:
    """A 1xx ends at its headers (RFC 9110 §15.2): its `Connection: close` or HTTP/1.0 does
    not end the exchange, the final answer that follows is read, and that answer decides
    whether the connection is used again (here it is)."""

    async def main() -> None:
        transport = Http1Transport()
        async with Server(answering(interim + OK)) as server, client(transport) as c:
            for _ in range(2):
                response = await c.get(server.url + "/")
                assert (response.status_code, response.content) == (200, b"ok")
            assert server.connections == 1

    run(main)


def test_host_goes_first_when_the_caller_sets_it() -> None:
    """RFC 9112 §3.2: Host is the first field after the request line, as h11 sends it, also
    when the caller (or the mesh, on every upstream request) set it among other headers."""

    async def main() -> None:
        async with Server(answering(OK)) as server, client(Http1Transport()) as c:
            await c.get(server.url + "/", headers={"X-First": "1", "Host": "reviews:9080"})
            lines = server.heads[0].split(b"\r\n")
            assert lines[1] == b"Host: reviews:9080"
            assert b"X-First: 1" in lines[2:]

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_upload_stops_pulling_the_body_once_a_write_finds_the_connection_reset(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that resets the connection while a streamed body is being sent: the write
    that finds the reset stops the upload. The loop only reports the loss later
    (connection_lost), and a body generator that never awaits keeps it from running: the
    transport must not pull the rest of the body into a dead socket (a whole file, read for
    nothing) nor make asyncio log `socket.send() raised exception.` for every chunk."""

    async def main() -> None:
        transport = Http1Transport()
        reset = asyncio.Event()
        pulled = 0

        async def handle(peer: Peer) -> None:
            await peer.head()
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.writer.transport.abort()  # linger 0: the close is a RST
            reset.set()

        async def upload() -> AsyncIterator[bytes]:
            nonlocal pulled
            await reset.wait()
            # Wait (blocking the loop, so that it cannot see the reset first) until the RST
            # has reached the client's socket: it polls readable (and errors) then.
            (conn,) = connections(transport)
            sock = conn._transport.get_extra_info("socket")
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            assert poller.poll(5000), "the reset never reached the client"
            for _ in range(50):  # an app's generator that never awaits, a file read whole
                pulled += 1
                yield b"x" * 1000

        async with Server(handle) as server, client(transport, timeout=2.0) as c:
            with pytest.raises(httpx.TransportError):
                await c.post(server.url + "/", content=upload())
        assert pulled <= 2, f"{pulled} chunks pulled after the reset"

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(main, loop)
    assert "socket.send() raised exception." not in caplog.text
