"""Http1Transport: httpx.AsyncClient over meshlib's HTTP/1.1 transport, against a real uvicorn
server on 127.0.0.1 and, for what a well-behaved server never does, small asyncio servers that
write exact bytes.

The uvicorn server runs in a thread (`uvicorn.Server` on a socket bound to port 0); every test
drives its client with `asyncio.run` and closes it, so no connection outlives it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from meshlib.clients._http1 import Http1Transport
from meshlib.clients._http1_pool import _Pool
from meshlib.clients._http1_request import _Outgoing

uvicorn = pytest.importorskip("uvicorn")

BIG = bytes(range(256)) * 1024  # 256 KiB: more than one read, so the streaming path
HUGE = BIG * 16  # 4 MiB: more than the transport buffers before it pauses reading


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    body = b""
    chunks = 0
    while True:
        message = await receive()
        body += message.get("body", b"")
        chunks += 1
        if not message.get("more_body"):
            break
    path = scope["path"]
    headers: list[tuple[bytes, bytes]] = []
    if path == "/echo":
        payload = {
            "method": scope["method"],
            "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body": body.decode("latin-1"),
        }
        out = json.dumps(payload).encode()
        headers.append((b"content-type", b"application/json"))
    elif path == "/cookies":
        out = b"two cookies"
        headers += [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
        headers += [(b"x-multi", b"one"), (b"x-multi", b"two")]
    elif path == "/gzip":
        out = gzip.compress(b"compressed " * 100)
        headers.append((b"content-encoding", b"gzip"))
    elif path == "/big":
        out = BIG
    elif path == "/huge":
        out = HUGE
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(5):
            await send({"type": "http.response.body", "body": b"%d" % i * 1000, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    elif path == "/slow":
        await asyncio.sleep(float(scope["query_string"].decode() or "1"))
        out = b"late"
    elif path == "/close":
        out = b"bye"
        headers.append((b"connection", b"close"))
    else:
        out = b"ok"
    headers.append((b"content-length", b"%d" % len(out)))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, ws="none",
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during startup"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client(**kwargs: Any) -> httpx.AsyncClient:
    transport = Http1Transport(**kwargs.pop("transport_options", {}))
    return httpx.AsyncClient(transport=transport, **kwargs)


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k == name]


def test_get_round_trip_sends_exactly_httpx_headers(base_url: str) -> None:
    async def main() -> httpx.Response:
        async with client() as c:
            return await c.get(f"{base_url}/echo?x=1&y=%2F", headers={"X-Trace": "abc"})

    response = asyncio.run(main())
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    assert response.reason_phrase == "OK"
    echo = response.json()
    assert echo["method"] == "GET"
    assert echo["query"] == "x=1&y=%2F"
    assert echo["body"] == ""
    names = [k for k, _ in echo["headers"]]
    # httpx's defaults and nothing else: one of each, and no Content-Length on a bodiless GET.
    assert header_values(echo, "user-agent") == [f"python-httpx/{httpx.__version__}"]
    assert header_values(echo, "accept") == ["*/*"]
    assert header_values(echo, "accept-encoding") == response.request.headers.get_list(
        "accept-encoding"
    )
    assert header_values(echo, "host") == [base_url.removeprefix("http://")]
    assert header_values(echo, "x-trace") == ["abc"]
    assert "content-length" not in names
    assert "content-type" not in names


def test_removed_httpx_default_headers_stay_removed(base_url: str) -> None:
    async def main() -> dict[str, Any]:
        async with client() as c:
            request = c.build_request("POST", f"{base_url}/echo", content=b"x")
            for name in ("User-Agent", "Accept", "Accept-Encoding"):
                del request.headers[name]
            response = await c.send(request)
            return dict(response.json())

    names = {k for k, _ in asyncio.run(main())["headers"]}
    assert not names & {"user-agent", "accept", "accept-encoding", "content-type"}


def test_post_bytes_round_trip(base_url: str) -> None:
    payload = bytes(range(256)) * 40

    async def main() -> dict[str, Any]:
        async with client() as c:
            response = await c.post(
                f"{base_url}/echo", content=payload, headers={"Content-Type": "application/x-raw"}
            )
            return dict(response.json())

    echo = asyncio.run(main())
    assert echo["method"] == "POST"
    assert echo["body"].encode("latin-1") == payload
    assert header_values(echo, "content-length") == [str(len(payload))]
    assert header_values(echo, "content-type") == ["application/x-raw"]


def test_post_json_and_empty_body(base_url: str) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with client() as c:
            a = await c.post(f"{base_url}/echo", json={"k": [1, 2]})
            b = await c.post(f"{base_url}/echo")
            return a.json(), b.json()

    with_json, empty = asyncio.run(main())
    assert json.loads(with_json["body"]) == {"k": [1, 2]}
    assert header_values(with_json, "content-type") == ["application/json"]
    assert empty["body"] == ""
    assert header_values(empty, "content-length") == ["0"]
    assert header_values(empty, "content-type") == []


def test_streaming_request_body(base_url: str) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"chunk-%d;" % i
            await asyncio.sleep(0)

    async def main() -> dict[str, Any]:
        async with client() as c:
            response = await c.put(f"{base_url}/echo", content=body())
            return dict(response.json())

    echo = asyncio.run(main())
    assert echo["method"] == "PUT"
    assert echo["body"] == "".join(f"chunk-{i};" for i in range(5))
    assert header_values(echo, "transfer-encoding") == ["chunked"]
    assert header_values(echo, "content-length") == []


def test_repeated_response_headers_are_preserved(base_url: str) -> None:
    async def main() -> tuple[httpx.Response, dict[str, str]]:
        async with client() as c:
            response = await c.get(f"{base_url}/cookies")
            return response, dict(c.cookies)

    response, jar = asyncio.run(main())
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.get_list("x-multi") == ["one", "two"]
    assert response.text == "two cookies"
    assert jar == {"a": "1", "b": "2"}  # httpx's cookie handling saw both


def test_content_encoding_is_decoded_once_by_httpx(base_url: str) -> None:
    async def main() -> tuple[bytes, str]:
        async with client() as c:
            async with c.stream("GET", f"{base_url}/gzip") as response:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            decoded = (await c.get(f"{base_url}/gzip")).text
            return raw, decoded

    raw, decoded = asyncio.run(main())
    assert gzip.decompress(raw) == b"compressed " * 100  # the transport left the bytes alone
    assert decoded == "compressed " * 100


def test_response_streaming(base_url: str) -> None:
    async def main() -> tuple[list[bytes], bytes, bytes]:
        async with client() as c:
            async with c.stream("GET", f"{base_url}/stream") as response:
                assert response.status_code == 200
                chunks = [chunk async for chunk in response.aiter_raw()]
            async with c.stream("GET", f"{base_url}/big") as response:
                big = b"".join([chunk async for chunk in response.aiter_bytes()])
            # The connection went back to the pool in a usable state.
            again = (await c.get(f"{base_url}/big")).content
            return chunks, big, again

    chunks, big, again = asyncio.run(main())
    assert b"".join(chunks) == b"".join(b"%d" % i * 1000 for i in range(5))
    assert len(chunks) > 1
    assert big == BIG
    assert again == BIG


def test_response_closed_before_the_end_drops_the_connection(base_url: str) -> None:
    async def main() -> bytes:
        async with client() as c:
            async with c.stream("GET", f"{base_url}/big") as response:
                async for _ in response.aiter_raw():
                    break  # the rest of the body is never read
            return (await c.get(f"{base_url}/big")).content

    assert asyncio.run(main()) == BIG


def test_connection_refused_is_connect_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed

    async def main() -> None:
        async with client() as c:
            await c.get(f"http://127.0.0.1:{port}/")

    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(main())
    assert info.value.request.url.port == port
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "POST"])
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"", id="closed-without-response"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", id="truncated-body"),
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param(b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", id="status-0"),
        pytest.param(b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", id="status-99"),
        pytest.param(b"HTTP/1.1 101 Switching\r\n\r\n", id="status-101"),
    ],
)
def test_broken_server_replies_are_remote_protocol_errors(reply: bytes, method: str) -> None:
    """Each as httpx's own transport would say it, and each request sent once (a request goes
    twice only when the mesh's retry policy says so)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(reply)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, client() as c:
            response = await c.request(method, f"http://127.0.0.1:{port}/")
            if method == "HEAD":  # no body to read: a truncated one is not an error
                raise httpx.RemoteProtocolError("unused", request=response.request)

    with pytest.raises(httpx.RemoteProtocolError) as info:
        asyncio.run(main())
    assert len(received) == 1
    if info.value.args != ("unused",):
        message = str(info.value)
        assert any(word in message for word in ("disconnected", "closed", "Malformed", "status"))
        assert info.value.request.url.path == "/"


