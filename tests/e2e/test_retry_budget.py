"""The retry budget counts what Envoy counts: a failed try whose response body is still to
come is an active request while its retry is decided (Envoy decides on the headers and resets
that stream only afterwards); one whose headers ended it is not."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import pytest

import meshlib.clients.httpx as meshed_httpx
import meshlib.clients.requests as meshed_requests
from meshlib.config import MeshConfig
from tests.rawserver import wait_until_sync
from tests.upstream import AsgiServer, loopback_service, mesh_for

HOST = "svc.default.svc.cluster.local"
POLICY = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.default.svc.cluster.local
  trafficPolicy:
    retryBudget: {percent: {value: 100}, minRetryConcurrency: 1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.default.svc.cluster.local]
  http:
  - route: [{destination: {host: svc.default.svc.cluster.local}}]
    retries: {attempts: 1, retryOn: 5xx}
"""


class _App:
    """/held: 503, then holds its retry until released. /probe: 503 (with or without a body),
    then 200."""

    def __init__(self, probe_body: bytes) -> None:
        self.seen: Counter[str] = Counter()
        self.probe_body = probe_body
        self.holding = False
        self.release = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.seen[path] += 1
        status, body = 503, b"unavailable" if path == "/held" else self.probe_body
        if self.seen[path] > 1:
            status, body = 200, b"ok"
            if path == "/held":
                self.holding = True
                while not self.release.is_set():  # polls the test's event from the server loop
                    await asyncio.sleep(0.005)
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _get(kind: str, mesh: Any, path: str) -> int:
    url = f"http://{HOST}:9080{path}"
    if kind == "httpx":
        with meshed_httpx.Client(mesh=mesh, timeout=10) as client:
            return client.get(url).status_code
    if kind == "requests":
        with meshed_requests.Session(mesh=mesh) as session:
            return session.get(url, timeout=10).status_code

    async def one() -> int:
        async with meshed_httpx.AsyncClient(mesh=mesh, timeout=10) as client:
            return (await client.get(url)).status_code

    return asyncio.run(one())


@pytest.mark.parametrize("kind", ["httpx", "httpx-async", "requests"])
@pytest.mark.parametrize(
    ("probe_body", "retried"),
    [
        pytest.param(b"unavailable", True, id="body-to-come-counts"),
        pytest.param(b"", False, id="ended-by-its-headers"),
    ],
)
def test_the_failed_try_counts_as_active_while_its_body_is_to_come(
    kind: str, probe_body: bytes, retried: bool
) -> None:
    """Budget 100%, minimum 1. A first request's retry is held upstream: it holds the one
    retry slot and is the one active request. A second request fails with a 503: with a body
    still to come, its own stream counts too (2 active, budget 2) and it is retried; a 503
    whose headers ended it counts nothing (budget 1, spent): 503, flag URX."""
    app = _App(probe_body)
    server = AsgiServer(app, "budget").start()
    mesh = mesh_for(MeshConfig(), loopback_service(HOST, server.port) + POLICY)
    first: list[int] = []

    def call_held() -> None:
        first.append(_get(kind, mesh, "/held"))

    holder = threading.Thread(target=call_held)
    try:
        holder.start()
        wait_until_sync(lambda: app.holding, "the first request's retry held upstream")
        status = _get(kind, mesh, "/probe")
        assert status == (200 if retried else 503)
        assert app.seen["/probe"] == (2 if retried else 1)
    finally:
        app.release.set()
        holder.join(timeout=10)
        mesh.close()
        server.stop()
    assert first == [200]
