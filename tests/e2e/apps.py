"""Three small services for end-to-end propagation tests, meshed with one line each.

frontend (Starlette, ASGI) -> backend (Flask, WSGI, under gunicorn) -> ratings v1 / v2
(Starlette). No app copies a header: meshlib carries trace context, x-request-id and
`end-user` from each inbound request to the outbound calls made while serving it.

The backend runs in its own gunicorn process and configures itself from MESHLIB_*
variables, as a deployed service would.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import meshlib

PROPAGATED = (
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-request-id",
    "end-user",
)


def seen(headers: Any) -> dict[str, str]:
    return {name: headers[name] for name in PROPAGATED if name in headers}


def ratings_app(version: str, mesh: meshlib.Mesh) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ratings(request: Request) -> JSONResponse:
        return JSONResponse(
            {"service": "ratings", "version": version, "seen": seen(request.headers)}
        )

    return meshlib.MeshMiddleware(Starlette(routes=[Route("/ratings/{id}", ratings)]), mesh=mesh)


def frontend_app(mesh: meshlib.Mesh) -> Any:
    import contextlib
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    clients: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients["async"] = meshlib.AsyncClient(mesh=mesh, timeout=10)
        clients["sync"] = meshlib.Client(mesh=mesh, timeout=10)
        clients["pool"] = concurrent.futures.ThreadPoolExecutor(2)
        yield
        await clients["async"].aclose()
        clients["sync"].close()
        clients["pool"].shutdown()

    async def page(request: Request) -> JSONResponse:  # an async handler: same task
        backend = (await clients["async"].get("http://backend:9080/details")).json()
        return JSONResponse(
            {"service": "frontend", "seen": seen(request.headers), "backend": backend}
        )

    def page_in_threadpool(request: Request) -> JSONResponse:  # Starlette runs it in a thread
        backend = clients["sync"].get("http://backend:9080/details").json()
        return JSONResponse(
            {"service": "frontend", "seen": seen(request.headers), "backend": backend}
        )

    async def page_in_executor(request: Request) -> JSONResponse:  # work handed to a pool
        future = clients["pool"].submit(clients["sync"].get, "http://backend:9080/details")
        backend = future.result().json()
        return JSONResponse(
            {"service": "frontend", "seen": seen(request.headers), "backend": backend}
        )

    routes = [
        Route("/", page),
        Route("/threadpool", page_in_threadpool),
        Route("/executor", page_in_executor),
    ]
    return meshlib.MeshMiddleware(Starlette(routes=routes, lifespan=lifespan), mesh=mesh)


def backend_wsgi() -> Any:
    """The backend, for gunicorn: `gunicorn tests.e2e.apps:backend_wsgi()`."""
    from flask import Flask, jsonify, request
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshlib.config import MeshConfig
    from meshlib.telemetry.tracing import build_tracer_provider

    # MESHLIB_SERVICE, MESHLIB_POLICY, MESHLIB_PROPAGATE_HEADERS from the env; the spans kept
    # in memory, so the answer can say which CLIENT span called ratings.
    config = MeshConfig.from_env()
    spans = InMemorySpanExporter()
    provider = build_tracer_provider(config, spans, batch=False)
    meshlib.configure(mesh=meshlib.Mesh(config, tracer_provider=provider))
    app = Flask("backend")
    session = meshlib.Session()

    @app.get("/details")
    def details() -> Any:
        served = trace.get_current_span().get_span_context()
        ratings = session.get("http://ratings:9080/ratings/1", timeout=10).json()
        calls = [  # this request's CLIENT spans (ended: the call returned)
            [f"{s.context.span_id:016x}", f"{s.parent.span_id:016x}" if s.parent else None]
            for s in spans.get_finished_spans()
            if s.kind is trace.SpanKind.CLIENT and s.context.trace_id == served.trace_id
        ]
        return jsonify(
            {
                "service": "backend",
                "pid": os.getpid(),
                "seen": seen(request.headers),
                "ratings": ratings,
                "server_span": f"{served.span_id:016x}",
                "client_spans": calls,
            }
        )

    app.wsgi_app = meshlib.MeshWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app
