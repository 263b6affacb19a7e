"""`MeshMiddleware` under real ASGI servers other than uvicorn: hypercorn, over HTTP/1.1 and
HTTP/2 (prior knowledge), where responses may end with trailers (the ASGI HTTP Trailers
extension). What the caller got is what is counted."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from tests.test_inbound_failures import SAMPLED, Traced
from tests.upstream import AsgiServer, HypercornServer

LATE = 0.3  # seconds between the last body chunk and the trailers


@pytest.fixture
def traced() -> Iterator[Traced]:
    setup = Traced()
    yield setup
    setup.close()


async def with_trailers(scope: Any, receive: Any, send: Any) -> None:
    """A gRPC-style answer: its status comes in the trailers, LATE after the body; `/fails`
    raises before sending them."""
    assert "http.response.trailers" in scope["extensions"]  # hypercorn over HTTP/2
    headers = [(b"content-type", b"application/grpc")]
    await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": True})
    await send({"type": "http.response.body", "body": b"message"})
    await asyncio.sleep(LATE)
    if scope["path"] == "/fails":
        raise RuntimeError("failed before the trailers")
    await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})


def call_h2(port: int, path: str, timeout: float = 5) -> httpx.Response | httpx.HTTPError:
    with httpx.Client(http1=False, http2=True, timeout=timeout) as client:  # h2c
        try:
            headers = {"te": "trailers", "traceparent": SAMPLED.decode()}
            response = client.get(f"http://127.0.0.1:{port}{path}", headers=headers)
        except httpx.HTTPError as exc:
            return exc
    return response


def test_a_response_with_trailers_ends_with_them(traced: Traced) -> None:
    """A response started with `trailers: True` ends with its last trailers, not its last body
    chunk: its duration and its span include the wait for them."""
    server = HypercornServer(meshlib.MeshMiddleware(with_trailers, mesh=traced.mesh)).start()
    try:
        response = call_h2(server.port, "/ok")
    finally:
        server.stop()
    assert isinstance(response, httpx.Response) and response.http_version == "HTTP/2"
    assert response.content == b"message"
    (line,) = traced.logged
    assert (line.response_code, line.response_flags) == (200, "-")
    assert line.duration >= LATE * 1000
    (span,) = traced.spans()
    assert span.end_time is not None and span.start_time is not None
    assert span.end_time - span.start_time >= LATE * 1e9


def test_an_app_failing_before_its_trailers_is_no_clean_answer(traced: Traced) -> None:
    """The body went, the trailers never did (the caller never gets the end of the stream nor
    its status): the app's error is the request's, recorded on its span, not discarded as
    after a whole response."""
    server = HypercornServer(meshlib.MeshMiddleware(with_trailers, mesh=traced.mesh)).start()
    try:
        # hypercorn neither ends nor resets the stream: the caller waits for its timeout
        assert isinstance(call_h2(server.port, "/fails", timeout=1), httpx.ReadTimeout)
    finally:
        server.stop()
    (line,) = traced.logged
    assert (line.response_code, line.response_flags) == (200, "UC")
    assert line.duration >= LATE * 1000
    (span,) = traced.spans()
    assert span.status.status_code.name == "ERROR"


async def breaks_off(scope: Any, receive: Any, send: Any) -> None:
    """Declares 100 body bytes and sends 10; then raises (`/raises`), returns (`/returns`), or
    raises after the whole of a 10-byte body it declared (`/whole`)."""
    path = scope["path"]
    length = b"10" if path == "/whole" else b"100"
    headers = [(b"content-length", length), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
    if path != "/returns":
        raise RuntimeError("failed mid-body")


def raw_get(port: int, path: str) -> bytes:
    """What a raw HTTP/1.1 GET of `path` receives, up to the server closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: ratings\r\n\r\n".encode())
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_a_response_broken_off_midway_keeps_its_status_with_flag_uc(
    traced: Traced, server: str
) -> None:
    """An app that raises, or returns, after it started its response and before its end: the
    server drops the connection and the caller has part of the body. Envoy's inbound sidecar
    counts that as the status sent with flag UC (its upstream, the app, terminated the
    response), not as a clean answer; a body that was whole by its Content-Length is."""
    app = meshlib.MeshMiddleware(breaks_off, mesh=traced.mesh)
    running = (AsgiServer if server == "uvicorn" else HypercornServer)(app).start()
    try:
        answers = {path: raw_get(running.port, path) for path in ("/raises", "/returns", "/whole")}
    finally:
        running.stop()
    for answer in answers.values():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"0123456789"
    logged = {line.path: (line.response_code, line.response_flags) for line in traced.logged}
    assert logged == {"/raises": (200, "UC"), "/returns": (200, "UC"), "/whole": (200, "-")}
    assert sorted((c, f, n) for c, f, _, n in traced.counted()) == [
        ("200", "-", 1.0),
        ("200", "UC", 2.0),
    ]


async def unauthorized(scope: Any, receive: Any, send: Any) -> None:
    """Answers 401 without reading the request's body."""
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_request_bytes_are_what_the_caller_sent_read_or_not(traced: Traced, server: str) -> None:
    """A 5,000-byte upload answered 401 unread: its request bytes are its Content-Length, as
    Envoy counts what the caller sent (and as the WSGI middleware does), whatever the server
    hands the app."""
    app = meshlib.MeshMiddleware(unauthorized, mesh=traced.mesh)
    running = (AsgiServer if server == "uvicorn" else HypercornServer)(app).start()
    try:
        with httpx.Client(timeout=5) as client:
            answer = client.post(f"http://127.0.0.1:{running.port}/upload", content=b"x" * 5000)
    finally:
        running.stop()
    assert answer.status_code == 401
    (line,) = traced.logged
    assert (line.response_code, line.bytes_received) == (401, 5000)


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_repeated_headers_are_read_as_under_wsgi(server: str) -> None:
    """A header sent twice: x-request-id and the timeouts are read as the comma-joined list a
    WSGI server hands over (tests/test_wsgi_served.py), so the id is `aaa,bbb` and the two
    timeouts give no deadline, as Envoy reads them; an app header goes on joined with `,`,
    as gunicorn joins it."""
    from meshlib.config import MeshConfig
    from tests.test_wsgi_served import REPEATED, outbound_with

    mesh = meshlib.Mesh(
        MeshConfig(service="ratings", metrics_port=None, propagate_headers=["end-user"]),
        watch=False,
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = json.dumps(dict(mesh.propagator.outbound(lambda name: False))).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    running = (AsgiServer if server == "uvicorn" else HypercornServer)(
        meshlib.MeshMiddleware(app, mesh=mesh)
    ).start()
    try:
        out = outbound_with(running.port, REPEATED)
    finally:
        running.stop()
        mesh.close()
    assert out["x-request-id"] == "aaa,bbb"
    assert "x-envoy-expected-rq-timeout-ms" not in out
    assert out["end-user"] == "jason,mallory"