def test_many_response_header_lines_are_accepted() -> None:
    """Some clients refuse more than 128 header lines (aiohttp by default); httpx takes them."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        lines = b"".join(b"x-h%d: v\r\n" % i for i in range(300))
        writer.write(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> httpx.Response:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, client() as c:
            return await c.get(f"http://127.0.0.1:{port}/")

    response = asyncio.run(main())
    assert response.status_code == 200 and response.text == "ok"
    assert response.headers["x-h299"] == "v"


def test_read_timeout(base_url: str) -> None:
    async def main() -> None:
        async with client(timeout=httpx.Timeout(5.0, read=0.2)) as c:
            await c.get(f"{base_url}/slow?1")

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(main())
    assert time.monotonic() - started < 0.9


def test_per_request_timeout_overrides_the_client_default(base_url: str) -> None:
    async def main() -> tuple[bytes, Exception]:
        async with client(timeout=0.1) as c:
            ok = await c.get(f"{base_url}/slow?0.3", timeout=2.0)
            with pytest.raises(httpx.ReadTimeout) as info:
                await c.get(f"{base_url}/slow?0.3")
            return ok.content, info.value

    content, error = asyncio.run(main())
    assert content == b"late"
    assert isinstance(error, httpx.TimeoutException)


def test_pool_timeout_when_every_connection_is_busy(base_url: str) -> None:
    async def main() -> None:
        options = {"max_connections": 1}
        async with client(transport_options=options) as c:
            busy = asyncio.create_task(c.get(f"{base_url}/slow?0.5"))
            await asyncio.sleep(0.1)  # let it take the only connection
            try:
                with pytest.raises(httpx.PoolTimeout):
                    await c.get(f"{base_url}/", timeout=httpx.Timeout(5.0, pool=0.1, connect=0.1))
            finally:
                assert (await busy).content == b"late"

    asyncio.run(main())


def test_200_concurrent_requests(base_url: str) -> None:
    async def main() -> list[httpx.Response]:
        async with client() as c:  # 100 connections: half the requests queue for one
            return await asyncio.gather(*(c.get(f"{base_url}/echo?{i}") for i in range(200)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 200
    assert [r.json()["query"] for r in responses] == [str(i) for i in range(200)]


def test_unsupported_scheme() -> None:
    async def main() -> None:
        async with client() as c:
            await c.get("ftp://127.0.0.1/")

    with pytest.raises(httpx.UnsupportedProtocol):
        asyncio.run(main())


def test_transport_survives_a_new_event_loop(base_url: str) -> None:
    transport = Http1Transport()

    async def once(close: bool) -> bytes:
        c = httpx.AsyncClient(transport=transport)
        response = await c.get(f"{base_url}/close")  # no pooled socket left behind
        if close:
            await c.aclose()
        return response.content

    assert asyncio.run(once(close=False)) == b"bye"
    assert asyncio.run(once(close=True)) == b"bye"  # a fresh session in the new loop


def test_rejects_a_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        Http1Transport(max_connections=0)


@pytest.mark.parametrize("content", [b"", b"payload"])
def test_a_request_built_on_a_byte_stream_is_sent_whole(base_url: str, content: bytes) -> None:
    """A request made with `stream=httpx.ByteStream(...)` — how the mesh builds each attempt —
    is not marked read, yet its bytes are known: a GET goes out without a body, a POST with
    Content-Length, never as a chunked body."""

    async def main() -> dict[str, Any]:
        async with client() as c:
            original = c.build_request("POST" if content else "GET", f"{base_url}/echo")
            headers = original.headers.copy()
            if content:
                headers["content-length"] = str(len(content))
            request = httpx.Request(
                original.method, original.url, headers=headers, stream=httpx.ByteStream(content)
            )
            return dict((await c.send(request)).json())

    echo = asyncio.run(main())
    assert echo["body"] == content.decode()
    assert header_values(echo, "transfer-encoding") == []
    assert header_values(echo, "content-length") == ([str(len(content))] if content else [])


def test_a_streamed_body_read_in_advance_is_framed_once(base_url: str) -> None:
    """httpx keeps `Transfer-Encoding: chunked` on a streamed body the app read with
    `aread()`; the bytes then go out chunked, as that header says, and with no Content-Length."""

    async def body() -> AsyncIterator[bytes]:
        yield b"hel"
        yield b"lo"

    async def main() -> dict[str, Any]:
        async with client() as c:
            request = c.build_request("POST", f"{base_url}/echo", content=body())
            await request.aread()
            assert request.headers["transfer-encoding"] == "chunked"
            return dict((await c.send(request)).json())

    echo = asyncio.run(main())
    assert echo["body"] == "hello"
    assert header_values(echo, "transfer-encoding") == ["chunked"]
    assert header_values(echo, "content-length") == []


def test_a_failing_request_body_is_the_apps_error(base_url: str) -> None:
    """The app's own async body generator raising is the app's error, raised as it is (as
    httpx's transport does), not a network failure the mesh would hold against the upstream."""

    async def body() -> AsyncIterator[bytes]:
        yield b"first;"
        raise ValueError("the app's body failed")

    async def main() -> None:
        async with httpx.AsyncClient(transport=Http1Transport()) as client:
            with pytest.raises(ValueError, match="the app's body failed"):
                await client.post(base_url + "/echo", content=body())

    asyncio.run(main())


def test_verify_may_be_a_ca_bundle_path(base_url: str) -> None:
    """`verify="<path>"` (a CA bundle file, which httpx still accepts) makes a verifying
    context; plain http:// requests work as before."""
    import certifi

    transport = Http1Transport(verify=certifi.where())
    context = transport._ssl
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname

    async def main() -> int:
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(base_url + "/echo")).status_code

    assert asyncio.run(main()) == 200


