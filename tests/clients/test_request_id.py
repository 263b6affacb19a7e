"""The `x-request-id` of an httpx call whose app set none: meshlib makes one per call, as
Envoy does at the first hop, and sends it on the wire without writing it into the caller's
`httpx.Request` — so a Request the app sends twice is two calls with an id each, and the app's
object keeps the headers the app gave it. The id that went out is in the access log, on the
CLIENT span and in `response.extensions["request_id"]`, where response hooks read it.

One uvicorn server on loopback answers with the `x-request-id` values it received (all of
them, so a duplicate would show), reached as a mesh host and as a passthrough one
(127.0.0.1, a host the mesh does not know).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from meshlib.telemetry.tracing import MeshSampler, build_tracer_provider
from tests.upstream import AsgiServer, loopback_service, mesh_for

HOST = "api.default.svc.cluster.local"
TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
  tracing:
  - randomSamplingPercentage: 100
    customTags: {rid: {header: {name: x-request-id}}}
---
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Held:
    """/held answers its headers and a first chunk, then the rest once `release` is set (or
    after 10 s), and sets `finished` when it has."""

    release = threading.Event()
    finished = threading.Event()


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers `{"ids": [...]}`, the request's `x-request-id` values; /redirect: a 302 to
    /echo, /redirect-held to /held, /redirect-digest to /digest-held, which answers a Digest
    challenge, then (authorized) as /held; /held: see `Held`."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    authorized = any(name == b"authorization" for name, _ in scope["headers"])
    if scope["path"] == "/held" or (scope["path"] == "/digest-held" and authorized):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first,", "more_body": True})
        await asyncio.to_thread(Held.release.wait, 10)
        await send({"type": "http.response.body", "body": b"rest"})
        Held.finished.set()
        return
    ids = [value.decode() for name, value in scope["headers"] if name == b"x-request-id"]
    body = json.dumps({"ids": ids}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    status = 200
    if scope["path"] in ("/redirect", "/redirect-held"):
        status = 302
        headers.append((b"location", b"/echo" if scope["path"] == "/redirect" else b"/held"))
    elif scope["path"] == "/redirect-digest":
        status = 302
        headers.append((b"location", b"/digest-held"))
    elif scope["path"] == "/digest-held":  # not authorized: a Digest challenge
        status = 401
        headers.append((b"www-authenticate", b'Digest realm="api", nonce="abc", qop="auth"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = AsgiServer(echo, "echo").start()
    yield server.port
    server.stop()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def mesh(port: int, exporter: InMemorySpanExporter) -> Iterator[Mesh]:
    config = MeshConfig(service="me", namespace="default")
    provider = build_tracer_provider(config, exporter, sampler=MeshSampler(100.0), batch=False)
    mesh = mesh_for(config, TELEMETRY + loopback_service(HOST, port), tracer_provider=provider)
    yield mesh
    mesh.close()
    provider.shutdown()


def url(port: int, target: str, path: str = "/echo") -> str:
    """The echo server as the mesh host `api`, or as a passthrough host."""
    return f"http://api:9080{path}" if target == "mesh" else f"http://127.0.0.1:{port}{path}"


def ids(response: httpx.Response) -> list[str]:
    """The `x-request-id` values the server received."""
    return list(json.loads(response.content)["ids"])


def send_twice(mesh: Mesh, kind: str, request_url: str) -> tuple[Any, ...]:
    """The caller's Request, sent twice through one meshlib client: (request, its headers and
    extensions as built, first response, second response)."""

    def built(client: httpx.Client | httpx.AsyncClient) -> tuple[httpx.Request, Any, Any]:
        request = client.build_request("GET", request_url)
        return request, request.headers.multi_items(), dict(request.extensions)

    if kind == "sync":
        with meshlib.Client(mesh=mesh) as client:
            request, headers, extensions = built(client)
            return request, headers, extensions, client.send(request), client.send(request)

    async def run() -> tuple[Any, ...]:
        async with meshlib.AsyncClient(mesh=mesh) as client:
            request, headers, extensions = built(client)
            first = await client.send(request)
            return request, headers, extensions, first, await client.send(request)

    return asyncio.run(run())


@pytest.mark.parametrize("target", ["mesh", "passthrough"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_request_sent_twice_is_two_calls_with_an_id_each(
    mesh: Mesh, port: int, kind: str, target: str
) -> None:
    """`client.send(request)` twice (an app's own retry loop does it) is two calls, each with
    an id of its own, as two requests through a sidecar are; the caller's Request keeps the
    headers and extensions it had, and each response's `request` is that Request, as in httpx, with the id that went out in
    `response.extensions["request_id"]`."""
    request, headers, extensions, first, second = send_twice(mesh, kind, url(port, target))
    (one,), (two,) = ids(first), ids(second)
    assert one != two and len(one) == len(two) == 36  # UUIDv4s, as Envoy makes
    assert "x-request-id" not in request.headers
    assert request.headers.multi_items() == headers
    assert request.extensions == extensions
    assert first.request is request and second.request is request
    assert [first.extensions["request_id"], second.extensions["request_id"]] == [one, two]


@pytest.mark.parametrize("target", ["mesh", "passthrough"])
def test_the_callers_request_is_left_as_it_was(mesh: Mesh, port: int, target: str) -> None:
    """After a call, the caller's Request has the headers and timeouts it had before: no
    `x-request-id`, no trace header, and, under a served request's deadline, its own timeouts
    (a passthrough call's are cut to the deadline on the request meshlib sends, not on the
    app's)."""
    inbound = {"x-envoy-expected-rq-timeout-ms": ["10000"], "traceparent": [TRACEPARENT]}
    with meshlib.Client(mesh=mesh) as client:
        request = client.build_request("GET", url(port, target), timeout=30.0)
        headers = request.headers.multi_items()
        timeout = dict(request.extensions["timeout"])
        with mesh.propagator.activated(mesh.propagator.extract(inbound.get)):
            response = client.send(request)
    assert len(ids(response)) == 1
    assert request.headers.multi_items() == headers
    assert request.extensions["timeout"] == timeout == dict.fromkeys(timeout, 30.0)


def read_whole_then_streamed(mesh: Mesh, request_url: str) -> tuple[bool, bytes]:
    """One Request sent by `meshlib.Client` (read whole), then with `stream=True` by a stock
    client over a `MeshTransport`: (whether the second was answered before the server sent
    the rest of its body, that body)."""
    transport = meshlib.MeshTransport(httpx.HTTPTransport(), mesh=mesh)
    with meshlib.Client(mesh=mesh) as meshed, httpx.Client(transport=transport) as stock:
        request = meshed.build_request("GET", request_url)
        Held.release.set()  # the first call gets its whole body at once
        assert meshed.send(request).content == b"first,rest"
        assert Held.finished.wait(10)
        Held.release.clear()
        Held.finished.clear()
        streamed = stock.send(request, stream=True)
        early = not Held.finished.is_set()
        Held.release.set()
        try:
            return early, streamed.read()
        finally:
            streamed.close()


async def aread_whole_then_streamed(mesh: Mesh, request_url: str) -> tuple[bool, bytes]:
    """`read_whole_then_streamed` with the async clients."""
    transport = meshlib.AsyncMeshTransport(httpx.AsyncHTTPTransport(), mesh=mesh)
    async with (
        meshlib.AsyncClient(mesh=mesh) as meshed,
        httpx.AsyncClient(transport=transport) as stock,
    ):
        request = meshed.build_request("GET", request_url)
        Held.release.set()
        assert (await meshed.send(request)).content == b"first,rest"
        assert await asyncio.to_thread(Held.finished.wait, 10)
        Held.release.clear()
        Held.finished.clear()
        streamed = await stock.send(request, stream=True)
        early = not Held.finished.is_set()
        Held.release.set()
        try:
            return early, await streamed.aread()
        finally:
            await streamed.aclose()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_request_read_whole_by_one_client_can_be_streamed_by_another(
    mesh: Mesh, port: int, kind: str
) -> None:
    """meshlib's clients have their transport read a body within the try without marking the
    caller's Request: the same Request, read whole by meshlib's client, then sent with
    `stream=True` through a stock client over a mesh transport, is answered at its headers,
    before the server sends the rest of the body (it was read whole, 10 s late, when the
    first client left its mark on the Request)."""
    Held.finished.clear()
    request_url = url(port, "mesh", "/held")
    if kind == "sync":
        early, body = read_whole_then_streamed(mesh, request_url)
    else:
        early, body = asyncio.run(aread_whole_then_streamed(mesh, request_url))
    assert early and body == b"first,rest"


TIMEOUT_ROUTE = f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}}}}}]
    timeout: 0.5s
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("path", "auth_kind", "statuses"),
    [
        pytest.param("/redirect-held", None, [302, 504], id="redirect"),
        pytest.param("/redirect-digest", "digest", [401, 302, 504], id="redirect-digest"),
    ],
)
def test_every_hop_of_a_redirect_is_read_within_its_try(
    port: int, kind: str, path: str, auth_kind: str | None, statuses: list[int]
) -> None:
    """A call read whole is read within the try on every hop a redirect makes, not on the
    first alone (httpx builds each hop's request anew, with a copy of its extensions), also
    after an auth flow sent the first request again: the final hop's body, held back by the
    server, is cut by the route's 0.5 s timeout, a 504, as Envoy's timeout covers the body
    (read after the try, it arrived whole 10 s later)."""
    # A DigestAuth of its own: one that met the challenge answers it before the next 401.
    auth = httpx.DigestAuth("u", "p") if auth_kind == "digest" else None
    Held.release.clear()
    config = MeshConfig(service="me", namespace="default")
    mesh = mesh_for(config, TIMEOUT_ROUTE + "---\n" + loopback_service(HOST, port))
    target = url(port, "mesh", path)
    started = time.monotonic()
    try:
        if kind == "sync":
            with meshlib.Client(mesh=mesh, follow_redirects=True) as client:
                response = client.get(target, auth=auth)
        else:

            async def call() -> httpx.Response:
                async with meshlib.AsyncClient(mesh=mesh, follow_redirects=True) as client:
                    return await client.get(target, auth=auth)

            response = asyncio.run(call())
    finally:
        Held.release.set()
        mesh.close()
    assert [r.status_code for r in (*response.history, response)] == statuses
    assert time.monotonic() - started < 5


