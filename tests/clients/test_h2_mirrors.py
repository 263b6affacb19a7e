"""Mirrored copies from clients that speak HTTP/2: `meshlib.AsyncClient(http2=True)`, a stock
`httpx.AsyncClient(http2=True)` under `instrument()`, and `meshlib.Client(http2=True)`, over
TLS (h2 chosen by ALPN) and over cleartext with prior knowledge (`http1=False`). The calls and
their copies reach real hypercorn servers, which record what arrived and over which HTTP
version.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from tests.rawserver import run, wait_until_sync
from tests.upstream import HypercornServer, loopback_service, mesh_for, read_body

pytest.importorskip("h2")

HOST = "api.default.svc.cluster.local"
SHADOW = "shadow.default.svc.cluster.local"


@dataclass
class Recorder:
    """An ASGI app answering 200 "ok" and recording each request it received."""

    received: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.received.append(
            {
                "http_version": scope["http_version"],
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"],
                "headers": [(k.decode(), v.decode()) for k, v in scope["headers"]],
                "body": body,
            }
        )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certfile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The servers' key and certificate, for 127.0.0.1 (the endpoints' address)."""
    path = Path(tmp_path_factory.mktemp("tls")) / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@dataclass
class Servers:
    api: Recorder
    shadow: Recorder
    mesh: Mesh
    scheme: str


@pytest.fixture(params=["tls-alpn", "prior-knowledge"])
def servers(request: pytest.FixtureRequest, certfile: str) -> Iterator[Servers]:
    """The route's server and its mirror's, over TLS or cleartext, and a mesh mirroring every
    call to `api` to `shadow`."""
    tls = request.param == "tls-alpn"
    api, shadow = Recorder(), Recorder()
    started = [
        HypercornServer(app, name, certfile=certfile if tls else None).start()
        for app, name in ((api, "api"), (shadow, "shadow"))
    ]
    policy = (
        loopback_service(HOST, started[0].port)
        + "---\n"
        + loopback_service(SHADOW, started[1].port)
        + "---\n"
        + "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        + f"metadata: {{name: api}}\nspec:\n  hosts: [{HOST}]\n  http:\n"
        + f"  - route: [{{destination: {{host: {HOST}}}}}]\n"
        + f"    mirror: {{host: {SHADOW}}}\n"
    )
    mesh = mesh_for(MeshConfig(service="client"), policy)
    try:
        yield Servers(api, shadow, mesh, "https" if tls else "http")
    finally:
        mesh.close()
        for server in started:
            server.stop()


def _options(servers: Servers, ca: trustme.CA) -> dict[str, Any]:
    """An HTTP/2 client's options: over TLS it offers h2 and HTTP/1.1 (ALPN picks h2); over
    cleartext it speaks only HTTP/2 (prior knowledge)."""
    options: dict[str, Any] = {"http2": True, "timeout": 5.0}
    if servers.scheme == "https":
        context = ssl.create_default_context()
        ca.configure_trust(context)
        options["verify"] = context
    else:
        options["http1"] = False
    return options


def _post(client: Any, url: str) -> Any:
    return client.post(url, content=b"a body", headers={"x-app": "yes", "content-type": "text/x"})


def _calls(how: str, servers: Servers, ca: trustme.CA, url: str) -> list[httpx.Response]:
    """Two POSTs through an HTTP/2 client, each copy waited for: meshlib's `AsyncClient` or
    `Client`, or a stock `httpx.AsyncClient` under `instrument()`."""
    options = _options(servers, ca)

    def copies(count: int) -> None:
        wait_until_sync(lambda: len(servers.shadow.received) >= count, f"copy {count}")

    responses: list[httpx.Response] = []
    if how == "meshlib-sync":
        with meshlib.Client(mesh=servers.mesh, **options) as client:
            for count in (1, 2):
                responses.append(_post(client, url))
                copies(count)
        return responses

    async def main() -> None:
        if how == "instrument":
            meshlib.instrument(servers.mesh)
        try:
            client = (
                meshlib.AsyncClient(mesh=servers.mesh, **options)
                if how == "meshlib"
                else httpx.AsyncClient(**options)
            )
            async with client:
                for count in (1, 2):
                    responses.append(await _post(client, url))
                    await asyncio.to_thread(copies, count)
        finally:
            meshlib.uninstrument()

    run(main)
    return responses


@pytest.mark.parametrize("how", ["meshlib", "instrument", "meshlib-sync"])
def test_an_http2_clients_copies_reach_the_mirror_whole(
    servers: Servers, ca: trustme.CA, how: str
) -> None:
    """POSTs from an HTTP/2 client are answered over HTTP/2, and their mirrored copies
    arrive at the mirror well formed — same method, path, query, the app's headers and
    body, the call's request id — over HTTP/2 too: the copies' own pool speaks what the
    client's does. (Async clients sent them through meshlib's HTTP/1.1 pool: HTTP/1.1 to a
    prior-knowledge mirror; over TLS, on the context it shares with httpx's pool, whose ALPN
    httpcore sets to offer h2: HTTP/1.1 if the copy's connection opened first, else a
    ConnectError when the server chose h2, the copy lost.)"""
    url = f"{servers.scheme}://{HOST}:9080/orders/7?full=1"
    responses = _calls(how, servers, ca, url)
    assert [(r.status_code, r.http_version, r.text) for r in responses] == [
        (200, "HTTP/2", "ok")
    ] * 2
    assert len(servers.api.received) == 2
    for call, copy in zip(servers.api.received, servers.shadow.received, strict=True):
        assert (copy["http_version"], copy["method"], copy["path"], copy["query"]) == (
            "2",
            "POST",
            "/orders/7",
            b"full=1",
        )
        assert copy["body"] == b"a body"
        headers = dict(copy["headers"])
        assert (headers["x-app"], headers["content-type"], headers["content-length"]) == (
            "yes",
            "text/x",
            "6",
        )
        assert headers["x-request-id"] == dict(call["headers"])["x-request-id"]