# -- what a well-behaved server never does: small asyncio servers writing exact bytes -------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head (and its Content-Length body, if any)."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            head += await reader.readexactly(int(line.split(b":")[1]))
    return head


def _serve_raw(handler: Handler, body: Callable[[str], Awaitable[Any]]) -> Any:
    """Run `body(base_url)` against an asyncio server whose connections `handler` serves."""

    async def main() -> Any:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await body(f"http://127.0.0.1:{port}")

    return asyncio.run(main())


def _replying(*replies: bytes, close: bool = False) -> tuple[Handler, list[bytes], list[int]]:
    """A handler answering each request on a connection with the next of `replies` (the last
    repeats), closing after each if `close`; it records requests and counts connections."""
    received: list[bytes] = []
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            for i in range(100):
                received.append(await _read_request(reader))
                writer.write(replies[min(i, len(replies) - 1)])
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle, received, connections


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_connections_are_kept_alive_and_reused() -> None:
    handle, received, connections = _replying(OK)

    async def body(url: str) -> list[bytes]:
        async with client() as c:
            return [(await c.get(url + "/")).content for _ in range(5)]

    assert _serve_raw(handle, body) == [b"ok"] * 5
    assert len(received) == 5 and connections == [1]


def test_connection_close_is_honoured() -> None:
    """`Connection: close` from the server, and HTTP/1.0 without keep-alive: a new
    connection for the next request."""
    handle, _, connections = _replying(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )

    async def body(url: str) -> list[bytes]:
        async with client() as c:
            return [(await c.get(url + "/")).content for _ in range(2)]

    assert _serve_raw(handle, body) == [b"ok", b"ok"]
    assert connections == [2]


