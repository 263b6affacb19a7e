"""Access logs from real requests, switched on by a Telemetry resource."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from tests.upstream import AsgiServer, HypercornServer, WsgiServer, loopback_service, mesh_for

TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
"""


def app(mesh: meshlib.Mesh) -> Any:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    return meshlib.MeshMiddleware(ok, mesh=mesh)


def test_one_line_per_request_each_side(caplog: pytest.LogCaptureFixture) -> None:
    """With Telemetry accessLogging on, each side logs one Istio-format line per request."""
    server_config = MeshConfig(service="ratings")
    server_mesh = meshlib.Mesh(
        server_config, policy=Snapshot.build(load_text(TELEMETRY).resources, server_config)
    )
    server = AsgiServer(app(server_mesh), "ratings").start()
    policy = (
        TELEMETRY + "---\n" + loopback_service("ratings.default.svc.cluster.local", server.port)
    )
    client_mesh = mesh_for(MeshConfig(service="reviews"), policy)
    caplog.set_level(logging.INFO, logger="meshlib.access")
    try:
        with meshlib.Client(mesh=client_mesh) as client:
            response = client.get(
                "http://ratings:9080/ratings/1?x=1", headers={"user-agent": "test-agent"}
            )
        assert response.status_code == 200
    finally:
        server.stop()
        server_mesh.close()
        client_mesh.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "meshlib.access"]
    assert len(lines) == 2, lines
    outbound = next(
        line for line in lines if "outbound|9080||ratings.default.svc.cluster.local" in line
    )
    inbound = next(line for line in lines if line is not outbound)
    assert '"GET /ratings/1?x=1 HTTP/1.1" 200 -' in outbound
    assert '"test-agent"' in outbound and '"ratings:9080"' in outbound
    assert f'"127.0.0.1:{server.port}"' in outbound
    assert '"GET /ratings/1?x=1 HTTP/1.1" 200 -' in inbound
    assert f" inbound|{server.port}|| " in inbound  # Envoy's inbound cluster names the port
    request_id = outbound.split('"')[9]
    assert request_id != "-" and request_id in inbound  # the same x-request-id on both sides


def test_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    """Without Telemetry accessLogging (and MESHLIB_ACCESS_LOG unset), nothing is logged."""
    mesh = meshlib.Mesh(MeshConfig(service="web"))
    caplog.set_level(logging.INFO, logger="meshlib.access")
    server = AsgiServer(app(mesh), "web").start()
    try:
        import httpx

        assert httpx.get(f"http://127.0.0.1:{server.port}/").status_code == 200
    finally:
        server.stop()
        mesh.close()
    assert not [r for r in caplog.records if r.name == "meshlib.access"]


def wsgi_app(mesh: meshlib.Mesh) -> Any:
    def ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-length", "2")])
        return [b"ok"]

    return meshlib.MeshWSGIMiddleware(ok, mesh=mesh)


@pytest.mark.parametrize(
    ("server_kind", "http2", "protocol"),
    [
        pytest.param("uvicorn", False, "HTTP/1.1", id="asgi-http1"),
        pytest.param("hypercorn", True, "HTTP/2", id="asgi-http2"),
        pytest.param("wsgiref", False, "HTTP/1.1", id="wsgi"),
    ],
)
def test_inbound_line_names_protocol_and_port(
    caplog: pytest.LogCaptureFixture, server_kind: str, http2: bool, protocol: str
) -> None:
    """The inbound line says the HTTP version the request came in (Envoy's %PROTOCOL%) and
    names the inbound cluster by the port it came in on, as Envoy's `inbound|<port>||`."""
    config = MeshConfig(service="ratings")
    mesh = meshlib.Mesh(config, policy=Snapshot.build(load_text(TELEMETRY).resources, config))
    caplog.set_level(logging.INFO, logger="meshlib.access")
    try:
        if server_kind == "wsgiref":
            with WsgiServer(wsgi_app(mesh)) as wsgi:
                port = wsgi.port
                response = httpx.get(f"http://127.0.0.1:{port}/ratings/1")
        else:
            server = (AsgiServer if server_kind == "uvicorn" else HypercornServer)(app(mesh))
            server.start()
            port = server.port
            try:
                # HTTP/2 from the first byte (h2c prior knowledge), which hypercorn speaks.
                with httpx.Client(http1=not http2, http2=http2) as client:
                    response = client.get(f"http://127.0.0.1:{port}/ratings/1")
            finally:
                server.stop()
    finally:
        mesh.close()
    assert response.status_code == 200
    if http2:
        assert response.http_version == "HTTP/2"  # (wsgiref answers HTTP/1.0 to HTTP/1.1)
    deadline = time.monotonic() + 10  # logged once the server closed the response (WSGI)
    while not (lines := [r.getMessage() for r in caplog.records if r.name == "meshlib.access"]):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.01)
    (line,) = lines
    assert f'"GET /ratings/1 {protocol}" 200 -' in line
    assert f" inbound|{port}|| " in line