def test_a_task_started_during_a_send_does_not_keep_its_mark(mesh: Mesh, port: int) -> None:
    """A task an event hook starts during a send keeps that send's context after it: the
    same Request sent later from that task with `stream=True`, through another client, is
    answered at its headers, not read whole within the try as the first send's was."""
    request_url = url(port, "mesh", "/held")

    async def run() -> bool:
        sent = asyncio.Event()
        later: list[asyncio.Task[bool]] = []

        async def send_again(request: httpx.Request) -> bool:
            await sent.wait()  # after the first send returned
            async with meshlib.AsyncClient(mesh=mesh) as other:
                Held.release.clear()
                Held.finished.clear()
                streamed = await other.send(request, stream=True)
                early = not Held.finished.is_set()
                Held.release.set()
                await streamed.aread()
                await streamed.aclose()
                return early

        async def hook(request: httpx.Request) -> None:
            if not later:
                later.append(asyncio.create_task(send_again(request)))

        Held.release.set()
        async with meshlib.AsyncClient(mesh=mesh, event_hooks={"request": [hook]}) as client:
            request = client.build_request("GET", request_url)
            assert (await client.send(request)).content == b"first,rest"
        sent.set()
        return await later[0]

    assert asyncio.run(run())


@pytest.mark.parametrize("target", ["mesh", "passthrough"])
def test_an_id_the_app_set_is_sent_unchanged(mesh: Mesh, port: int, target: str) -> None:
    """An `x-request-id` the app set goes out as it is, once, and is the call's id."""
    with meshlib.Client(mesh=mesh) as client:
        response = client.get(url(port, target), headers={"X-Request-Id": "app-chosen-7"})
    assert ids(response) == ["app-chosen-7"]
    assert response.extensions["request_id"] == "app-chosen-7"
    assert response.request.headers["x-request-id"] == "app-chosen-7"


