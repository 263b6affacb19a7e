"""Paths travel as sent: routing, rewrites and mirrors read and write the request's raw,
percent-encoded path, as Envoy treats `:path` (a `%2F` is not a `/`, a `%3F` not a `?`).
Both clients, real uvicorn recorded that record the target they were sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.config import MeshConfig
from tests.upstream import AsgiServer, loopback_service, mesh_for


class Recording:
    """An upstream that answers 200 and records each request's raw path and query."""

    def __init__(self, name: str) -> None:
        self.seen: list[tuple[bytes, dict[bytes, bytes]]] = []
        lock = threading.Lock()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            query = scope["query_string"]
            target = scope["raw_path"] + (b"?" + query if query else b"")
            with lock:
                self.seen.append((target, dict(scope["headers"])))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        self.server = AsgiServer(app, name).start()


ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /files/a%2F}}]
    headers: {response: {set: {x-route: encoded}}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /api/v1/}}]
    rewrite: {uri: /}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /mirrored/}}]
    route: [{destination: {host: reviews}}]
    mirror: {host: shadow}
  - route: [{destination: {host: reviews}}]
"""


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[Recording, Recording, meshlib.Mesh]]:
    primary, shadow = Recording("reviews"), Recording("shadow")
    policy = "---\n".join(
        [
            loopback_service("reviews.default.svc.cluster.local", primary.server.port),
            loopback_service("shadow.default.svc.cluster.local", shadow.server.port),
            ROUTES,
        ]
    )
    mesh = mesh_for(MeshConfig(service="productpage", metrics_port=None), policy)
    yield primary, shadow, mesh
    mesh.close()
    primary.server.stop()
    shadow.server.stop()


def clients(mesh: meshlib.Mesh) -> list[tuple[str, Any]]:
    return [("httpx", meshlib.Client(mesh=mesh)), ("requests", meshlib.Session(mesh=mesh))]


@pytest.mark.parametrize("which", ["httpx", "requests"])
def test_routes_match_the_encoded_path(
    recorded: tuple[Recording, Recording, meshlib.Mesh], which: str
) -> None:
    """`prefix: /files/a%2F` matches `/files/a%2Fb`, and not `/files/a/b`."""
    _, _, mesh = recorded
    client = dict(clients(mesh))[which]
    with client:
        assert client.get("http://reviews:9080/files/a%2Fb").headers.get("x-route") == "encoded"
        assert client.get("http://reviews:9080/files/a/b").headers.get("x-route") is None


@pytest.mark.parametrize("which", ["httpx", "requests"])
@pytest.mark.parametrize(
    ("path", "upstream", "original"),
    [
        ("/api/v1/files/a%2Fb?x=1", b"/files/a%2Fb?x=1", b"/api/v1/files/a%2Fb?x=1"),
        ("/api/v1/q%3Fx", b"/q%3Fx", b"/api/v1/q%3Fx"),
        ("/api/v1/a%20b", b"/a%20b", b"/api/v1/a%20b"),
    ],
)
def test_a_rewrite_keeps_the_encoding(
    recorded: tuple[Recording, Recording, meshlib.Mesh],
    which: str,
    path: str,
    upstream: bytes,
    original: bytes,
) -> None:
    """The prefix is replaced on the raw path; the rest goes on as sent, and
    `x-envoy-original-path` holds the raw original, query included."""
    primary, _, mesh = recorded
    client = dict(clients(mesh))[which]
    with client:
        assert client.get("http://reviews:9080" + path).status_code == 200
    target, headers = primary.seen[-1]
    assert target == upstream
    assert headers[b"x-envoy-original-path"] == original


@pytest.mark.parametrize("which", ["httpx", "requests"])
def test_a_mirror_gets_the_path_as_sent(
    recorded: tuple[Recording, Recording, meshlib.Mesh], which: str
) -> None:
    """The shadow gets the same target as the primary; a `%3F` in the path no longer makes
    the copy (and so the call) fail."""
    primary, shadow, mesh = recorded
    client = dict(clients(mesh))[which]
    path = f"/mirrored/{which}/what%3F/a%2Fb"
    with client:
        assert client.get("http://reviews:9080" + path).status_code == 200
    deadline = time.monotonic() + 5
    while not any(target == path.encode() for target, _ in shadow.seen):
        assert time.monotonic() < deadline, shadow.seen
        time.sleep(0.01)
    assert primary.seen[-1][0] == path.encode()