@pytest.mark.parametrize(
    ("client_kind", "protocol"),
    [
        pytest.param("httpx-h2", "HTTP/2", id="httpx-http2"),
        pytest.param("httpx", "HTTP/1.1", id="httpx-http1"),
        pytest.param("requests", "HTTP/1.1", id="requests"),
    ],
)
def test_outbound_line_names_the_protocol_of_the_call(
    caplog: pytest.LogCaptureFixture, client_kind: str, protocol: str
) -> None:
    """A meshed call's line says the HTTP version it was made in: HTTP/2 for an httpx client
    speaking it (here with prior knowledge to hypercorn), as Envoy's %PROTOCOL% says the
    version the app spoke to its sidecar."""
    server = HypercornServer(app(meshlib.Mesh(MeshConfig(service="ratings"), watch=False)))
    server.start()
    policy = (
        TELEMETRY + "---\n" + loopback_service("ratings.default.svc.cluster.local", server.port)
    )
    mesh = mesh_for(MeshConfig(service="reviews"), policy)
    caplog.set_level(logging.INFO, logger="meshlib.access")
    url = "http://ratings:9080/ratings/1"
    try:
        if client_kind == "requests":
            with meshlib.Session(mesh=mesh) as session:
                assert session.get(url, timeout=5).status_code == 200
        else:
            http2 = client_kind == "httpx-h2"
            with meshlib.Client(mesh=mesh, http1=not http2, http2=http2) as client:
                response = client.get(url)
            assert response.status_code == 200 and response.http_version == protocol
    finally:
        server.stop()
        mesh.close()
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "meshlib.access" and "outbound|9080||" in r.getMessage()
    ]
    assert f'"GET /ratings/1 {protocol}" 200 -' in line


class _Http10(BaseHTTPRequestHandler):
    """Answers in HTTP/1.0 (http.server's default protocol_version), as old servers do."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("client_kind", ["httpx", "httpx-async", "requests"])
def test_an_http10_answer_to_a_call_made_in_http11_is_logged_http11(
    caplog: pytest.LogCaptureFixture, client_kind: str
) -> None:
    """The clients send HTTP/1.1; an upstream answering in HTTP/1.0 does not change the
    version the call was made in, which Envoy's %PROTOCOL% names (the app's, to its sidecar)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Http10)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    policy = (
        TELEMETRY
        + "---\n"
        + loopback_service("legacy.default.svc.cluster.local", server.server_port)
    )
    mesh = mesh_for(MeshConfig(service="reviews"), policy)
    caplog.set_level(logging.INFO, logger="meshlib.access")
    url = "http://legacy:9080/old"
    try:
        if client_kind == "requests":
            with meshlib.Session(mesh=mesh) as session:
                assert session.get(url, timeout=5).raw.version == 10
        elif client_kind == "httpx":
            with meshlib.Client(mesh=mesh) as client:
                assert client.get(url).http_version == "HTTP/1.0"
        else:

            async def call() -> str:
                async with meshlib.AsyncClient(mesh=mesh) as client:
                    return (await client.get(url)).http_version

            assert asyncio.run(call()) == "HTTP/1.0"
    finally:
        server.shutdown()
        server.server_close()
        mesh.close()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "meshlib.access"]
    assert '"GET /old HTTP/1.1" 200 -' in line
