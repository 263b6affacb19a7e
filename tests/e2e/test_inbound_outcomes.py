"""What the middleware records is what the caller got: real uvicorn servers and real sockets.

A HEAD answer carries no body whatever the app wrote, and a caller that goes away before the
response is complete is recorded as Envoy records it (the status sent by then, flag DC) — in
the metrics, the access log and the SERVER span alike.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import meshlib
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry.metrics import render
from meshlib.telemetry.tracing import MeshSampler, build_tracer_provider
from tests.upstream import AsgiServer

TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
  tracing: [{randomSamplingPercentage: 100}]
"""


class Served:
    """One ASGI app behind MeshMiddleware on uvicorn: its metrics, access log and spans."""

    def __init__(self, app: Any, caplog: pytest.LogCaptureFixture) -> None:
        config = MeshConfig(service="ratings", metrics_port=None)
        self.exporter = InMemorySpanExporter()
        self.provider = build_tracer_provider(
            config, self.exporter, sampler=MeshSampler(100.0), batch=False
        )
        self.mesh = meshlib.Mesh(
            config,
            policy=Snapshot.build(load_text(TELEMETRY).resources, config),
            tracer_provider=self.provider,
            watch=False,
        )
        self.caplog = caplog
        caplog.set_level(logging.INFO, logger="meshlib.access")
        self.server = AsgiServer(meshlib.MeshMiddleware(app, mesh=self.mesh), "ratings").start()
        self.url = f"http://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.stop()
        self.mesh.close()
        self.provider.shutdown()

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        text = render(self.mesh.registry).decode()
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def counted(self) -> list[tuple[str, str, float]]:
        """(response_code, response_flags, count) of istio_requests_total."""
        return [
            (labels["response_code"], labels["response_flags"], value)
            for labels, value in self.samples("istio_requests_total")
        ]

    def logged(self) -> list[dict[str, Any]]:
        return [
            r.meshlib_access  # type: ignore[attr-defined]
            for r in self.caplog.records
            if r.name == "meshlib.access"
        ]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def wait(self, n: int) -> None:
        """Until `n` requests are recorded: the middleware records after the response."""
        deadline = time.monotonic() + 10
        while sum(count for _, _, count in self.counted()) < n or len(self.spans()) < n:
            assert time.monotonic() < deadline, self.counted()
            time.sleep(0.01)


@pytest.fixture
def serve(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[Any], Served]]:
    started: list[Served] = []

    def start(app: Any) -> Served:
        served = Served(app, caplog)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


def test_a_head_answer_counts_no_body(serve: Callable[[Any], Served]) -> None:
    """Starlette writes the body of its GET route for HEAD too; uvicorn sends none, and
    neither istio_response_bytes nor the access log's bytes_sent count it."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def page(request: Any) -> PlainTextResponse:
        return PlainTextResponse("x" * 1000)

    served = serve(Starlette(routes=[Route("/page", page)]))
    head = httpx.head(served.url + "/page")
    get = httpx.get(served.url + "/page")
    assert (head.status_code, head.content, len(get.content)) == (200, b"", 1000)
    served.wait(2)
    ((labels, total),) = served.samples("istio_response_bytes_sum")
    assert (labels["reporter"], labels["response_code"], total) == ("destination", "200", 1000.0)
    (empty,) = [
        v for labels, v in served.samples("istio_response_bytes_bucket") if labels["le"] == "0.5"
    ]
    assert empty == 1  # the HEAD answer
    assert sorted((e["method"], e["bytes_sent"]) for e in served.logged()) == [
        ("GET", 1000),
        ("HEAD", 0),
    ]


def _request_then_hang_up(port: int, read_first: bool = False) -> None:
    """Send a GET on a raw socket and close it before the answer is complete."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /ratings/1?u=a HTTP/1.1\r\nHost: ratings\r\n\r\n")
        if read_first:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.1)


def test_a_caller_gone_before_any_answer_is_dc_with_code_0(
    serve: Callable[[Any], Served],
) -> None:
    """The app is handed http.disconnect before it answered: whatever it sends after is
    lost, and the request is recorded with code 0 and flag DC (metric, access log, span)."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan
        await receive()  # the (empty) request body
        seen.append((await receive())["type"])  # waits for the caller to go away
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    served = serve(app)
    _request_then_hang_up(served.server.port)
    served.wait(1)
    assert seen == ["http.disconnect"]
    assert served.counted() == [("0", "DC", 1.0)]
    ((entry),) = served.logged()
    assert (entry["response_code"], entry["response_flags"], entry["bytes_sent"]) == (0, "DC", 0)
    (span,) = served.spans()
    attributes = dict(span.attributes or {})
    assert "http.response.status_code" not in attributes  # nothing was sent: no status
    assert attributes["meshlib.response_flags"] == "DC"


def test_a_caller_gone_mid_stream_is_dc_with_the_status_sent(
    serve: Callable[[Any], Served],
) -> None:
    """A streamed answer the caller left halfway: the status and bytes sent by then, DC."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.body", "body": b"never read"})

    served = serve(app)
    _request_then_hang_up(served.server.port, read_first=True)
    served.wait(1)
    assert served.counted() == [("200", "DC", 1.0)]
    ((entry),) = served.logged()
    assert (entry["response_code"], entry["response_flags"], entry["bytes_sent"]) == (200, "DC", 7)
    (span,) = served.spans()
    assert (span.attributes or {})["http.response.status_code"] == 200


def test_a_disconnect_after_the_answer_is_not_dc(serve: Callable[[Any], Served]) -> None:
    """uvicorn hands http.disconnect to a receive() after the response is complete (what
    Starlette's disconnect listeners see): the request succeeded, and is counted so."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        seen.append((await asyncio.wait_for(receive(), 5))["type"])

    served = serve(app)
    assert httpx.get(served.url + "/ratings/1").status_code == 200
    served.wait(1)
    assert seen == ["http.disconnect"]
    assert served.counted() == [("200", "-", 1.0)]
    assert [(e["response_code"], e["response_flags"]) for e in served.logged()] == [(200, "-")]


@pytest.mark.parametrize("headers_as", [list, iter], ids=["list", "iterator"])
def test_a_caller_that_has_the_whole_answer_is_not_dc(
    serve: Callable[[Any], Served], headers_as: Callable[[Any], Any]
) -> None:
    """A caller may close as soon as it has the whole response, before the app says it
    ended: after all the Content-Length bytes, or after the headers of a HEAD answer (uvicorn
    sends no body for it). Envoy's codec ends the stream on the same terms: not DC. The
    response headers may be any iterable (ASGI): the server consuming an iterator does not
    hide the Content-Length from the middleware."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan
        await receive()
        headers = headers_as([(b"content-length", b"10")])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
        while (await receive())["type"] != "http.disconnect":  # the caller closes first
            pass
        await send({"type": "http.response.body", "body": b""})

    served = serve(app)
    for method in (b"GET", b"HEAD"):
        with socket.create_connection(("127.0.0.1", served.server.port)) as sock:
            sock.sendall(method + b" /sized HTTP/1.1\r\nHost: ratings\r\n\r\n")
            received = b""
            while not received.endswith(b"x" * 10 if method == b"GET" else b"\r\n\r\n"):
                received += sock.recv(65536)
    served.wait(2)
    assert served.counted() == [("200", "-", 2.0)]
    assert sorted((e["method"], e["response_flags"], e["bytes_sent"]) for e in served.logged()) == [
        ("GET", "-", 10),
        ("HEAD", "-", 0),
    ]
