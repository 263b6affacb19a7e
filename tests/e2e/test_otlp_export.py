"""Spans leave through the real OTLP exporters, configured as a user configures them.

`MESHLIB_TRACES_EXPORTER=otlp` and OpenTelemetry's own `OTEL_EXPORTER_OTLP_*` variables point
meshlib at a receiver on loopback that speaks OTLP as a collector (or Jaeger) does: over HTTP
(`POST /v1/traces`, protobuf) by default, over gRPC with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
A served request and the meshed call it makes arrive there as one trace: the caller's trace
id, the SERVER span the caller's span's child, the CLIENT span the SERVER span's child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.util._once import Once
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import meshlib
from meshlib.config import MeshConfig
from tests.upstream import AsgiServer, Upstream, child_env, loopback_service, mesh_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{randomSamplingPercentage: 0}]
"""


@pytest.fixture(autouse=True)
def own_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """No global TracerProvider (meshlib builds its own, with the exporter the environment
    names) and none of OpenTelemetry's exporter variables but the test's own."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)
    for variable in list(os.environ):
        if variable.startswith("OTEL_EXPORTER_"):
            monkeypatch.delenv(variable)


class Received:
    """What a receiver was sent: the decoded export requests, and a way to wait for them."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.arrived = threading.Condition()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.arrived:
            self.requests.append(request)
            self.arrived.notify_all()

    def spans(self) -> list[tuple[dict[str, Any], ProtoSpan]]:
        """Every span sent, with its resource's attributes."""
        return [
            (_attributes(resource_spans.resource.attributes), span)
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, as a collector takes."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces" or self.headers["Content-Type"] != (
                "application/x-protobuf"
            ):
                self.send_error(404)
                return
            received.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/gRPC receiver: OpenTelemetry's TraceService, as a collector serves it."""
    received = Received()

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(
            self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            received.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)


def _serve_one_traced_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """productpage (MeshMiddleware on uvicorn) calls reviews with a meshed client; its Mesh
    takes the exporter from the environment, as a deployment's would. The caller's sampled
    traceparent makes both spans recorded (the mesh's own sampling is 0%); closing the Mesh
    flushes the batch."""
    monkeypatch.setenv("MESHLIB_TRACES_EXPORTER", "otlp")
    with Upstream("reviews") as reviews:
        config = MeshConfig(service="productpage", namespace="bookinfo", metrics_port=None)
        policy = loopback_service("reviews.bookinfo.svc.cluster.local", reviews.port)
        mesh = mesh_for(config, policy + "---\n" + TELEMETRY, watch=False)
        assert mesh.tracing.exporter == "otlp" and mesh.tracing.owns_provider
        client = meshlib.Client(mesh=mesh)

        def page(request: Request) -> PlainTextResponse:
            answer = client.get("http://reviews.bookinfo.svc.cluster.local:9080/reviews/1")
            return PlainTextResponse(f"reviews said {answer.status_code}")

        app = Starlette(routes=[Route("/productpage", page)])
        server = AsgiServer(meshlib.MeshMiddleware(app, mesh=mesh), "productpage").start()
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{server.port}/productpage",
                headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
            )
            assert answer.text == "reviews said 200"
        finally:
            server.stop()
            client.close()
            mesh.close()  # flushes the BatchSpanProcessor into the exporter


def _assert_one_trace(received: Received) -> None:
    spans = received.spans()
    by_kind = {span.kind: (resource, span) for resource, span in spans}
    assert len(spans) == 2, spans
    resource, server = by_kind[ProtoSpan.SPAN_KIND_SERVER]
    _, client = by_kind[ProtoSpan.SPAN_KIND_CLIENT]
    assert resource["service.name"] == "productpage"
    assert resource["k8s.namespace.name"] == "bookinfo"
    assert server.trace_id.hex() == client.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == CALLER_SPAN
    assert client.parent_span_id == server.span_id
    assert server.name == "GET /productpage"
    assert _attributes(server.attributes)["http.response.status_code"] == 200
    assert _attributes(client.attributes)["http.response.status_code"] == 200


