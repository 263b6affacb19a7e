"""`MeshWSGIMiddleware` under gunicorn and waitress: what the caller got on the wire is what
is counted.

The app runs in a real server process on loopback; `/counted` (outside the mesh) answers
what its access log recorded, so each test compares the bytes and status a raw socket saw
with the request's line."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshlib

APP = """
import time

import meshlib
from meshlib.config import MeshConfig
from tests.access_lines import logging_mesh

mesh, lines = logging_mesh(
    MeshConfig(service="ratings", metrics_port=None, propagate_headers=["end-user"])
)


def served(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/raises":
        start_response("200 OK", [("content-type", "text/plain")])
        raise RuntimeError("failed after start_response, before any body")
    if path == "/no-content":
        start_response("204 No Content", [])
        return [b"hello world"]
    if path == "/not-modified":
        start_response("304 Not Modified", [("content-length", "11")])
        return [b"hello world"]
    if path == "/overlong":
        start_response("200 OK", [("content-length", "5")])
        return [b"hello world"]
    if path == "/stream":
        start_response("200 OK", [("content-type", "text/plain")])

        def chunks():
            for _ in range(20):
                yield b"x" * 1000
                time.sleep(0.2)

        return chunks()
    if path == "/write":
        write = start_response("200 OK", [("content-type", "text/plain")])
        for _ in range(20):
            write(b"x" * 1000)
            time.sleep(0.2)
        return []
    if path in ("/breaks", "/breaks-sized"):
        headers = [("content-length", "100")] if path == "/breaks-sized" else []
        start_response("200 OK", headers)

        def broken():
            yield b"0123456789"
            raise RuntimeError("failed mid-body")

        return broken()
    if path == "/outbound":  # what a meshed call made while serving would carry
        start_response("200 OK", [("content-type", "application/json")])

        def outbound():
            yield __import__("json").dumps(dict(mesh.propagator.outbound(lambda name: False)))
            yield ""

        return (chunk.encode() for chunk in outbound())
    start_response("404 Not Found", [])
    return []


meshed = meshlib.MeshWSGIMiddleware(served, mesh=mesh)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/counted":
        start_response("200 OK", [("content-type", "application/json")])
        logged = [[e.path, e.response_code, e.response_flags, e.bytes_sent] for e in lines]
        return [__import__("json").dumps(logged).encode()]
    return meshed(environ, start_response)
"""


# Each server's command line serving served_app:app on 127.0.0.1:{port}, one worker.
SERVERS = {
    "gunicorn": ["gunicorn", "--workers", "1", "--bind", "127.0.0.1:{port}", "served_app:app"],
    "waitress": ["waitress-serve", "--listen", "127.0.0.1:{port}", "served_app:app"],
}


class Served:
    """The app above in a real WSGI server on a loopback port the OS handed out."""

    def __init__(self, directory: Path, server: str) -> None:
        self.server = server
        (directory / "served_app.py").write_text(textwrap.dedent(APP))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        tested = str(Path(meshlib.__file__).parent.parent)  # the compiled copy, if tested
        path = os.pathsep.join(filter(None, (tested, os.environ.get("PYTHONPATH"))))
        command = SERVERS[server]
        binary = str(Path(sys.executable).parent / command[0])
        self.process = subprocess.Popen(
            [binary, *(part.format(port=self.port) for part in command[1:])],
            cwd=directory,
            env={**os.environ, "PYTHONPATH": path},
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:  # ready once it answers
            try:
                self.counted()
                return
            except OSError:
                assert self.process.poll() is None, f"{server} exited"
                assert time.monotonic() < deadline, f"{server} did not start"
                time.sleep(0.05)

    def counted(self) -> list[list[object]]:
        """(path, response_code, response_flags, bytes_sent) of each request logged."""
        url = f"http://127.0.0.1:{self.port}/counted"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def raw(self, path: str, *, leave_after: int | None = None) -> bytes:
        """What a raw HTTP/1.1 GET of `path` receives; with `leave_after`, the caller resets
        the connection once it has that many bytes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n".encode()
            )
            got = b""
            while leave_after is None or len(got) < leave_after:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            if leave_after is not None:  # RST, not FIN: the server's next write fails
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return got

    def logged(self, path: str) -> list[object]:
        """The line of `path`, once the worker has logged it."""
        deadline = time.monotonic() + 10
        while True:
            lines = [line for line in self.counted() if line[0] == path]
            if lines:
                (line,) = lines
                return line
            assert time.monotonic() < deadline, f"{path} was not logged"
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module", params=list(SERVERS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("wsgi_served"), request.param)
    yield server
    server.stop()


def test_an_app_raising_after_start_response_is_the_500_the_server_answers(
    served: Served,
) -> None:
    """start_response("200 OK") and then an exception, before any body: the headers never
    went out, so the server answers 500, and that is what is counted (not the 200 named)."""
    answer = served.raw("/raises")
    assert answer.startswith(b"HTTP/1.1 500")
    assert served.logged("/raises")[1:3] == [500, "-"]


@pytest.mark.parametrize(
    ("path", "status"), [("/no-content", b"204"), ("/not-modified", b"304"), ("/overlong", b"200")]
)
def test_response_bytes_are_those_the_server_sends(
    served: Served, path: str, status: bytes
) -> None:
    """The app returns 11 body bytes each time; the server sends none with a 204 or a 304 and
    cuts the body at its declared Content-Length (5): the bytes counted are the bytes sent."""
    answer = served.raw(path)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status
    assert served.logged(path)[3] == len(body) == (5 if path == "/overlong" else 0)


