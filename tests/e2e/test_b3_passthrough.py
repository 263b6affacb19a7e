"""B3 through a served request with tracing off: the callee gets what the caller sent.

A real server (uvicorn for ASGI, wsgiref for WSGI) runs an app under meshlib's middleware; the
app calls a real upstream (a passthrough host) through a meshed client and copies no header.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config import MeshConfig
from tests.upstream import AsgiServer, Upstream, WsgiServer

TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
TRACE_64 = "64fe8b2a57d3eff7"
SPAN = "e457b5a2e4d86bd1"
PARENT = "05e3ac9a4f6e3b90"
B3 = ("b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")

CALLERS = [
    pytest.param(
        {
            "x-b3-traceid": TRACE,
            "x-b3-spanid": SPAN,
            "x-b3-parentspanid": PARENT,
            "x-b3-sampled": "1",
        },
        id="multi",
    ),
    pytest.param({"b3": f"{TRACE}-{SPAN}-1-{PARENT}"}, id="single"),
    pytest.param(
        {
            "x-b3-traceid": TRACE_64,
            "x-b3-spanid": SPAN,
            "x-b3-parentspanid": PARENT,
            "x-b3-flags": "1",
        },
        id="multi-64-bit-debug",
    ),
    pytest.param({"b3": f"{TRACE_64}-{SPAN}-0-{PARENT}"}, id="single-64-bit"),
    pytest.param(
        {"x-b3-traceid": TRACE_64, "x-b3-spanid": SPAN, "x-b3-parentspanid": PARENT},
        id="multi-64-bit-deferred",
    ),
]


def asgi_app(url: str, mesh: meshlib.Mesh) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def call(request: Request) -> PlainTextResponse:
        async with meshlib.AsyncClient(mesh=mesh) as client:  # closed on the server's loop
            response = await client.get(url)
        return PlainTextResponse(str(response.status_code))

    return meshlib.MeshMiddleware(Starlette(routes=[Route("/", call)]), mesh=mesh)


def wsgi_app(url: str, mesh: meshlib.Mesh) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with meshlib.Client(mesh=mesh) as client:
            status = client.get(url).status_code
        start_response("200 OK", [("content-type", "text/plain")])
        return [str(status).encode()]

    return meshlib.MeshWSGIMiddleware(app, mesh=mesh)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize("sent", CALLERS)
def test_b3_goes_on_as_the_caller_sent_it(
    upstreams: dict[str, Upstream], kind: str, sent: dict[str, str]
) -> None:
    """No tracer makes a span: every B3 header reaches the callee as sent — the parent span
    id, a 64-bit trace id, the sampling state (or its absence) — as Istio asks an app to
    copy them."""
    upstream = upstreams["v1"]
    mesh = meshlib.Mesh(MeshConfig(service="reviews", metrics_port=None), watch=False)
    assert not mesh.tracing.enabled
    url = f"http://{upstream.address}/ratings"  # a host the mesh does not know: passthrough
    try:
        if kind == "asgi":
            server = AsgiServer(asgi_app(url, mesh)).start()
            try:
                answer = httpx.get(f"http://127.0.0.1:{server.port}/", headers=sent)
            finally:
                server.stop()
        else:
            with WsgiServer(wsgi_app(url, mesh)) as wsgi:
                answer = httpx.get(f"http://127.0.0.1:{wsgi.port}/", headers=sent)
    finally:
        mesh.close()
    assert answer.text == "200"
    (received,) = upstream.behaviour.requests
    assert {k: v for k, v in received["headers"].items() if k in B3} == sent


# A Zipkin-only mesh: OTEL_PROPAGATORS says which formats every call sends.
ZIPKIN_ENV = {"OTEL_PROPAGATORS": "b3multi", "MESHLIB_SERVICE": "reviews"}


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(
            {"b3": f"{TRACE}-{SPAN}-1"},
            {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"},
            id="b3-single-caller",
        ),
        pytest.param(
            {"traceparent": f"00-{TRACE}-{SPAN}-01"},
            {"traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"},
            id="w3c-caller",
        ),
    ],
)
def test_otel_propagators_choose_the_formats_sent(
    upstreams: dict[str, Upstream], sent: dict[str, str], expected: set[str]
) -> None:
    """With OTEL_PROPAGATORS=b3multi, every call from a served request sends B3 multi-header,
    and W3C (or single `b3`) only to answer a caller that used it: the trace holds across a
    mesh whose other hops read B3 multi-header alone."""
    upstream = upstreams["v1"]
    mesh = meshlib.Mesh(MeshConfig.from_env({**ZIPKIN_ENV, "MESHLIB_METRICS_PORT": "off"}))
    assert mesh.config.propagators == ("b3multi",)
    url = f"http://{upstream.address}/ratings"
    server = AsgiServer(asgi_app(url, mesh)).start()
    try:
        answer = httpx.get(f"http://127.0.0.1:{server.port}/", headers=sent)
    finally:
        server.stop()
        mesh.close()
    assert answer.text == "200"
    (received,) = upstream.behaviour.requests
    trace_headers = {
        k for k in received["headers"] if k in B3 or k in ("traceparent", "tracestate")
    }
    assert trace_headers == expected
    assert received["headers"]["x-b3-traceid"] == TRACE  # the caller's trace, in B3