def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    """The server closes a kept-alive connection after answering: the transport notices,
    and the next request opens a new connection instead of failing on the dead one."""
    handle, received, connections = _replying(OK, close=True)
    transport = Http1Transport()

    async def body(url: str) -> list[bytes]:
        async with httpx.AsyncClient(transport=transport) as c:
            first = (await c.get(url + "/")).content
            deadline = time.monotonic() + 5
            while transport._pool.total:  # poll until the close has been seen
                assert time.monotonic() < deadline, "the closed connection stayed in the pool"
                await asyncio.sleep(0.005)
            return [first, (await c.get(url + "/")).content]

    assert _serve_raw(handle, body) == [b"ok", b"ok"]
    assert connections == [2] and len(received) == 2


def test_head_responses_have_no_body_whatever_content_length_says() -> None:
    handle, _, connections = _replying(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", OK)

    async def body(url: str) -> tuple[httpx.Response, bytes]:
        async with client() as c:
            head = await c.head(url + "/")
            return head, (await c.get(url + "/")).content

    head, after = _serve_raw(handle, body)
    assert (
        head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "100"
    )
    assert after == b"ok" and connections == [1], "the connection carried on after the HEAD"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
            b"ok",
            id="informational-answers-skipped",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            b"6\r\n world\r\n0\r\n\r\n",
            b"hello world",
            id="chunked",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="no-content"),
    ],
)
def test_response_framing(reply: bytes, expected: bytes) -> None:
    handle, _, connections = _replying(reply, OK)

    async def body(url: str) -> tuple[bytes, bytes]:
        async with client() as c:
            return (await c.get(url + "/")).content, (await c.get(url + "/")).content

    assert _serve_raw(handle, body) == (expected, b"ok")
    assert connections == [1]


