"""An upload to an upstream that stops reading is bounded as Envoy bounds it: by the route's
timeout (504 UT), or by the caller's own write timeout when that is shorter (raised as httpx
or requests raises it). The upstream accepts the connection and never reads, so the request body fills the
socket buffers and stalls."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import requests

import meshlib
from meshlib.config import MeshConfig
from tests.upstream import mesh_for

BODY = b"x" * (32 * 1024 * 1024)  # far beyond the loopback socket buffers


# The route's timeout; where the caller's own (0.2 s) should win, a route timeout far longer,
# so that the time the test allows (under ROUTE_FAR_S) tells them apart on a loaded machine.
ROUTE_S, ROUTE_FAR_S = 0.5, 5.0


def policy(port: int, route_timeout: float = ROUTE_S) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sink}}
spec:
  hosts: [sink.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: sink}}
spec:
  hosts: [sink]
  http:
  - timeout: {route_timeout}s
    retries: {{attempts: 0}}
    route: [{{destination: {{host: sink}}}}]
"""


async def _upload(
    timeout: httpx.Timeout, route_timeout: float = ROUTE_S
) -> tuple[httpx.Response | Exception, float]:
    stop = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mesh = mesh_for(MeshConfig(service="productpage"), policy(port, route_timeout))
    started = time.monotonic()
    async with server, meshlib.AsyncClient(mesh=mesh, timeout=timeout) as client:
        try:
            result: httpx.Response | Exception = await client.post(
                "http://sink:9080/upload", content=BODY
            )
        except httpx.HTTPError as exc:
            result = exc
        finally:
            stop.set()
    return result, time.monotonic() - started


def test_the_route_timeout_bounds_an_upload_the_upstream_never_reads() -> None:
    result, elapsed = asyncio.run(_upload(httpx.Timeout(10.0)))
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 504 and result.text == "upstream request timeout"
    assert result.extensions["response_flags"] == ["UT"]
    assert elapsed < 3.0


def test_a_shorter_write_timeout_of_the_caller_is_its_own() -> None:
    """Raised as without the mesh, not answered 504: the caller's timeout, not the route's."""
    result, elapsed = asyncio.run(_upload(httpx.Timeout(10.0, write=0.2), ROUTE_FAR_S))
    assert isinstance(result, httpx.WriteTimeout), result
    assert elapsed < ROUTE_FAR_S / 2


def _requests_upload(
    timeout: float, route_timeout: float = ROUTE_S
) -> tuple[requests.Response | Exception, float]:
    """The same upload from `meshlib.Session`, to a socket server that accepts and never reads."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
        thread.start()
        mesh = mesh_for(
            MeshConfig(service="productpage"), policy(server.getsockname()[1], route_timeout)
        )
        started = time.monotonic()
        try:
            with meshlib.Session(mesh=mesh) as session:
                result: requests.Response | Exception = session.post(
                    "http://sink:9080/upload", data=BODY, timeout=timeout
                )
        except requests.RequestException as exc:
            result = exc
        finally:
            elapsed = time.monotonic() - started
            thread.join(5)
            for conn in accepted:
                conn.close()
            mesh.close()
    return result, elapsed


def test_the_route_timeout_bounds_a_requests_upload_too() -> None:
    """requests reports a send that timed out as "Connection aborted" with the timeout inside:
    it is the route's timeout (504 UT), not a reset (503 UC, retried)."""
    result, elapsed = _requests_upload(timeout=10.0)
    assert isinstance(result, requests.Response), result
    assert result.status_code == 504 and result.text == "upstream request timeout"
    assert result.response_flags == ["UT"]  # type: ignore[attr-defined]
    assert elapsed < 3.0


def test_a_shorter_timeout_of_a_requests_caller_is_its_own() -> None:
    """Raised as requests raises it without the mesh, not answered by the mesh."""
    result, elapsed = _requests_upload(timeout=0.2, route_timeout=ROUTE_FAR_S)
    assert isinstance(result, requests.ConnectionError), result
    assert "timed out" in str(result)
    assert elapsed < ROUTE_FAR_S / 2