def test_spans_reach_an_otlp_http_receiver(
    http_receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default transport, OTLP over HTTP, to the standard endpoint variable."""
    endpoint, received = http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    _serve_one_traced_request(monkeypatch)
    _assert_one_trace(received)


def test_spans_reach_an_otlp_grpc_receiver(
    grpc_receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc sends to a gRPC receiver instead."""
    endpoint, received = grpc_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")
    _serve_one_traced_request(monkeypatch)
    _assert_one_trace(received)


SERVED = """
import meshlib
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

meshlib.configure(service="productpage", metrics_port=None)


async def page(request):
    return PlainTextResponse("page")


app = Starlette(routes=[Route("/productpage", page)])
app.add_middleware(meshlib.MeshMiddleware)
"""


@pytest.mark.parametrize("workers", [1, 2], ids=["uvicorn", "uvicorn-workers"])
def test_spans_batched_when_uvicorn_is_stopped_are_exported(
    http_receiver: tuple[str, Received], tmp_path: Path, workers: int
) -> None:
    """uvicorn stopped by SIGTERM (a pod's termination) ends its process by raising the signal
    again, without `atexit`, where OpenTelemetry's provider would export its batch: the
    middleware exports it at the lifespan's shutdown, so the last requests' spans arrive (the
    batch's own timer, 5 s, has not fired yet). With --workers, each worker does the same."""
    endpoint, received = http_receiver
    (tmp_path / "served.py").write_text(SERVED)
    env = child_env(
        str(tmp_path), MESHLIB_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    argv = [uvicorn, "--fd", str(listener.fileno()), "--log-level", "warning", "served:app"]
    if workers > 1:
        argv[1:1] = ["--workers", str(workers)]
    server = subprocess.Popen(argv, cwd=tmp_path, env=env, pass_fds=[listener.fileno()])
    listener.close()  # uvicorn holds it now
    try:
        traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
        deadline = time.monotonic() + 30
        while True:  # ready when it answers (the listening socket queues until then)
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/productpage",
                    headers={"traceparent": traceparent},
                    timeout=5,
                )
                break
            except httpx.TransportError:
                assert server.poll() is None, "uvicorn exited"
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        assert answer.text == "page"
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    names = [(span.kind, span.name, span.trace_id.hex()) for _, span in received.spans()]
    assert names == [(ProtoSpan.SPAN_KIND_SERVER, "GET /productpage", TRACE_ID)]


def test_the_lifespan_shutdown_exports_the_batch_once_before_the_server_hears_it(
    http_receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The span ended during shutdown has reached the collector by the time the server gets
    `lifespan.shutdown.complete`; an app that says so twice is waited for once (the span
    between its two messages stays in the batch, which the batch's timer, set here to a
    minute, would send later)."""
    endpoint, received = http_receiver
    monkeypatch.setenv("MESHLIB_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    every_span = TELEMETRY.replace("randomSamplingPercentage: 0", "randomSamplingPercentage: 100")
    mesh = mesh_for(MeshConfig(service="productpage", metrics_port=None), every_span, watch=False)
    assert mesh.tracing.owns_provider and mesh.tracing.provider is not None
    tracer = mesh.tracing.provider.get_tracer("the-app")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "lifespan.shutdown"
        for name in ("before", "between"):
            tracer.start_span(name).end()
            await send({"type": "lifespan.shutdown.complete"})

    exported_when_told: list[list[str]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.shutdown"}

    async def server_send(message: dict[str, Any]) -> None:
        exported_when_told.append([span.name for _, span in received.spans()])

    try:
        lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        asyncio.run(meshlib.MeshMiddleware(app, mesh=mesh)(lifespan, receive, server_send))
        assert exported_when_told == [["before"], ["before"]]
    finally:
        mesh.close()