def test_within_a_served_request_every_call_carries_its_id(mesh: Mesh, port: int) -> None:
    """Calls made while serving a request carry that request's id, as Envoy passes it on:
    the same Request sent twice too, and every hop of a redirect."""
    inbound = {"x-request-id": ["served-42"]}
    with (
        meshlib.Client(mesh=mesh, follow_redirects=True) as client,
        mesh.propagator.activated(mesh.propagator.extract(inbound.get)),
    ):
        request = client.build_request("GET", url(port, "mesh"))
        sent = [client.send(request), client.send(request)]
        redirected = client.get(url(port, "mesh", "/redirect"))
    assert [ids(response) for response in sent] == [["served-42"]] * 2
    assert [r.extensions["request_id"] for r in (*redirected.history, redirected)] == [
        "served-42"
    ] * 2
    assert "x-request-id" not in request.headers


def test_each_hop_of_a_redirect_is_a_call_of_its_own(mesh: Mesh, port: int) -> None:
    """A redirect the client follows is a new request, with an id of its own, as behind a
    sidecar (httpx builds it from the caller's Request, which carries no id of meshlib's)."""
    with meshlib.Client(mesh=mesh, follow_redirects=True) as client:
        response = client.get(url(port, "mesh", "/redirect"))
    (hop,) = response.history
    assert response.status_code == 200 and hop.status_code == 302
    (first,), (second,) = ids(hop), ids(response)
    assert first != second
    assert [hop.extensions["request_id"], response.extensions["request_id"]] == [first, second]


def test_hooks_the_access_log_and_the_span_see_the_id_that_went_out(
    mesh: Mesh, port: int, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """The id meshlib made is the one the access log line names, the CLIENT span's
    `customTags` header tag reads, and a response hook finds in `response.extensions`; the
    request a hook sees is the app's (`response.request`), without it."""
    hooked: list[tuple[str, str | None]] = []

    def hook(response: httpx.Response) -> None:
        request_id = response.request.headers.get("x-request-id")
        hooked.append((response.extensions["request_id"], request_id))

    caplog.set_level(logging.INFO, logger="meshlib.access")
    with meshlib.Client(mesh=mesh, event_hooks={"response": [hook]}) as client:
        (sent,) = ids(client.get(url(port, "mesh")))
    assert hooked == [(sent, None)]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "meshlib.access"]
    assert line.split('"')[9] == sent
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert (span.attributes or {}).get("rid") == sent
