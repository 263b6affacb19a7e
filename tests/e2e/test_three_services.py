"""Context propagation across three real services with no header-copying app code.

frontend (Starlette on uvicorn) -> backend (Flask on gunicorn, 2 workers) -> ratings v1/v2
(Starlette on uvicorn). The test calls the frontend the way a browser or gateway would.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import meshlib
from meshlib.config import MeshConfig
from tests.e2e import apps
from tests.upstream import AsgiServer

ROOT = Path(__file__).parent.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def policy(backend_port: int, ratings: dict[str, int]) -> str:
    endpoints = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: ratings, version: {v}}}}}"
        for v, port in ratings.items()
    )
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}, labels: {{app: backend, version: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
{endpoints}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: ratings, subset: v2}}}}]
  - route: [{{destination: {{host: ratings, subset: v1}}}}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  tracing: [{{randomSamplingPercentage: 100}}]
"""


SPANS: dict[str, InMemorySpanExporter] = {}


def traced(name: str) -> TracerProvider:
    """A tracer provider for an in-process service, keeping its finished spans for the test."""
    exporter = SPANS[name] = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ratings v1/v2, the gunicorn backend and the frontend; yield the frontend's URL."""
    workdir = tmp_path_factory.mktemp("mesh")
    path = workdir / "mesh.yaml"
    backend_port = free_port()
    servers: list[AsgiServer] = []
    meshes: list[meshlib.Mesh] = []
    ratings: dict[str, int] = {}
    path.write_text(policy(backend_port, {}).split("---")[0])  # placeholder until ports are known
    for version in ("v1", "v2"):
        config = MeshConfig(service="ratings", version=version)
        mesh = meshlib.Mesh(config, policy=path, tracer_provider=traced(f"ratings-{version}"))
        meshes.append(mesh)
        server = AsgiServer(apps.ratings_app(version, mesh), f"ratings-{version}").start()
        servers.append(server)
        ratings[version] = server.port
    path.write_text(policy(backend_port, ratings))
    env = {
        **os.environ,
        "MESHLIB_SERVICE": "backend",
        "MESHLIB_POLICY": str(path),
        "MESHLIB_PROPAGATE_HEADERS": "end-user",
        "MESHLIB_METRICS_PORT": "off",
        "MESHLIB_TRACES_EXPORTER": "console",  # the backend exports to memory (apps.py)
    }
    gunicorn = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{backend_port}",
            "tests.e2e.apps:backend_wsgi()",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    frontend_mesh = meshlib.Mesh(
        MeshConfig(service="frontend", propagate_headers=("end-user",)),
        policy=path,
        tracer_provider=traced("frontend"),
    )
    meshes.append(frontend_mesh)
    server = AsgiServer(apps.frontend_app(frontend_mesh), "frontend").start()
    servers.append(server)
    try:
        deadline = time.monotonic() + 30
        while True:  # poll the backend until gunicorn's workers answer
            try:
                with socket.create_connection(("127.0.0.1", backend_port), timeout=0.5):
                    break
            except OSError:
                assert gunicorn.poll() is None, "gunicorn exited"
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{server.port}"
    finally:
        gunicorn.terminate()
        gunicorn.wait(timeout=10)
        for s in servers:
            s.stop()
        for m in meshes:
            m.close()


def hops(answer: dict[str, Any]) -> list[dict[str, str]]:
    """What each hop saw: frontend, backend, ratings."""
    backend = answer["backend"]
    return [answer["seen"], backend["seen"], backend["ratings"]["seen"]]


def call(frontend: str, path: str = "/", headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(frontend + path, headers=headers or {}, timeout=20)
    assert response.status_code == 200, response.text
    return dict(response.json())


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def parent_id(traceparent: str) -> str:
    return traceparent.split("-")[2]


def test_w3c_trace_id_spans_every_hop(frontend: str) -> None:
    """A W3C caller: one trace id at every hop, each hop a child of the one before."""
    tid, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    SPANS["frontend"].clear()
    answer = call(frontend, headers={"traceparent": f"00-{tid}-{caller_span}-01"})
    seen = hops(answer)
    assert [trace_id(h["traceparent"]) for h in seen] == [tid, tid, tid]
    assert len({h["x-request-id"] for h in seen[1:]}) == 1
    deadline = time.monotonic() + 5
    while not any(s.kind == SpanKind.SERVER for s in SPANS["frontend"].get_finished_spans()):
        assert time.monotonic() < deadline, "the frontend's SERVER span never ended"
        time.sleep(0.01)  # the span ends just after the response is sent: poll for it
    spans = SPANS["frontend"].get_finished_spans()
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert server.parent is not None and f"{server.parent.span_id:016x}" == caller_span
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    # The backend's parent is the frontend's CLIENT span; ratings' parent is the backend's
    # CLIENT span, itself a child of the backend's SERVER span (the backend reports its spans).
    assert parent_id(seen[1]["traceparent"]) == f"{client.context.span_id:016x}"
    backend = answer["backend"]
    assert backend["client_spans"] == [[parent_id(seen[2]["traceparent"]), backend["server_span"]]]
    assert backend["server_span"] not in (caller_span, parent_id(seen[1]["traceparent"]))


def test_b3_only_caller(frontend: str) -> None:
    """A B3-only caller: its trace id reaches every hop."""
    tid = secrets.token_hex(16)
    answer = call(
        frontend,
        headers={"x-b3-traceid": tid, "x-b3-spanid": secrets.token_hex(8), "x-b3-sampled": "1"},
    )
    for hop in hops(answer)[1:]:
        assert hop.get("x-b3-traceid") == tid or trace_id(hop["traceparent"]) == tid


def test_headerless_caller_gets_one_trace(frontend: str) -> None:
    """A caller with no trace headers: the first hop starts a trace and an x-request-id for all."""
    answer = call(frontend)
    seen = hops(answer)[1:]
    assert len({trace_id(h["traceparent"]) for h in seen}) == 1
    assert len({h["x-request-id"] for h in seen}) == 1


@pytest.mark.parametrize("path", ["/", "/threadpool", "/executor"])
def test_end_user_routes_two_hops_down(frontend: str, path: str) -> None:
    """end-user: jason set at the edge reaches ratings v2 through two hops — async, threadpool, executor."""
    jason = call(frontend, path, {"end-user": "jason"})
    anyone = call(frontend, path)
    assert jason["backend"]["ratings"]["version"] == "v2"
    assert jason["backend"]["ratings"]["seen"]["end-user"] == "jason"
    assert anyone["backend"]["ratings"]["version"] == "v1"
