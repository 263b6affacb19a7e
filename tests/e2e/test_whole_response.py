"""A response the caller reads whole (not streamed) is read within the try, as Envoy's
timeouts and in-flight counts cover the whole response, for all three meshed clients: the
route timeout bounds a body that trickles, `maxConnections` holds until the body is read,
and a started response is never retried (a body broken off is the caller's error, as behind
a sidecar). A streamed response is left to the caller."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests

import meshlib
import meshlib.clients.httpx as meshed_httpx
import meshlib.clients.requests as meshed_requests
from meshlib.config import MeshConfig
from tests.rawserver import OK, Peer, ThreadServer
from tests.upstream import AsgiServer, loopback_service, mesh_for

HOST = "chunks.default.svc.cluster.local"
URL = "http://chunks:9080"


class Chunks:
    """An upstream: /trickle sends 5 chunks 100 ms apart; /broken (and /broken-on-NAME on
    the upstream NAME) sends one chunk and drops the connection; on the upstream NAME,
    /503-broken-on-NAME answers 503 and drops the connection mid-body and /503-slow-on-NAME
    answers 503 with a body taking 2 s; anything else answers at once. Counts the responses
    it is sending at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = 0
        self.peak = 0
        self.served = 0
        self.ports: set[int] = set()  # the callers' ports: one per connection
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.served += 1
            self.ports.add((scope.get("client") or ("", 0))[1])  # one per connection
            odd = self.served % 2 == 1
        try:
            headers = [(b"x-upstream", self.name.encode())]
            path = scope["path"]
            failing = path.startswith("/503-") and path.endswith(f"-on-{self.name}")
            failing = failing or (path == "/every-other-503" and odd)
            status = 503 if failing else 200
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if failing and path.startswith("/503-broken"):
                path = "/broken"
            elif failing and path.startswith("/503-slow"):  # a 503 whose body takes 2 s
                for _ in range(20):
                    await send({"type": "http.response.body", "body": b"x", "more_body": True})
                    await asyncio.sleep(0.1)
            if path == "/trickle":
                for _ in range(5):
                    await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
                    await asyncio.sleep(0.1)
            elif path == "/broken" or path == f"/broken-on-{self.name}":
                await send({"type": "http.response.body", "body": b"partial", "more_body": True})
                raise RuntimeError("the upstream dies mid-body (uvicorn drops the connection)")
            await send({"type": "http.response.body", "body": b"done"})
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[Chunks, AsgiServer]]]:
    made = {}
    for name in ("a", "b"):
        app = Chunks(name)
        made[name] = (app, AsgiServer(app, f"chunks-{name}").start())
    yield made
    for _, server in made.values():
        server.stop()