def test_a_body_without_length_ends_when_the_server_closes() -> None:
    handle, _, connections = _replying(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True
    )

    async def body(url: str) -> list[bytes]:
        async with client() as c:
            return [(await c.get(url + "/")).content for _ in range(2)]

    assert _serve_raw(handle, body) == [b"until the end"] * 2
    assert connections == [2]


def test_a_header_block_over_64_kib_is_refused() -> None:
    big = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
    handle, _, _ = _replying(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok")

    async def body(url: str) -> None:
        async with client() as c:
            await c.get(url + "/")

    with pytest.raises(httpx.RemoteProtocolError, match="too large"):
        _serve_raw(handle, body)


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nx-endless: ", id="header-value"),
        pytest.param(b"HTTP/1.1 200 ", id="reason-phrase"),
    ],
)
def test_an_endless_header_line_is_refused_at_the_limit(opening: bytes) -> None:
    """llhttp hands a header (or the status line) over only once its line ends, so a server
    that never ends one is refused once 64 KiB have come without a whole header block, long
    before the read timeout, which its steady bytes keep away."""
    sent = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(opening)
        try:
            while sent[0] < 8_000_000:
                writer.write(b"a" * 8192)
                sent[0] += 8192
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def body(url: str) -> None:
        async with client(timeout=30) as c:
            await c.get(url + "/")

    start = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="too large"):
        _serve_raw(handle, body)
    assert time.monotonic() - start < 10
    assert sent[0] < 8_000_000  # refused while the server was still sending


