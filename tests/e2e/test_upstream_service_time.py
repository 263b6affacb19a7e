"""The access log's `upstream_service_time` (Envoy's `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%`),
from real requests to apps on 127.0.0.1 that hold their response headers back a known time.

Envoy's router sets `x-envoy-upstream-service-time` to the milliseconds from having the whole
request to the response headers of the upstream's final try; a sidecar's own answers (a fault's
abort, no healthy upstream, a failed connect) have none. Each line is read twice, as its TEXT
(or JSON) message and as its fields, which must agree.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from tests.e2e.conftest import Caller, MeshFactory, virtual_service
from tests.upstream import (
    AsgiServer,
    Upstream,
    WsgiServer,
    mesh_for,
    read_body,
    refused_port,
)

DELAY = 0.2  # seconds the apps hold their response headers back
SLACK_MS = 150  # what scheduling on a loaded machine may add to a measured wait
# What an app's wait may fall short by: uvicorn runs on uvloop, whose timers count from the
# time its loop read at the start of the iteration, in whole milliseconds.
EARLY_MS = 5

TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
"""

_loggers = itertools.count()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def capture(mesh: Mesh, encoding: str = "TEXT") -> list[logging.LogRecord]:
    """The records `mesh`'s access log writes from now on, in `encoding`."""
    handler = _Records()
    logger = logging.getLogger(f"tests.service_time.{next(_loggers)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    mesh.access_log.logger = logger
    mesh.access_log.encoding = "JSON" if encoding == "JSON" else "TEXT"
    return handler.records


def service_time(record: logging.LogRecord, encoding: str) -> int | None:
    """A line's `upstream_service_time` in ms (None for `-` / null), as its message says it:
    the TEXT line's eleventh field (after the duration) or the JSON key, a string in both."""
    message = record.getMessage()
    fields: dict[str, Any] = record.meshlib_access  # type: ignore[attr-defined]
    if encoding == "JSON":
        value = json.loads(message)["upstream_service_time"]
    else:
        words = message.split(" ")
        assert words[11] == str(fields["duration"]), message  # the field before it
        value = None if words[12] == "-" else words[12]
    assert value == fields["upstream_service_time"]
    return None if value is None else int(value)


def lines(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The records written, once there is one: an inbound line is written once the server
    has sent the response (a WSGI one once it closed it), after the caller has it."""
    deadline = time.monotonic() + 10
    while not records:
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.01)
    return list(records)


def assert_waited(logged: int | None, seconds: float) -> None:
    """A service time of the `seconds` the apps wait, within EARLY_MS and SLACK_MS."""
    assert logged is not None
    assert seconds * 1000 - EARLY_MS <= logged < seconds * 1000 + SLACK_MS, logged


@pytest.fixture
def slow() -> Iterator[Upstream]:
    """An upstream that waits DELAY before its response headers."""
    with Upstream("slow") as upstream:
        upstream.behaviour.delay = DELAY
        yield upstream


# -- outbound: the meshed clients --------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_outbound_logs_the_wait_for_the_response_headers(
    make_mesh: MeshFactory, slow: Upstream, client_kind: str, encoding: str
) -> None:
    """A meshed call's line says how long the upstream took to answer its headers, as the
    router of a caller's sidecar sets the header the access log reads."""
    mesh = make_mesh(TELEMETRY, endpoints={"v1": slow})
    records = capture(mesh, encoding)
    assert Caller(client_kind, mesh).one().status == 200
    (line,) = lines(records)
    assert_waited(service_time(line, encoding), DELAY)
    assert service_time(line, encoding) <= line.meshlib_access["duration"]  # type: ignore[attr-defined]


def test_outbound_service_time_covers_every_try(
    make_mesh: MeshFactory, slow: Upstream, client_kind: str
) -> None:
    """A retried call's service time runs from the first try to the final answer's headers,
    back-off included: Envoy's router starts the clock once, when it has the request."""
    answers = iter([503, 200])
    slow.behaviour.next_status = answers.__next__  # type: ignore[method-assign]
    retried = "- route: [{destination: {host: reviews}}]\n  retries: {attempts: 1, retryOn: 5xx}\n"
    mesh = make_mesh(TELEMETRY + "---\n" + virtual_service(retried), endpoints={"v1": slow})
    records = capture(mesh)
    result = Caller(client_kind, mesh).one()
    assert result.status == 200 and len(slow.behaviour.requests) == 2
    (line,) = lines(records)
    # Two waits and Envoy's first back-off (at most 25 ms) between them.
    assert_waited(service_time(line, "TEXT"), 2 * DELAY)


def test_a_fault_delay_is_not_upstream_service_time(
    make_mesh: MeshFactory, slow: Upstream, client_kind: str
) -> None:
    """A fault's delay comes before the router (Envoy's fault filter holds the request): it
    is in the duration, not in the service time."""
    fault = "- fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n  route: [{destination: {host: reviews}}]\n"
    mesh = make_mesh(TELEMETRY + "---\n" + virtual_service(fault), endpoints={"v1": slow})
    records = capture(mesh)
    result = Caller(client_kind, mesh).one()
    assert result.status == 200 and result.flags == ["DI"]
    (line,) = lines(records)
    assert_waited(service_time(line, "TEXT"), DELAY)
    assert line.meshlib_access["duration"] >= 500 - EARLY_MS  # type: ignore[attr-defined]


def test_passthrough_service_time_is_its_wait(slow: Upstream, client_kind: str) -> None:
    """A call outside the mesh (PassthroughCluster) goes through Envoy's router too: its
    service time is the call's, up to the response headers."""
    mesh = mesh_for(MeshConfig(service="productpage"), TELEMETRY)
    records = capture(mesh)
    url = f"http://127.0.0.1:{slow.port}/"
    try:
        if client_kind == "requests":
            with meshlib.Session(mesh=mesh) as session:
                assert session.get(url, timeout=5).status_code == 200
        elif client_kind == "httpx":
            with meshlib.Client(mesh=mesh) as client:
                assert client.get(url).status_code == 200
        else:

            async def call() -> int:
                async with meshlib.AsyncClient(mesh=mesh) as client:
                    return (await client.get(url)).status_code

            assert asyncio.run(call()) == 200
    finally:
        mesh.close()
    (line,) = lines(records)
    assert line.meshlib_access["upstream_cluster"] == "PassthroughCluster"  # type: ignore[attr-defined]
    assert_waited(service_time(line, "TEXT"), DELAY)


ABORT = "- fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n  route: [{destination: {host: reviews}}]\n"
EJECT = "outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1m, maxEjectionPercent: 100}\n"


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
@pytest.mark.parametrize("outcome", ["fault abort", "endpoint ejected", "connect failure"])
def test_no_service_time_without_an_upstream_response(
    make_mesh: MeshFactory, client_kind: str, outcome: str, encoding: str
) -> None:
    """meshlib's own answers — a fault's abort (FI), the only endpoint ejected by outlier
    detection, its circuit open (UH), a refused connection (UF) — log `-` (JSON null), as
    Envoy's access log finds no such header on a response its sidecar made."""
    with Upstream("failing") as failing, refused_port() as refused:
        if outcome == "fault abort":
            mesh = make_mesh(
                TELEMETRY + "---\n" + virtual_service(ABORT), endpoints={"v1": failing}
            )
            expected = (418, "FI")
        elif outcome == "endpoint ejected":
            failing.behaviour.status = 503
            mesh = make_mesh(TELEMETRY, endpoints={"v1": failing}, traffic_policy=EJECT)
            assert Caller(client_kind, mesh).one().status == 503  # the upstream's: ejected
            expected = (503, "UH")
        else:
            nobody = SimpleNamespace(port=refused.getsockname()[1])  # refuses connections
            mesh = make_mesh(TELEMETRY, endpoints={"v1": nobody})  # type: ignore[dict-item]
            expected = (503, "UF,URX")  # Istio's default retries tried again
        records = capture(mesh, encoding)
        result = Caller(client_kind, mesh).one()
    assert (result.status, ",".join(result.flags)) == expected
    (line,) = lines(records)
    fields = line.meshlib_access  # type: ignore[attr-defined]
    assert (fields["response_code"], fields["response_flags"]) == expected
    assert service_time(line, encoding) is None


def test_an_upstream_error_has_a_service_time(make_mesh: MeshFactory, slow: Upstream) -> None:
    """An error the upstream answered (its own 503, not retried) came through the router:
    it has a service time, as any upstream response."""
    slow.behaviour.status = 503
    mesh = make_mesh(TELEMETRY, endpoints={"v1": slow})
    records = capture(mesh)
    assert Caller("httpx", mesh).one().status == 503
    (line,) = lines(records)
    assert_waited(service_time(line, "TEXT"), DELAY)


# -- inbound: the middleware -------------------------------------------------------------------


def serving_mesh(encoding: str = "TEXT") -> tuple[Mesh, list[logging.LogRecord]]:
    mesh = mesh_for(MeshConfig(service="ratings", metrics_port=None), TELEMETRY)
    return mesh, capture(mesh, encoding)


async def slow_asgi(scope: Any, receive: Any, send: Any) -> None:
    """Waits DELAY, then answers."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    await asyncio.sleep(DELAY)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def slow_body_asgi(scope: Any, receive: Any, send: Any) -> None:
    """Answers its headers at once, then takes DELAY over its body."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"o", "more_body": True})
    await asyncio.sleep(DELAY)
    await send({"type": "http.response.body", "body": b"k"})


async def failing_asgi(scope: Any, receive: Any, send: Any) -> None:
    """Waits DELAY, then raises: the server answers 500 for it."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    await asyncio.sleep(DELAY)
    raise RuntimeError("the app failed")


async def abandoned_asgi(scope: Any, receive: Any, send: Any) -> None:
    """Answers nothing until its caller has gone."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    assert (await receive())["type"] == "http.disconnect"


def serve_asgi(app: Any, mesh: Mesh, **kwargs: Any) -> httpx.Response | None:
    server = AsgiServer(meshlib.MeshMiddleware(app, mesh=mesh)).start()
    try:
        return httpx.get(f"http://127.0.0.1:{server.port}/ratings/1", **kwargs)
    except httpx.ReadTimeout:
        return None
    finally:
        server.stop()


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_inbound_asgi_logs_the_apps_wait_for_its_headers(encoding: str) -> None:
    """A served request's line says how long the app took to start its response (what a
    workload's inbound sidecar measures of its app)."""
    mesh, records = serving_mesh(encoding)
    with mesh:
        response = serve_asgi(slow_asgi, mesh)
        assert response is not None and response.status_code == 200
        (line,) = lines(records)
    assert_waited(service_time(line, encoding), DELAY)


def test_inbound_service_time_ends_with_the_headers_not_the_body() -> None:
    """An app that answers its headers at once and its body later: a short service time, a
    long duration."""
    mesh, records = serving_mesh()
    with mesh:
        response = serve_asgi(slow_body_asgi, mesh)
        assert response is not None and response.text == "ok"
        (line,) = lines(records)
    logged = service_time(line, "TEXT")
    assert logged is not None and logged < DELAY * 1000
    assert line.meshlib_access["duration"] >= DELAY * 1000 - EARLY_MS  # type: ignore[attr-defined]


def test_inbound_app_that_raises_has_the_servers_500_timed() -> None:
    """An app that raises before answering: the server answers 500 for it as it fails, which
    its sidecar takes for the upstream's answer: timed to then."""
    mesh, records = serving_mesh()
    with mesh:
        response = serve_asgi(failing_asgi, mesh)
        assert response is not None and response.status_code == 500
        (line,) = lines(records)
    assert line.meshlib_access["response_code"] == 500  # type: ignore[attr-defined]
    assert_waited(service_time(line, "TEXT"), DELAY)


def test_inbound_caller_gone_before_an_answer_has_none() -> None:
    """A caller that leaves before the app answered (DC, code 0): no response, no service
    time."""
    mesh, records = serving_mesh("JSON")
    with mesh:
        assert serve_asgi(abandoned_asgi, mesh, timeout=DELAY) is None
        (line,) = lines(records)
    fields = line.meshlib_access  # type: ignore[attr-defined]
    assert (fields["response_code"], fields["response_flags"]) == (0, "DC")
    assert service_time(line, "JSON") is None


def slow_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    time.sleep(DELAY)
    start_response("200 OK", [("content-length", "2")])
    return [b"ok"]


def slow_first_chunk_wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """Calls start_response at once, then takes DELAY over its first chunk: WSGI servers send
    the headers with it."""
    start_response("200 OK", [])
    time.sleep(DELAY)
    yield b"ok"


@pytest.mark.parametrize(
    ("app", "encoding"),
    [
        pytest.param(slow_wsgi, "TEXT", id="text"),
        pytest.param(slow_wsgi, "JSON", id="json"),
        pytest.param(slow_first_chunk_wsgi, "TEXT", id="first-chunk"),
    ],
)
def test_inbound_wsgi_logs_the_wait_until_the_headers_go(app: Any, encoding: str) -> None:
    """Under WSGI the headers go with the first chunk (or `write()`), whenever the app called
    start_response: the service time ends there."""
    mesh, records = serving_mesh(encoding)
    with mesh, WsgiServer(meshlib.MeshWSGIMiddleware(app, mesh=mesh)) as server:
        response = httpx.get(f"http://127.0.0.1:{server.port}/ratings/1")
        assert response.status_code == 200 and response.text == "ok"
        (line,) = lines(records)
    assert_waited(service_time(line, encoding), DELAY)