def make_mesh(
    servers: dict[str, tuple[Chunks, AsgiServer]], route: str, policy: str = ""
) -> meshlib.Mesh:
    endpoints = ", ".join(
        f"{{address: 127.0.0.1, ports: {{http: {server.port}}}, labels: {{version: {name}}}}}"
        for name, (_, server) in servers.items()
    )
    traffic_policy = f"  trafficPolicy: {{{policy}}}\n" if policy else ""
    text = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: chunks}}
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{endpoints}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: chunks}}
spec:
  host: {HOST}
{traffic_policy}  subsets: [{{name: a, labels: {{version: a}}}}, {{name: b, labels: {{version: b}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: chunks}}
spec:
  hosts: [chunks]
  http:
  - {route}
"""
    for app, _ in servers.values():
        app.peak = app.served = 0
        app.ports = set()
    return mesh_for(MeshConfig(service="productpage"), text)


def call(
    kind: str,
    mesh: meshlib.Mesh,
    path: str,
    n: int = 1,
    *,
    stream: bool = False,
    read_timeout: float = 10.0,
) -> list[Any]:
    """n concurrent GETs through one client of `kind`: (status, body, flags) or the exception."""

    def one_sync(do: Any) -> Any:
        try:
            return do()
        except Exception as exc:  # the caller's error, kept to be checked
            return exc

    if kind == "httpx":
        with meshed_httpx.Client(mesh=mesh, timeout=httpx.Timeout(10, read=read_timeout)) as client:

            def get() -> Any:
                if stream:
                    with client.stream("GET", URL + path) as response:
                        return (
                            response.status_code,
                            response.read(),
                            response.extensions["response_flags"],
                        )
                response = client.get(URL + path)
                return (
                    response.status_code,
                    response.content,
                    response.extensions["response_flags"],
                )

            return _threads(lambda: one_sync(get), n)
    if kind == "requests":
        with meshed_requests.Session(mesh=mesh) as session:

            def get_requests() -> Any:
                response = session.get(URL + path, timeout=(10, read_timeout), stream=stream)
                return (response.status_code, response.content, response.response_flags)  # type: ignore[attr-defined]

            return _threads(lambda: one_sync(get_requests), n)

    async def run() -> list[Any]:
        timeout = httpx.Timeout(10, read=read_timeout)
        async with meshed_httpx.AsyncClient(mesh=mesh, timeout=timeout) as client:

            async def get_async() -> Any:
                try:
                    if stream:
                        async with client.stream("GET", URL + path) as response:
                            body = await response.aread()
                            return (
                                response.status_code,
                                body,
                                response.extensions["response_flags"],
                            )
                    response = await client.get(URL + path)
                    return (
                        response.status_code,
                        response.content,
                        response.extensions["response_flags"],
                    )
                except Exception as exc:
                    return exc

            return list(await asyncio.gather(*(get_async() for _ in range(n))))

    return asyncio.run(run())


def _threads(fn: Any, n: int) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def test_the_route_timeout_covers_the_body(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """A 100 ms route timeout and a body that takes 500 ms after its headers: 504 UT, at the
    timeout, not a 200 half a second later."""
    mesh = make_mesh(
        servers, "route: [{destination: {host: chunks, subset: a}}]\n    timeout: 100ms"
    )
    started = time.monotonic()
    ((status, body, flags),) = call(client_kind, mesh, "/trickle")
    elapsed = time.monotonic() - started
    mesh.close()
    assert (status, flags) == (504, ["UT"]), body
    assert elapsed < 0.45


def test_a_streamed_response_is_left_to_the_caller(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """Streamed, the same response arrives whole: the caller reads the body at its pace."""
    mesh = make_mesh(
        servers, "route: [{destination: {host: chunks, subset: a}}]\n    timeout: 250ms"
    )
    ((status, body, flags),) = call(client_kind, mesh, "/trickle", stream=True)
    mesh.close()
    assert (status, body, flags) == (200, b"x" * 50 + b"done", [])


def test_max_connections_holds_until_the_body_is_read(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """maxConnections 1 and 3 concurrent calls whose bodies take 500 ms: the upstream sends
    one response at a time (a connection is in use until its body is read)."""
    mesh = make_mesh(
        servers,
        "route: [{destination: {host: chunks, subset: a}}]",
        "connectionPool: {tcp: {maxConnections: 1}}",
    )
    results = call(client_kind, mesh, "/trickle", 3)
    mesh.close()
    assert [r[0] for r in results] == [200, 200, 200], results
    assert servers["a"][0].peak == 1


def test_a_started_response_is_never_retried(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """Envoy never retries a response that has started, whatever `retryOn` says: a body
    broken off is the caller's error, and a body that outlasts `perTryTimeout` (Envoy ignores
    the per-try timeout once the response started) is answered — each request sent once."""
    mesh = make_mesh(
        servers,
        "route: [{destination: {host: chunks}}]\n"
        "    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 'reset,5xx'}",
    )
    broken = call(client_kind, mesh, "/broken", 4)
    trickled = call(client_kind, mesh, "/trickle", 2)
    mesh.close()
    errors = (httpx.RemoteProtocolError, httpx.ReadError, requests.exceptions.ChunkedEncodingError)
    assert all(isinstance(outcome, errors) for outcome in broken), broken
    assert trickled == [(200, b"x" * 50 + b"done", [])] * 2
    assert sum(app.served for app, _ in servers.values()) == 6  # none sent twice


def test_the_route_deadline_not_the_callers_timeout_ends_a_slow_body(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """A 250 ms route timeout and a caller's 200 ms read timeout, against a body whose chunks
    come 100 ms apart (no single read waits 200 ms): the route's deadline is what runs out,
    so the answer is 504 UT, not the caller's timeout error."""
    mesh = make_mesh(
        servers, "route: [{destination: {host: chunks, subset: a}}]\n    timeout: 250ms"
    )
    ((outcome),) = call(client_kind, mesh, "/trickle", read_timeout=0.2)
    mesh.close()
    assert not isinstance(outcome, Exception), outcome
    assert (outcome[0], outcome[2]) == (504, ["UT"])


def test_a_body_broken_off_is_the_callers_error_without_retry(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """Not retried, a body broken off raises the client's own error, as when the app behind a
    sidecar sees the response break off (not a made-up 503)."""
    mesh = make_mesh(
        servers, "route: [{destination: {host: chunks, subset: a}}]\n    retries: {attempts: 0}"
    )
    ((outcome),) = call(client_kind, mesh, "/broken")
    mesh.close()
    errors = (httpx.RemoteProtocolError, httpx.ReadError, requests.exceptions.ChunkedEncodingError)
    assert isinstance(outcome, errors), outcome


def test_a_retriable_answer_is_retried_whatever_its_body_does(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """Envoy judges a retry on the response headers: a 503 under `retryOn: 5xx` is retried at
    once, its body left unread — one that breaks off or takes 2 s does not turn the call into
    an error or a timeout (route timeout 1 s); the retry's 200 from the other endpoint wins."""
    mesh = make_mesh(
        servers,
        "route: [{destination: {host: chunks}}]\n    timeout: 1s\n"
        "    retries: {attempts: 2, retryOn: 5xx}",
        "loadBalancer: {simple: ROUND_ROBIN}",
    )
    started = time.monotonic()
    broken = call(client_kind, mesh, "/503-broken-on-a", 4)
    slow = call(client_kind, mesh, "/503-slow-on-a", 2)
    elapsed = time.monotonic() - started
    mesh.close()
    assert broken == [(200, b"done", [])] * 4, broken
    assert slow == [(200, b"done", [])] * 2, slow
    assert elapsed < 2.0  # no call waited for a 503's slow body


def test_a_final_retriable_answer_is_read_within_its_try(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """A 503 that `retryOn: 5xx` covers but that is not retried (no attempts left) is the
    final answer: its body is read within the try, so a body that takes 2 s meets the 500 ms
    route timeout (504 UT), as without a retry policy."""
    mesh = make_mesh(
        servers,
        "route: [{destination: {host: chunks, subset: a}}]\n    timeout: 500ms\n"
        "    retries: {attempts: 1, retryOn: 5xx}",
    )
    started = time.monotonic()
    ((outcome),) = call(client_kind, mesh, "/503-slow-on-a")
    elapsed = time.monotonic() - started
    mesh.close()
    assert not isinstance(outcome, Exception), outcome
    assert (outcome[0], outcome[2]) == (504, ["UT"])
    assert elapsed < 1.2


def test_a_retried_small_answer_keeps_its_connection(
    servers: dict[str, tuple[Chunks, AsgiServer]], client_kind: str
) -> None:
    """A retried 503 with a small body that comes at once is read and dropped, so its
    connection is used again: 10 calls, each retried once, over one or two connections."""
    mesh = make_mesh(
        servers,
        "route: [{destination: {host: chunks, subset: a}}]\n    retries: {attempts: 2, retryOn: 5xx}",
    )
    results = [call(client_kind, mesh, "/every-other-503")[0] for _ in range(10)]
    mesh.close()
    assert results == [(200, b"done", [])] * 10
    assert servers["a"][0].served == 20
    assert len(servers["a"][0].ports) <= 10  # not one connection per try (each call: one client)


def _raw_mesh(port: int, route: str) -> meshlib.Mesh:
    """A mesh whose `chunks` host is the one endpoint 127.0.0.1:`port`, routed by `route`."""
    virtual_service = f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: chunks}}
spec:
  hosts: [chunks]
  http:
  - route: [{{destination: {{host: chunks}}}}]
{route}
"""
    return mesh_for(
        MeshConfig(service="productpage"), loopback_service(HOST, port) + "---\n" + virtual_service
    )


@pytest.mark.parametrize("body", ["crawls", "stalls"])
def test_a_retried_answer_whose_body_crawls_or_stalls_never_holds_up_the_retry_requests(
    body: str,
) -> None:
    """requests: a retried 503 whose 40-byte body crawls (a byte every 20 ms, each read well
    within the read timeout) or stalls after 5 bytes is dropped within about 50 ms and its
    connection closed: the retry goes out at once, on a new connection."""
    sent: list[float] = []

    async def handler(peer: Peer) -> None:
        while True:
            await peer.request()
            sent.append(time.monotonic())
            if len(sent) > 1:
                await peer.send(OK)
                continue
            await peer.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 40\r\n\r\n")
            for _ in range(40 if body == "crawls" else 5):
                await peer.send(b"x")
                await asyncio.sleep(0.02)
            await asyncio.sleep(10)  # (stalls) until the client goes away

    with ThreadServer(handler) as server:
        mesh = _raw_mesh(server.port, "    retries: {attempts: 1, retryOn: 5xx}")
        with meshed_requests.Session(mesh=mesh) as session:
            response = session.get(URL + "/", timeout=(2, 2))
        mesh.close()
        assert (response.status_code, response.content) == (200, b"ok")
        assert sent[1] - sent[0] < 0.6  # the crawling body alone takes 0.8 s
        assert server.connections == 2  # the first one was dropped, not kept half-read


def test_the_route_timeout_ends_a_trickling_body_at_once_requests() -> None:
    """requests: a body announced with Content-Length that trickles a byte every 40 ms (it
    would take 1.6 s) meets the 300 ms route timeout when it passes — 504 UT then, not once
    the body is in: urllib3's read(amt) would wait for all of it."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n")
        for _ in range(40):
            await peer.send(b"x")
            await asyncio.sleep(0.04)

    with ThreadServer(handler) as server:
        mesh = _raw_mesh(server.port, "    timeout: 300ms")
        with meshed_requests.Session(mesh=mesh) as session:
            started = time.monotonic()
            response = session.get(URL + "/", timeout=5)
            elapsed = time.monotonic() - started
        mesh.close()
    assert (response.status_code, response.response_flags) == (504, ["UT"])  # type: ignore[attr-defined]
    assert elapsed < 1.0  # the body alone takes 1.6 s