def test_an_http_1_0_answer_with_transfer_encoding_closes_its_connection() -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 response is faulty framing; the body
    is read as chunked, and the connection is not used again, keep-alive or not."""
    handle, _, connections = _replying(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n"
    )

    async def body(url: str) -> list[bytes]:
        async with client() as c:
            return [(await c.get(url + "/")).content for _ in range(2)]

    assert _serve_raw(handle, body) == [b"hi", b"hi"]
    assert connections == [2]


def test_an_answer_before_the_request_is_sent_is_its_answer_and_the_request_stays_unsent() -> None:
    """A server may answer a new connection before reading anything (an overloaded one's
    503). When that answer is in before the request goes out, it is the request's answer,
    the request is not written (the server would take it for the next one and answer it to
    whoever used the connection next) and the connection is not reused. Driven step by step
    on a real connection: the transport's own send follows the connect at once."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        try:
            received.append(await reader.read(65536))  # b"" once the client closes
        finally:
            writer.close()

    async def body(url: str) -> tuple[int, bool]:
        transport = Http1Transport()
        request = httpx.Request("GET", url + "/one")
        origin = ("http", "127.0.0.1", request.url.port or 80, "127.0.0.1")
        pool = transport._pool = _Pool(transport, asyncio.get_running_loop())
        connection = await pool.acquire(origin, request, {}, None)
        while not connection.complete:  # the early answer arrives
            await asyncio.sleep(0.001)
        await connection.send(request, _Outgoing(request), None, None)
        status, reusable = connection._status, connection.reusable
        await transport.aclose()
        async with asyncio.timeout(5):
            while not received:  # the server reads until the client closes
                await asyncio.sleep(0.001)
        return status, reusable

    assert _serve_raw(handle, body) == (503, False)
    assert received == [b""]  # nothing was written


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"x-evil": "a\r\nx-injected: 1"}, id="CRLF-in-value"),
        pytest.param({"x-evil": "a\nx-injected: 1"}, id="LF-in-value"),
        pytest.param({"x-evil\r\nx-injected": "1"}, id="CRLF-in-name"),
        pytest.param({"x-evil": "a\0"}, id="NUL"),
        pytest.param({"x-evil": "a\x01b"}, id="SOH"),
        pytest.param({"x-evil": "a\x1bb"}, id="ESC"),
        pytest.param({"x-evil": "a\x7f"}, id="DEL"),
    ],
)
def test_a_header_that_would_split_the_request_is_refused(headers: dict[str, str]) -> None:
    """httpx lets any bytes into a header; sent as they are, CR or LF would smuggle a second
    header (or request) past the server: refused before anything is sent. So is any other
    control character but a tab, as httpx's own transport (h11) refuses it."""
    handle, received, connections = _replying(OK)

    async def body(url: str) -> None:
        async with client() as c:
            await c.get(url + "/", headers=headers)

    with pytest.raises(httpx.LocalProtocolError, match="Illegal"):
        _serve_raw(handle, body)
    assert received == [] and connections == [0]


def test_a_tab_and_non_ascii_bytes_in_a_value_are_sent_as_they_are() -> None:
    """RFC 9110 field values may hold tabs and obs-text (bytes 0x80-0xFF): not refused."""
    handle, received, _ = _replying(OK)

    async def body(url: str) -> int:
        async with client() as c:
            headers = [(b"x-tabbed", b"a\tb"), (b"x-latin", "caf\u00e9".encode("latin-1"))]
            return (await c.get(url + "/", headers=headers)).status_code

    assert _serve_raw(handle, body) == 200
    assert b"x-tabbed: a\tb\r\n" in received[0]
    assert b"x-latin: caf\xe9\r\n" in received[0]


