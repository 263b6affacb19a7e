"""Counters stay exact under concurrency: 64 WSGI threads, 1,000 concurrent async calls."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import make_server

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry.metrics import render
from tests.upstream import AsgiServer, loopback_service, mesh_for


def total(mesh: meshlib.Mesh, reporter: str) -> float:
    text = render(mesh.registry).decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "istio_requests_total" and sample.labels["reporter"] == reporter
    )


def test_64_wsgi_threads() -> None:
    """64 threads x 50 requests into a threaded WSGI server: exactly 3,200 counted."""
    mesh = meshlib.Mesh(MeshConfig(service="backend"))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    server = make_server("127.0.0.1", 0, meshlib.MeshWSGIMiddleware(app, mesh=mesh), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:

        def worker() -> None:
            with httpx.Client() as client:
                for _ in range(50):
                    assert client.get(url).status_code == 200

        workers = [threading.Thread(target=worker) for _ in range(64)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # A request is counted when the server has finished it (its iterable closed), which
        # can be just after the client has the whole response: wait for the last ones.
        deadline = time.monotonic() + 5
        while total(mesh, "destination") < 64 * 50 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.shutdown()
        thread.join()
        mesh.close()
    assert total(mesh, "destination") == 64 * 50


def test_1000_concurrent_async_calls() -> None:
    """1,000 concurrent meshed async calls: 1,000 on the client's side and on the server's."""
    server_mesh = meshlib.Mesh(MeshConfig(service="ratings"))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server = AsgiServer(meshlib.MeshMiddleware(app, mesh=server_mesh), "ratings").start()
    policy = loopback_service("ratings.default.svc.cluster.local", server.port)
    client_mesh = mesh_for(MeshConfig(service="reviews"), policy)

    async def run() -> list[int]:
        async with meshlib.AsyncClient(mesh=client_mesh, timeout=60) as client:
            responses = await asyncio.gather(
                *(client.get("http://ratings:9080/") for _ in range(1000))
            )
            return [r.status_code for r in responses]

    try:
        statuses = asyncio.run(run())
    finally:
        server.stop()
        server_mesh.close()
        client_mesh.close()
    assert statuses == [200] * 1000
    assert total(client_mesh, "source") == 1000
    assert total(server_mesh, "destination") == 1000
