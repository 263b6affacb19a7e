"""The inbound middleware's cheap paths give what the general ones give.

The ASGI and WSGI middleware read the request lazily (request line and origin only for a span
or an access log), keep the caller's `traceparent` as a `CallerSpan` whose SpanContext is built
on first use, and record metrics through a `DestinationRecorder` keyed by the raw peer header:
each must be indistinguishable from the eager way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry import peer
from meshlib.telemetry._span_scopes import _unsampled
from meshlib.telemetry.metrics import IstioMetrics
from meshlib.telemetry.propagation import CallerSpan, Propagator, _single
from tests.access_lines import logging_mesh, start_time

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
PEER = "w=reviews-v2;n=bookinfo;a=reviews;v=v2"


def asgi_call(
    app: Any, headers: list[tuple[bytes, bytes]], *, query: bytes = b""
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"12345", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/ratings/1",
        "scheme": "http",
        "query_string": query,
        "client": ("10.1.2.3", 4567),
        "headers": [(b"host", b"ratings:9080"), *headers],
    }
    asyncio.run(app(scope, receive, send))
    return sent


def ok_app(seen: list[Any]) -> Any:
    response = {"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        seen.append(trace.get_current_span().get_span_context())
        await send(response)  # the same message each time: it must not grow
        await send({"type": "http.response.body", "body": b"hello"})

    return app


@settings(max_examples=200, deadline=None)
@given(
    trace_id=st.text("0123456789abcdef", min_size=32, max_size=32),
    span_id=st.text("0123456789abcdef", min_size=16, max_size=16),
    flags=st.sampled_from(["00", "01", "02", "03", "fe", "ff"]),
    state=st.sampled_from([None, "a=b", "congo=t61rcWkgMzE,rojo=00f067", "bad key=!"]),
)
def test_caller_span_is_what_opentelemetry_extracts(
    trace_id: str, span_id: str, flags: str, state: str | None
) -> None:
    """The lazy span: the same SpanContext, sampled flag and unsampled-parent verdict as the
    NonRecordingSpan OpenTelemetry's propagator gives, and a NonRecordingSpan itself."""
    carrier = {"traceparent": f"00-{trace_id}-{span_id}-{flags}"}
    if state is not None:
        carrier["tracestate"] = state
    inbound = Propagator().extract(lambda name: [carrier[name]] if name in carrier else None)
    ours = trace.get_current_span(inbound.otel_context)
    theirs = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier))
    if not theirs.get_span_context().is_valid:  # all-zero ids: no lazy span
        assert not isinstance(ours, CallerSpan)
        return
    assert isinstance(ours, CallerSpan) and isinstance(ours, NonRecordingSpan)
    assert not ours.is_recording()
    assert _unsampled(ours) == _unsampled(theirs)
    assert ours.sampled == theirs.get_span_context().trace_flags.sampled == inbound.sampled
    assert ours.get_span_context() == theirs.get_span_context()
    assert ours.get_span_context().trace_state == theirs.get_span_context().trace_state
    assert ours.get_span_context() is ours.get_span_context()  # built once
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("flags", ["00", "01"])
def test_app_sees_the_callers_trace(flags: str) -> None:
    """Inside the handler OpenTelemetry's current span is the caller's (sampled or not, with
    tracing on), and nothing stays current after the request."""
    mesh = meshlib.Mesh(MeshConfig(service="ratings", metrics_port=None), watch=False)
    seen: list[Any] = []
    traceparent = f"00-{TRACE_ID}-{SPAN_ID}-{flags}"
    asgi_call(
        meshlib.MeshMiddleware(ok_app(seen), mesh=mesh), [(b"traceparent", traceparent.encode())]
    )
    (span_context,) = seen
    assert f"{span_context.trace_id:032x}" == TRACE_ID
    assert span_context.trace_flags.sampled == (flags == "01")
    assert trace.get_current_span() is trace.INVALID_SPAN
    mesh.close()