@pytest.mark.parametrize("path", ["/stream", "/write"])
def test_a_caller_leaving_midway_is_dc_with_the_bytes_sent(served: Served, path: str) -> None:
    """The caller resets the connection after five of twenty 1,000-byte chunks (one every
    200 ms), whether the app returns them from a generator or sends them with write(): the
    request is Envoy's DC, and the chunk whose write failed is not counted as sent. gunicorn
    writes each chunk to the socket: the count is exact. waitress queues them for its own
    thread to send, so the write it takes after the reset, before its thread saw it, counts:
    one chunk more at most."""
    got = served.raw(path, leave_after=5000)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) < 5000 + 1000
    _, status, flags, sent = served.logged(path)
    assert (status, flags) == (200, "DC")
    assert sent == 5000 if served.server == "gunicorn" else sent in (5000, 6000)


@pytest.mark.parametrize("path", ["/breaks", "/breaks-sized"])
def test_a_body_broken_off_midway_keeps_its_status_with_flag_uc(served: Served, path: str) -> None:
    """A generator that raises after its first chunk, its body chunked or of a declared
    length: the server drops the connection, the caller got the status and 10 bytes. Envoy's
    inbound sidecar counts the status sent with flag UC (the app terminated its response)."""
    answer = served.raw(path)
    assert answer.startswith(b"HTTP/1.1 200") and b"0123456789" in answer
    assert served.logged(path)[1:] == [200, "UC", 10]


REPEATED = [
    ("x-request-id", "aaa"),
    ("x-request-id", "bbb"),
    ("x-envoy-expected-rq-timeout-ms", "5000"),
    ("x-envoy-expected-rq-timeout-ms", "10"),
    ("end-user", "jason"),
    ("end-user", "mallory"),
]


def outbound_with(port: int, headers: list[tuple[str, str]]) -> dict[str, str]:
    """What a meshed call made while serving `/outbound` carries, for a request sending
    `headers` (repeated names sent as separate header lines)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest("GET", "/outbound")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        return json.loads(connection.getresponse().read())  # type: ignore[no-any-return]
    finally:
        connection.close()


def test_repeated_headers_are_read_as_under_asgi(served: Served) -> None:
    """A header sent twice reaches a WSGI app joined by the server (gunicorn with `,`,
    waitress with `, `); x-request-id and the timeouts are read as the comma-joined list
    whatever the server, as the ASGI middleware reads them (tests/test_inbound_servers.py):
    the id is `aaa,bbb`, the two timeouts no deadline (as Envoy reads them); an app header
    goes on as the server joined it."""
    out = outbound_with(served.port, REPEATED)
    assert out["x-request-id"] == "aaa,bbb"
    assert "x-envoy-expected-rq-timeout-ms" not in out
    joined = "jason,mallory" if served.server == "gunicorn" else "jason, mallory"
    assert out["end-user"] == joined


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _outbound_of(port: int, headers: dict[str, str]) -> dict[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/outbound", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_a_request_leaves_nothing_in_the_worker_thread(served: Served) -> None:
    """A request's trace context is its own: the next request served by the same worker
    thread, which sent no traceparent, sends none on, and both are counted."""
    first = _outbound_of(served.port, {"traceparent": TRACEPARENT, "x-request-id": "first"})
    assert (first["traceparent"], first["x-request-id"]) == (TRACEPARENT, "first")
    second = _outbound_of(served.port, {"x-request-id": "second"})
    assert "traceparent" not in second and second["x-request-id"] == "second"
    deadline = time.monotonic() + 10
    while len([line for line in served.counted() if line[0] == "/outbound"]) < 2:
        assert time.monotonic() < deadline, "the requests were not logged"
        time.sleep(0.05)


def test_a_server_that_never_calls_close_still_counts_each_request() -> None:
    """uvicorn's WSGI interface iterates the response and never calls its close() (nor does
    asgiref's WsgiToAsgi): each request is still counted when its body is exhausted, and its
    context, current while each chunk is produced, is not left in the executor's thread for
    the next request to send on."""
    import warnings

    from uvicorn.middleware.wsgi import WSGIMiddleware

    from meshlib.config import MeshConfig
    from tests.access_lines import logging_mesh
    from tests.upstream import AsgiServer

    mesh, lines = logging_mesh(
        MeshConfig(service="ratings", metrics_port=None, propagate_headers=["end-user"])
    )

    def app(environ: dict[str, object], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("content-type", "application/json")])
        yield b""  # the context is current while each chunk is produced
        yield json.dumps(dict(mesh.propagator.outbound(lambda name: False))).encode()

    with warnings.catch_warnings():  # uvicorn's own WSGI adapter is deprecated (for a2wsgi)
        warnings.simplefilter("ignore", DeprecationWarning)
        served = WSGIMiddleware(meshlib.MeshWSGIMiddleware(app, mesh=mesh), workers=1)
    server = AsgiServer(served, "ratings").start()
    try:
        first = _outbound_of(server.port, {"traceparent": TRACEPARENT, "x-request-id": "first"})
        second = _outbound_of(server.port, {"x-request-id": "second"})
        deadline = time.monotonic() + 10
        while len(lines) < 2:
            assert time.monotonic() < deadline, "the requests were not logged"
            time.sleep(0.01)
    finally:
        server.stop()
    assert (first["traceparent"], first["x-request-id"]) == (TRACEPARENT, "first")
    assert "traceparent" not in second and second["x-request-id"] == "second"
    assert [(line.response_code, line.response_flags) for line in lines] == [(200, "-")] * 2
    assert [line.request_id for line in lines] == ["first", "second"]
    mesh.close()