def test_write_timeout_when_the_server_stops_reading() -> None:
    """A server that accepts and never reads: the upload stalls once the socket buffers are
    full, and the write timeout ends it (aiohttp, the previous transport, had none)."""
    stop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()
        writer.close()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(1024):  # up to 1 GiB: far beyond any socket buffer
            yield b"x" * 1_048_576

    async def body(url: str) -> float:
        started = time.monotonic()
        try:
            async with client(timeout=httpx.Timeout(5.0, write=0.3)) as c:
                with pytest.raises(httpx.WriteTimeout):
                    await c.post(url + "/", content=chunks())
        finally:
            stop.set()
        return time.monotonic() - started

    assert _serve_raw(handle, body) < 4.0


def test_a_large_body_streams_with_back_pressure(base_url: str) -> None:
    """4 MiB read slowly: reading pauses while the transport holds more than it may buffer,
    and resumes as the app reads; every byte arrives once, in order."""

    async def main() -> tuple[bytes, int]:
        transport = Http1Transport()
        parts = []
        most = 0
        async with (
            httpx.AsyncClient(transport=transport) as c,
            c.stream("GET", f"{base_url}/huge") as response,
        ):
            async for chunk in response.aiter_raw():
                parts.append(chunk)
                for connection in transport._pool.connections:
                    most = max(most, connection._buffered)
                await asyncio.sleep(0)
        return b"".join(parts), most

    body, most_buffered = asyncio.run(main())
    assert body == HUGE
    assert most_buffered < 2 * 262_144 + 65_536 * 4, most_buffered


def test_waiters_for_a_full_pool_go_first_come_first_served(base_url: str) -> None:
    """max_connections=1: requests queue in order; one whose caller gives up leaves the
    queue without taking the turn of those behind it."""

    async def main() -> list[str]:
        order: list[str] = []
        async with client(transport_options={"max_connections": 1}) as c:

            async def get(name: str, delay: str) -> None:
                await c.get(f"{base_url}/slow?{delay}")
                order.append(name)

            holder = asyncio.create_task(get("holder", "0.3"))
            while c._transport._pool is None or not c._transport._pool.total:  # type: ignore[attr-defined]
                await asyncio.sleep(0.005)
            queued = [asyncio.create_task(get(name, "0")) for name in ("a", "b", "c")]
            while len(c._transport._pool.waiters) < 3:  # type: ignore[attr-defined]
                await asyncio.sleep(0.005)
            queued[0].cancel()
            await asyncio.gather(holder, *queued[1:])
        return order

    assert asyncio.run(main()) == ["holder", "b", "c"]


def test_https_with_a_real_tls_handshake() -> None:
    """TLS to a server whose certificate a test CA signed: verified against that CA, refused
    against the public roots, accepted unverified with verify=False."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    handle, received, _ = _replying(OK)

    async def main() -> list[object]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        url = f"https://localhost:{port}/"
        results: list[object] = []
        async with server:
            for verify in (client_context, True, False):
                try:
                    async with client(transport_options={"verify": verify}) as c:
                        results.append((await c.get(url)).content)
                except httpx.ConnectError as exc:
                    results.append(exc)
        return results

    trusted, public_roots, unverified = asyncio.run(main())
    assert trusted == b"ok" and unverified == b"ok"
    assert isinstance(public_roots, httpx.ConnectError)
    assert "certificate verify failed" in str(public_roots)
    assert len(received) == 2


def test_works_under_uvloop(base_url: str) -> None:
    """uvicorn runs apps on uvloop when it is installed, and its transports are not asyncio's
    classes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bytes]:
        async with client() as c:
            small = (await c.get(f"{base_url}/echo")).status_code
            big = (await c.get(f"{base_url}/huge")).content
            return [b"%d" % small, big]

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == [b"200", HUGE]
    finally:
        loop.close()