def test_asgi_reads_repeated_and_uppercase_headers_as_extract_does() -> None:
    """The ASGI adapter keeps one string per header, and every value of a repeated one: what
    the app's calls carry is what extract gives for the same headers, in either spelling."""
    from meshlib.telemetry import propagation

    config = MeshConfig(service="ratings", metrics_port=None, propagate_headers=["end-user"])
    mesh = meshlib.Mesh(config, watch=False)
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(propagation.current.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    traceparent = f"00-{TRACE_ID}-{SPAN_ID}-01"
    headers = [
        (b"traceparent", traceparent.encode()),
        (b"X-Request-Id", b"rid-1"),
        (b"end-user", b"jason"),
        (b"End-User", b"alice"),
        (b"host", b"second:80"),
    ]
    asgi_call(meshlib.MeshMiddleware(app, mesh=mesh), headers)
    (inbound,) = seen
    expected = mesh.propagator.extract(
        {
            "traceparent": [traceparent],
            "x-request-id": ["rid-1"],
            "end-user": ["jason", "alice"],
        }.get
    )
    assert inbound.headers == expected.headers == (("end-user", "jason,alice"),)
    assert inbound.request_id == expected.request_id == "rid-1"
    assert inbound._replace(otel_context=Context()) == expected._replace(otel_context=Context())
    span = trace.get_current_span(inbound.otel_context).get_span_context()
    assert f"{span.trace_id:032x}" == TRACE_ID

    exchange = meshlib.asgi._Exchange(
        meshlib.asgi.InboundSide(mesh),
        {"headers": [(b"host", b"a:1"), (b"Host", b"b:2"), (b"user-agent", b"ua")]},
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )
    assert exchange.get_all("host") == ["a:1", "b:2"]  # a span's header tags see them all
    assert exchange.get_all("user-agent") == ["ua"]
    assert not exchange.get_all("x-request-id")
    assert exchange.request_line()[3] == "a:1"
    mesh.close()


def logged_mesh() -> tuple[meshlib.Mesh, list[Any]]:
    return logging_mesh(MeshConfig(service="ratings", metrics_port=None))


def test_asgi_access_log_and_metrics() -> None:
    """The request line and origin read lazily for the access log; bytes, status and the
    caller's peer labels counted; the identity header added to a copy of the app's headers."""
    mesh, entries = logged_mesh()
    seen: list[Any] = []
    app = meshlib.MeshMiddleware(ok_app(seen), mesh=mesh)
    before = time.time()
    headers = [(b"user-agent", b"ua"), (peer.HEADER.encode(), PEER.encode())]
    for _ in range(2):
        sent = asgi_call(app, headers, query=b"x=1")
        assert sent[0]["headers"] == [(b"a", b"b"), (peer.HEADER.encode(), mesh.identity.encode())]
    (entry, _) = entries
    assert (entry.method, entry.path, entry.authority) == ("POST", "/ratings/1?x=1", "ratings:9080")
    assert entry.downstream_remote_address == "10.1.2.3:4567"
    assert (entry.response_code, entry.bytes_received, entry.bytes_sent) == (201, 5, 5)
    assert entry.user_agent == "ua"
    assert before - 0.001 <= start_time(entry) <= time.time()
    rows = [row for row in mesh.metrics.collect() if row.name == "istio_requests"]
    (sample,) = [s for s in rows[0].samples if s.name == "istio_requests_total"]
    assert sample.value == 2
    assert sample.labels["source_workload"] == "reviews-v2"
    assert sample.labels["source_app"] == "reviews"
    assert sample.labels["response_code"] == "201"
    assert sample.labels["destination_service"] == "ratings.default.svc.cluster.local"
    assert sample.labels["connection_security_policy"] == "none"
    mesh.close()


def test_identity_is_answered_to_meshed_callers_only() -> None:
    """As Istio's sidecars do, the middleware adds this workload's identity to a response only
    when the caller sent its own (a meshed caller): a browser or a gateway outside the mesh
    learns nothing of the workload. The app's own headers are never changed in place."""
    mesh = meshlib.Mesh(MeshConfig(service="ratings", metrics_port=None))
    asgi_app = meshlib.MeshMiddleware(ok_app([]), mesh=mesh)
    app_headers = [("a", "b")]

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", app_headers)
        return [b"ok"]

    def wsgi_call(extra: dict[str, str]) -> list[tuple[str, str]]:
        started: list[Any] = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http", **extra}
        body = meshlib.MeshWSGIMiddleware(wsgi, mesh=mesh)(environ, lambda *a: started.append(a))
        body.close()  # type: ignore[attr-defined]
        return started[0][1]  # type: ignore[no-any-return]

    # Outside the mesh: the headers as the app sent them.
    assert asgi_call(asgi_app, [])[0]["headers"] == [(b"a", b"b")]
    assert wsgi_call({}) == [("a", "b")]
    # A meshed caller, even one whose metadata does not parse: ours is added.
    for claimed in (PEER, "garbage"):
        sent = asgi_call(asgi_app, [(peer.HEADER.encode(), claimed.encode())])
        assert sent[0]["headers"] == [(b"a", b"b"), (peer.HEADER.encode(), mesh.identity.encode())]
        assert wsgi_call({"HTTP_X_MESHLIB_PEER_METADATA": claimed}) == [
            ("a", "b"),
            (peer.HEADER, mesh.identity),
        ]
    assert app_headers == [("a", "b")]
    mesh.close()


def test_wsgi_access_log() -> None:
    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("202 Accepted", [("a", "b")])
        return [b"abc"]

    environ = {
        "REQUEST_METHOD": "PUT",
        "PATH_INFO": "/r",
        "QUERY_STRING": "q=2",
        "REMOTE_ADDR": "10.0.0.1",
        "REMOTE_PORT": "99",
        "HTTP_HOST": "ratings",
        "CONTENT_LENGTH": "3",
        "wsgi.url_scheme": "http",
    }
    started: list[Any] = []
    body = meshlib.MeshWSGIMiddleware(app, mesh=mesh)(environ, lambda *a: started.append(a))
    assert b"".join(body) == b"abc"
    body.close()  # type: ignore[attr-defined]
    assert started[0][1] == [("a", "b")]  # a caller outside the mesh: no identity header
    (entry,) = entries
    assert (entry.method, entry.path, entry.authority) == ("PUT", "/r?q=2", "ratings")
    assert entry.downstream_remote_address == "10.0.0.1:99"
    assert (entry.response_code, entry.bytes_received, entry.bytes_sent) == (202, 3, 3)
    mesh.close()


def test_wsgi_head_answer_counts_no_body() -> None:
    """A WSGI app that writes a body for HEAD (servers drop it: a HEAD answer has none):
    istio_response_bytes and the access log count 0 bytes sent; the GET counts its body."""
    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-length", "1000")])
        return [b"x" * 1000]

    middleware = meshlib.MeshWSGIMiddleware(app, mesh=mesh)
    for method in ("HEAD", "GET"):
        environ = {"REQUEST_METHOD": method, "PATH_INFO": "/r", "wsgi.url_scheme": "http"}
        body = middleware(environ, lambda *a: None)
        assert b"".join(body) == b"x" * 1000  # the server, not the middleware, drops it
        body.close()  # type: ignore[attr-defined]
    assert [(e.method, e.bytes_sent) for e in entries] == [("HEAD", 0), ("GET", 1000)]
    (family,) = [m for m in mesh.metrics.collect() if m.name == "istio_response_bytes"]
    sums = [s.value for s in family.samples if s.name == "istio_response_bytes_sum"]
    counts = [s.value for s in family.samples if s.name == "istio_response_bytes_count"]
    assert (sums, counts) == ([1000.0], [2.0])
    mesh.close()


def samples(metrics: IstioMetrics) -> dict[tuple[str, ...], float]:
    (family,) = [m for m in metrics.collect() if m.name == "istio_requests"]
    return {tuple(s.labels.values()): s.value for s in family.samples if s.name.endswith("_total")}


def test_destination_recorder_counts_as_record_does() -> None:
    """The recorder's series are record()'s: the same labels, the same counts."""
    config = MeshConfig(service="ratings", namespace="prod")
    by_record = IstioMetrics(CollectorRegistry(), config)
    by_recorder = IstioMetrics(CollectorRegistry(), config)
    recorder = by_recorder.destination(
        destination_service="ratings.prod.svc.cluster.local",
        destination_service_name="ratings",
        destination_service_namespace="prod",
        connection_security_policy="none",
    )
    for claimed in (None, PEER, "garbage", PEER, None):
        for status in (200, 503, 200):
            identity = peer.decode(claimed)
            by_record.record(
                "destination",
                identity,
                destination_service="ratings.prod.svc.cluster.local",
                destination_service_name="ratings",
                destination_service_namespace="prod",
                response_code=status,
                connection_security_policy="none",
                duration_ms=1.0,
                request_bytes=1,
                response_bytes=2,
            )
            recorder.record(claimed, status, 1.0, 1, 2)
            recorder.record(claimed, status, 1.0, 1, 2)
    expected = {labels: 2 * value for labels, value in samples(by_record).items()}
    assert samples(by_recorder) == expected
    # Both share IstioMetrics' series: record() lands in the recorder's.
    by_recorder.record(
        "destination",
        peer.decode(PEER),
        destination_service="ratings.prod.svc.cluster.local",
        destination_service_name="ratings",
        destination_service_namespace="prod",
        response_code=200,
        connection_security_policy="none",
        duration_ms=1.0,
        request_bytes=1,
        response_bytes=2,
    )
    assert sum(samples(by_recorder).values()) == sum(expected.values()) + 1


def test_destination_recorder_past_max_series() -> None:
    """Full: new peers fold into the unknown peer; what still does not fit is counted as
    dropped on every request (a drop is not remembered)."""
    registry = CollectorRegistry()
    metrics = IstioMetrics(registry, MeshConfig(service="ratings"), max_series=1)
    recorder = metrics.destination(
        destination_service="s",
        destination_service_name="s",
        destination_service_namespace="default",
        connection_security_policy="none",
    )
    recorder.record(PEER, 200, 1.0, 0, 0)
    for _ in range(3):  # the unknown peer's series may be made past the cap, up to twice it
        recorder.record(None, 500, 1.0, 0, 0)
    for _ in range(3):  # a third label set does not fit at all
        recorder.record(None, 503, 1.0, 0, 0)
    assert registry.get_sample_value("meshlib_metric_series_dropped_total") == 3
    assert sum(samples(metrics).values()) == 4
    for i in range(5):  # distinct headers: the recorder's memory stays bounded
        recorder.record(f"w=x{i}", 200, 1.0, 0, 0)
    assert len(recorder._cache) <= 1


def test_destination_recorder_counts_exactly_under_threads() -> None:
    metrics = IstioMetrics(CollectorRegistry(), MeshConfig(service="ratings"))
    recorder = metrics.destination(
        destination_service="s",
        destination_service_name="s",
        destination_service_namespace="default",
        connection_security_policy="none",
    )
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for i in range(2000):
            claimed = PEER if i % 2 else None
            recorder.record(claimed, 200 + i % 3, 1.0, 1, 1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(samples(metrics).values()) == 16000
    assert len(samples(metrics)) == 6


_header_values = st.one_of(
    st.sampled_from(
        [
            f"00-{TRACE_ID}-{SPAN_ID}-01",
            f"00-{TRACE_ID}-{SPAN_ID}-00",
            f"00-{'0' * 32}-{SPAN_ID}-01",
            f"00-{TRACE_ID}-{'0' * 16}-01",
            f"01-{TRACE_ID}-{SPAN_ID}-01",
            f" 00-{TRACE_ID}-{SPAN_ID}-01",
            "3e0f2b66-5e6a-9d2c-b1a4-0b3c8f1e2d77",
            " 3e0f2b66 ",
            "",
            "a=b",
            "1500",
            "5S",
            "jason",
            f"{TRACE_ID}-{SPAN_ID}-1",
        ]
    ),
    st.text(max_size=60),
)
_header_names = st.sampled_from(
    [
        "traceparent",
        "tracestate",
        "x-request-id",
        "baggage",
        "b3",
        "x-b3-traceid",
        "x-b3-sampled",
        "x-envoy-expected-rq-timeout-ms",
        "grpc-timeout",
        "end-user",
        "host",
        peer.HEADER,
    ]
)


@settings(max_examples=400, deadline=None)
@given(found=st.dictionaries(_header_names, st.lists(_header_values, min_size=1, max_size=2)))
def test_extract_found_is_extract(found: dict[str, list[str]]) -> None:
    """The middleware's one-step read of the common request gives what extract gives."""
    p = Propagator(["end-user"])
    more = {name: values for name, values in found.items() if len(values) > 1}
    ours = p.extract_found({name: values[0] for name, values in found.items()}, more or None)
    theirs = p.extract(found.get)
    if "x-request-id" not in found or ours.request_id != _single(found["x-request-id"]):
        assert len(ours.request_id) == len(theirs.request_id) == 36  # both made a new one
        ours = ours._replace(request_id=theirs.request_id)
    if ours.deadline is not None and theirs.deadline is not None:
        assert abs(ours.deadline - theirs.deadline) < 1.0
        ours = ours._replace(deadline=theirs.deadline)
    ours_span = trace.get_current_span(ours.otel_context).get_span_context()
    theirs_span = trace.get_current_span(theirs.otel_context).get_span_context()
    assert ours_span == theirs_span
    assert ours._replace(otel_context=Context()) == theirs._replace(otel_context=Context())


def test_opentelemetry_context_is_set_directly_and_restored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With OpenTelemetry's standard runtime context its variable is set directly; what the
    API reads is the same, and a token reset in the wrong context is logged as before."""
    import contextvars

    from opentelemetry import context as otel_context

    from meshlib.telemetry import propagation

    assert propagation._OTEL_VAR is not None  # the direct path is the one under test
    p = Propagator()
    inbound = p.extract({"traceparent": [f"00-{TRACE_ID}-{SPAN_ID}-01"]}.get)
    before = otel_context.get_current()
    activation = p.activate(inbound)
    assert otel_context.get_current() is inbound.otel_context
    p.deactivate(activation)
    assert otel_context.get_current() is before

    activation = contextvars.copy_context().run(p.activate, inbound)
    with caplog.at_level("ERROR"):
        p.deactivate(activation)  # tokens of another context: logged, never raised
    assert "Failed to detach context" in caplog.text


def test_extract_found_never_raises() -> None:
    """Values no adapter should give (bytes) still give a context: a new request id."""
    inbound = Propagator().extract_found(
        {"traceparent": b"00-x", "x-request-id": b"r"}  # type: ignore[dict-item]
    )
    assert len(inbound.request_id) == 36 and inbound.sampled is None


def test_wsgi_file_and_sized_responses_are_counted_as_sent() -> None:
    """Through a real wsgiref server: a file returned through the server's
    `wsgi.file_wrapper` without a Content-Length is counted as the bytes the server sent, and
    a one-chunk list keeps its len() (the server sets Content-Length from it, PEP 3333)."""
    import io
    import threading
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/file":
            start_response("200 OK", [])
            return environ["wsgi.file_wrapper"](io.BytesIO(b"f" * 50000), 8192)
        start_response("200 OK", [])  # no Content-Length: the server takes len()
        return [b"sized"]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = make_server(
        "127.0.0.1", 0, meshlib.MeshWSGIMiddleware(app, mesh=mesh), handler_class=Quiet
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(base + "/file", timeout=5) as response:
            assert response.read() == b"f" * 50000
        with urllib.request.urlopen(base + "/sized", timeout=5) as response:
            assert response.headers["Content-Length"] == "5"
            assert response.read() == b"sized"
    finally:
        server.shutdown()
        server.server_close()
    assert [(e.path, e.bytes_sent) for e in entries] == [("/file", 50000), ("/sized", 5)]
    mesh.close()


def test_wsgi_write_is_counted_and_an_error_after_it_keeps_the_status() -> None:
    """A body sent through PEP 3333's `write()` counts as sent; once it went out with its
    200, an error from the app's iterable does not turn the request into a 500."""
    import http.client

    from tests.upstream import WsgiServer

    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        write = start_response("200 OK", [])
        write(b"hello from write()\n")
        if environ["PATH_INFO"] == "/raise":

            def failing() -> Any:
                raise RuntimeError("after the body went out")
                yield b""  # pragma: no cover - a generator

            return failing()
        return []

    with WsgiServer(meshlib.MeshWSGIMiddleware(app, mesh=mesh)) as server:
        for path in ("/ok", "/raise"):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200
            assert response.read().startswith(b"hello from write()\n")
            connection.close()
    assert [(e.path, e.response_code, e.bytes_sent) for e in entries] == [
        ("/ok", 200, 19),
        ("/raise", 200, 19),
    ]
    rows = [row for row in mesh.metrics.collect() if row.name == "istio_requests"]
    codes = {s.labels["response_code"] for s in rows[0].samples if s.name.endswith("_total")}
    assert codes == {"200"}
    mesh.close()


@pytest.mark.parametrize("asgi_server", ["uvicorn", "hypercorn"])
def test_the_access_log_has_the_target_as_sent(asgi_server: str) -> None:
    """Envoy logs `%REQ(:PATH)%`, the target as the caller sent it: percent-encoded, with
    the query. Through real uvicorn or hypercorn (ASGI's raw_path) and wsgiref, which keeps
    no raw target: it is rebuilt from the decoded path with SCRIPT_NAME (an app mounted under
    a prefix logs its whole path), so only a decoded `%2F` cannot be told from a `/`; a
    server's RAW_URI (gunicorn) or REQUEST_URI (uWSGI) is the target as sent."""
    import http.client
    from wsgiref.util import shift_path_info

    from tests.upstream import AsgiServer, HypercornServer, WsgiServer

    target = "/api/files/a%2Fb%20c?q=1"
    mesh, entries = logged_mesh()
    seen: list[Any] = []
    server = AsgiServer if asgi_server == "uvicorn" else HypercornServer
    asgi = server(meshlib.MeshMiddleware(ok_app(seen), mesh=mesh), "ratings").start()

    def mounted(environ: dict[str, Any], start_response: Any) -> Any:  # under /api
        start_response("200 OK", [])
        return [b"ok"]

    def dispatcher(environ: dict[str, Any], start_response: Any) -> Any:
        shift_path_info(environ)  # /api moves to SCRIPT_NAME, as a dispatcher does
        return meshlib.MeshWSGIMiddleware(mounted, mesh=mesh)(environ, start_response)

    try:
        with WsgiServer(dispatcher) as wsgi:
            for served, port in enumerate((asgi.port, wsgi.port), 1):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", target)
                assert connection.getresponse().read()
                connection.close()
                deadline = time.monotonic() + 5  # logged as the request ends, maybe just after
                while len(entries) < served and time.monotonic() < deadline:
                    time.sleep(0.005)
    finally:
        asgi.stop()
    assert [entry.path for entry in entries] == [target, "/api/files/a/b%20c?q=1"]

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/files/a/b c", "SCRIPT_NAME": "/api"}
    for key in ("RAW_URI", "REQUEST_URI"):
        body = meshlib.MeshWSGIMiddleware(mounted, mesh=mesh)(
            {**environ, key: target}, lambda *a: None
        )
        body.close()  # type: ignore[attr-defined]
        assert entries[-1].path == target
    # A server that broke PEP 3333 and decoded the path as UTF-8 (not latin-1): logged, as
    # UTF-8 percent-encoded, and the request is served.
    body = meshlib.MeshWSGIMiddleware(mounted, mesh=mesh)(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/caf\u20ac"}, lambda *a: None
    )
    assert b"".join(body) == b"ok"
    body.close()  # type: ignore[attr-defined]
    assert entries[-1].path == "/caf%E2%82%AC"
    mesh.close()


def test_wsgi_chunked_request_body_is_counted_as_read() -> None:
    """A chunked upload has no CONTENT_LENGTH (gunicorn decodes the chunks): the bytes the
    app reads are counted, whichever way it reads them."""
    import io

    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"]
        got = body.readline() + body.read(3) + b"".join(body.readlines()) + body.read()
        start_response("200 OK", [])
        return [got]

    middleware = meshlib.MeshWSGIMiddleware(app, mesh=mesh)
    payload = b"first line\nabcdef\nlast\n"
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/upload",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input": io.BytesIO(payload),
    }
    body = middleware(environ, lambda *a: None)
    assert b"".join(body) == payload
    body.close()  # type: ignore[attr-defined]
    assert entries[-1].bytes_received == len(payload)
    mesh.close()


@pytest.mark.parametrize(
    ("version", "protocol"),
    [
        ("1.0", "HTTP/1.0"),
        ("1.1", "HTTP/1.1"),
        ("2", "HTTP/2"),
        ("3", "HTTP/3"),
        ("HTTP/1.0", "HTTP/1.0"),  # WSGI's SERVER_PROTOCOL
        ("HTTP/2.0", "HTTP/2"),
        ("http/1.1", "HTTP/1.1"),
        (None, "HTTP/1.1"),  # not said: what most requests are
        (b"HTTP/2", "HTTP/2"),  # httpx's response extension
        (11, "HTTP/1.1"),  # urllib3's version
        (True, "HTTP/1.1"),
        ('1.1" 200 - "injected', "HTTP/1.1"),  # never copied into the log line as is
    ],
)
def test_access_log_protocol_is_envoys_spelling(version: object, protocol: str) -> None:
    from meshlib.telemetry.access_log import protocol_of

    assert protocol_of(version) == protocol
