"""The inbound middleware when things go wrong: app errors, cancellation, protocol misuse,
hostile request headers, and the scopes it must leave alone. Each is served (or re-raised) as
without meshlib, counted once, and leaves no context behind."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry import peer, propagation
from meshlib.telemetry.tracing import MeshSampler, build_tracer_provider
from tests.access_lines import logging_mesh

SAMPLED = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Traced:
    """A Mesh tracing every request into memory, logging every request into a list."""

    def __init__(self, service: str | None = "ratings") -> None:
        self.exporter = InMemorySpanExporter()
        config = MeshConfig(service=service, metrics_port=None)
        self.provider: TracerProvider = build_tracer_provider(
            config, self.exporter, sampler=MeshSampler(100.0), batch=False
        )
        self.mesh, self.logged = logging_mesh(config, tracer_provider=self.provider)

    def counted(self) -> list[tuple[str, str, str, float]]:
        """(response_code, response_flags, destination_service, count) per series."""
        (family,) = [m for m in self.mesh.metrics.collect() if m.name == "istio_requests"]
        return [
            (
                s.labels["response_code"],
                s.labels["response_flags"],
                s.labels["destination_service"],
                s.value,
            )
            for s in family.samples
            if s.name.endswith("_total")
        ]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def close(self) -> None:
        self.mesh.close()
        self.provider.shutdown()


@pytest.fixture
def traced() -> Iterator[Traced]:
    setup = Traced()
    yield setup
    setup.close()


def scope(headers: list[tuple[bytes, bytes]], kind: str = "http") -> dict[str, Any]:
    return {
        "type": kind,
        "method": "GET",
        "path": "/ratings/1",
        "scheme": "http",
        "query_string": b"",
        "client": ("10.1.2.3", 4567),
        "headers": headers,
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class StrictSend:
    """What an ASGI server's send does: records messages, refuses a second response start."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and any(
            m["type"] == "http.response.start" for m in self.messages
        ):
            raise RuntimeError("response already started")
        self.messages.append(message)


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_environ(**extra: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/r", "wsgi.url_scheme": "http", **extra}


# -- hostile request headers ---------------------------------------------------------------


@pytest.mark.parametrize("host", [b"ratings:\xb2", b"[::1]:\xb9", b"ratings:\xb2\xb3"])
def test_a_host_port_of_non_ascii_digits_is_served(traced: Traced, host: bytes) -> None:
    """'²' passes `str.isdigit()` but not `int()`: a Latin-1 Host like `ratings:\\xb2`
    with a sampled caller once failed the request before the app ran (ASGI and WSGI)."""
    send = StrictSend()
    middleware = meshlib.MeshMiddleware(ok, mesh=traced.mesh)
    asyncio.run(middleware(scope([(b"host", host), (b"traceparent", SAMPLED)]), receive, send))
    assert send.messages[0]["status"] == 200

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    environ = wsgi_environ(HTTP_HOST=host.decode("latin-1"), HTTP_TRACEPARENT=SAMPLED.decode())
    body = meshlib.MeshWSGIMiddleware(app, mesh=traced.mesh)(environ, lambda *a: None)
    assert list(body) == [b"ok"]
    body.close()  # type: ignore[attr-defined]
    assert [(code, n) for code, _, _, n in traced.counted()] == [("200", 2.0)]
    assert len(traced.spans()) == 2 and len(traced.logged) == 2
    assert propagation.current.get() is None


def test_a_duplicated_traceparent_starts_a_new_trace() -> None:
    """Two traceparent headers are an invalid one (as a proxy joining them makes it, and as
    WSGI servers hand it over): a new trace starts, the same for ASGI and WSGI."""
    mesh = meshlib.Mesh(MeshConfig(service="ratings", metrics_port=None), watch=False)
    other = b"00-11111111111111111111111111111111-2222222222222222-01"
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(dict(mesh.propagator.outbound(lambda name: False)).get("traceparent"))
        await ok(scope, receive, send)

    headers = [(b"host", b"r"), (b"traceparent", SAMPLED), (b"traceparent", other)]
    asyncio.run(meshlib.MeshMiddleware(app, mesh=mesh)(scope(headers), receive, StrictSend()))
    (sent,) = seen
    assert sent is None or ("4bf92f35" not in sent and "11111111" not in sent)
    mesh.close()


# -- app errors and cancellation -----------------------------------------------------------


def test_an_asgi_app_error_is_counted_as_500_and_reraised(traced: Traced) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    middleware = meshlib.MeshMiddleware(app, mesh=traced.mesh)
    request = scope([(b"host", b"r"), (b"traceparent", SAMPLED)])
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(middleware(request, receive, StrictSend()))
    assert [(code, flags, n) for code, flags, _, n in traced.counted()] == [("500", "-", 1.0)]
    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
    assert traced.logged[0].response_code == 500
    assert propagation.current.get() is None


def test_a_second_response_start_keeps_the_status_sent(traced: Traced) -> None:
    """The server refuses a second `http.response.start`; the status the client got (the
    first) is the one counted, not the one the app tried to send after it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.start", "status": 503, "headers": []})

    middleware = meshlib.MeshMiddleware(app, mesh=traced.mesh)
    with pytest.raises(RuntimeError, match="already started"):
        asyncio.run(middleware(scope([(b"host", b"r")]), receive, StrictSend()))
    assert [(code, n) for code, _, _, n in traced.counted()] == [("200", 1.0)]
    assert traced.logged[0].response_code == 200


def test_a_cancelled_request_is_counted_with_flag_dc(traced: Traced) -> None:
    """A request whose task is cancelled (its caller went away) is recorded as Envoy records
    an abandoned request — the status sent so far (0 if none) and flag DC — its span ended and
    its context restored; the cancellation propagates."""
    started: list[asyncio.Event] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/streaming":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        started[-1].set()
        await asyncio.sleep(3600)

    middleware = meshlib.MeshMiddleware(app, mesh=traced.mesh)

    async def main(path: str) -> None:
        started.append(asyncio.Event())
        request = scope([(b"host", b"r"), (b"traceparent", SAMPLED)])
        request["path"] = path
        task = asyncio.create_task(middleware(request, receive, StrictSend()))
        await started[-1].wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert propagation.current.get() is None

    asyncio.run(main("/waiting"))
    asyncio.run(main("/streaming"))
    assert sorted((code, flags, n) for code, flags, _, n in traced.counted()) == [
        ("0", "DC", 1.0),
        ("200", "DC", 1.0),
    ]
    assert len(traced.spans()) == 2
    assert sorted((e.response_code, e.response_flags) for e in traced.logged) == [
        (0, "DC"),
        (200, "DC"),
    ]


class Body:
    """A WSGI response iterable that may fail, and records its close()."""

    def __init__(self, chunks: list[bytes], fail_after: int | None) -> None:
        self.chunks, self.fail_after, self.closed = chunks, fail_after, False

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_after:
                raise OSError("disk gone")
            yield chunk

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("fail_after", "code"),
    [(0, "500"), (1, "200")],
    ids=["before-any-body", "mid-body"],
)
def test_a_wsgi_iterable_that_raises_is_recorded_and_closed(
    traced: Traced, fail_after: int, code: str
) -> None:
    """An error while the server iterates the response: the app's close() still runs, the
    span records the exception, and the status counted is what the client got — 500 when no
    body was sent yet (the server answers it), else the status already sent."""
    body = Body([b"a", b"b"], fail_after)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return body

    environ = wsgi_environ(HTTP_TRACEPARENT=SAMPLED.decode())
    response = meshlib.MeshWSGIMiddleware(app, mesh=traced.mesh)(environ, lambda *a: None)
    with pytest.raises(OSError, match="disk gone"):
        list(response)
    response.close()  # type: ignore[attr-defined]
    assert body.closed
    assert [(c, n) for c, _, _, n in traced.counted()] == [(code, 1.0)]
    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert propagation.current.get() is None


def test_a_wsgi_app_error_is_counted_as_500_and_reraised(traced: Traced) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise KeyError("gone")

    with pytest.raises(KeyError):
        meshlib.MeshWSGIMiddleware(app, mesh=traced.mesh)(wsgi_environ(), lambda *a: None)
    assert [(c, n) for c, _, _, n in traced.counted()] == [("500", 1.0)]
    assert propagation.current.get() is None


# -- what passes through ---------------------------------------------------------------------


def test_websocket_scopes_pass_through_untouched(traced: Traced) -> None:
    """The app gets the server's own receive and send, nothing is counted or traced."""
    got: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append((scope, receive, send))

    send = StrictSend()
    request = scope([(b"host", b"r"), (b"traceparent", SAMPLED)], kind="websocket")
    asyncio.run(meshlib.MeshMiddleware(app, mesh=traced.mesh)(request, receive, send))
    assert got == [(request, receive, send)]
    assert traced.counted() == [] and traced.spans() == [] and traced.logged == []


def test_lifespan_scopes_pass_through(traced: Traced) -> None:
    """A lifespan scope reaches the app with the server's own receive, and every message the
    app sends reaches the server unchanged and in order (the shutdown's after a flush of the
    spans batched); nothing is counted or traced."""
    got: list[tuple[Any, Any]] = []
    messages = [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.failed", "message": "a pool would not close"},
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append((scope, receive))
        for message in messages:
            await send(message)

    send = StrictSend()
    request = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    asyncio.run(meshlib.MeshMiddleware(app, mesh=traced.mesh)(request, receive, send))
    assert got == [(request, receive)]
    assert send.messages == messages
    assert traced.counted() == [] and traced.spans() == [] and traced.logged == []


def test_a_streamed_response_passes_through_as_sent(traced: Traced) -> None:
    """Body messages reach the server one by one, in order and unchanged; the response bytes
    are their sum; for a meshed caller the identity header is added once, to a copy of the
    app's headers."""
    headers = [(b"content-type", b"text/plain")]
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    chunks = [b"one", b"", b"three", b"four"]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    send = StrictSend()
    meshed_caller = scope([(peer.HEADER.encode(), b"w=reviews-v2;n=bookinfo")])
    asyncio.run(meshlib.MeshMiddleware(app, mesh=traced.mesh)(meshed_caller, receive, send))
    first, *bodies = send.messages
    assert first["headers"] == [*headers, (peer.HEADER.encode(), traced.mesh.identity.encode())]
    assert start["headers"] == headers  # the app's message is not changed
    assert [m["body"] for m in bodies] == chunks
    assert [m["more_body"] for m in bodies] == [True, True, True, False]
    assert traced.logged[0].bytes_sent == sum(map(len, chunks))


def test_an_unnamed_workload_is_the_unknown_destination_service() -> None:
    """Without a service or workload name, destination_service is Istio's `unknown` (not
    an invented `unknown.<namespace>.svc...` name)."""
    setup = Traced(service=None)
    try:
        asyncio.run(meshlib.MeshMiddleware(ok, mesh=setup.mesh)(scope([]), receive, StrictSend()))
        assert [(service, n) for _, _, service, n in setup.counted()] == [("unknown", 1.0)]
    finally:
        setup.close()


def test_absurd_numbers_in_request_headers_are_ignored(traced: Traced) -> None:
    """A Content-Length of thousands of digits (Python's `int` refuses them) and a
    `grpc-timeout` of 99,999,999 hours (a socket timeout that large overflows) are served as
    without meshlib: the size counts as unknown, the deadline is taken as 30 days."""
    from meshlib.dataplane.deadline import inbound_deadline

    seen: list[float | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(inbound_deadline.get())
        start_response("200 OK", [])
        return [b"ok"]

    environ = wsgi_environ(CONTENT_LENGTH="9" * 4400, HTTP_GRPC_TIMEOUT="99999999H")
    body = meshlib.MeshWSGIMiddleware(app, mesh=traced.mesh)(environ, lambda *a: None)
    assert list(body) == [b"ok"]
    body.close()  # type: ignore[attr-defined]
    assert [(code, n) for code, _, _, n in traced.counted()] == [("200", 1.0)]
    (deadline,) = seen
    assert deadline is not None and deadline - time.monotonic() <= 30 * 86400


def test_no_exception_is_left_being_handled(traced: Traced) -> None:
    """After an app error, a cancellation or a malformed header, nothing is left as the
    exception being handled (`sys.exc_info()`): compiled code that left one there would hand it
    on as the `__context__` of any later exception in the thread (mypyc's build of an async
    `try/except` around awaits did, in an experiment with the data plane)."""
    import sys

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("the app's bug")

    async def waiting(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    async def answering(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        with pytest.raises(KeyError):
            await meshlib.MeshMiddleware(failing, mesh=traced.mesh)(
                scope([]), receive, StrictSend()
            )
        assert sys.exc_info() == (None, None, None)
        task = asyncio.create_task(
            meshlib.MeshMiddleware(waiting, mesh=traced.mesh)(scope([]), receive, StrictSend())
        )
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sys.exc_info() == (None, None, None)
        for header in (b"traceparent", b"b3", b"x-b3-traceid", b"grpc-timeout", b"baggage"):
            request = scope([(header, b"\xff garbage")])
            await meshlib.MeshMiddleware(answering, mesh=traced.mesh)(
                request, receive, StrictSend()
            )
        assert sys.exc_info() == (None, None, None)

    asyncio.run(main())


# -- after the response: background work, span processors, PEP 3333's exc_info ---------------


@pytest.mark.parametrize("after", ["raises", "cancelled"])
def test_what_the_app_does_after_the_whole_response_does_not_change_it(
    traced: Traced, after: str
) -> None:
    """Work after the last body message (a Starlette BackgroundTask) that raises or is
    cancelled (the server stopping) does not turn the answer the caller got into a 500 or a
    DC, and the request's duration ends when its response did, as Envoy's does."""
    background = 0.3

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await asyncio.sleep(background)  # the background task
        raise RuntimeError("the background task failed")

    async def serve() -> None:
        task = asyncio.create_task(
            meshlib.MeshMiddleware(app, mesh=traced.mesh)(
                scope([(b"traceparent", SAMPLED)]), receive, StrictSend()
            )
        )
        if after == "cancelled":
            await asyncio.sleep(background / 2)
            task.cancel()
        with pytest.raises((RuntimeError, asyncio.CancelledError)):
            await task

    asyncio.run(serve())
    assert [(code, flags) for code, flags, _, _ in traced.counted()] == [("200", "-")]
    (entry,) = traced.logged
    assert (entry.response_code, entry.response_flags, entry.bytes_sent) == (200, "-", 2)
    assert entry.duration < background * 1000 / 2
    (row,) = [
        m for m in traced.mesh.metrics.collect() if m.name == "istio_request_duration_milliseconds"
    ]
    (total,) = [s.value for s in row.samples if s.name.endswith("_sum")]
    assert total < background * 1000 / 2
    # The SERVER span too: it ends with the response, and the caller's good answer is no error.
    (span,) = traced.spans()
    assert span.end_time is not None and span.start_time is not None
    assert (span.end_time - span.start_time) / 1e6 < background * 1000 / 2
    assert span.status.status_code is not StatusCode.ERROR and not span.events


def test_a_caller_gone_ends_the_request_when_it_left(traced: Traced) -> None:
    """A long poll: the app learns from `http.disconnect` that its caller left, then spends
    a while cleaning up. The request is DC, and its duration and span end when the caller
    left, as Envoy ends the stream at the reset, not when the app returns."""
    cleanup = 0.4

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.disconnect"
        await asyncio.sleep(cleanup)

    served = scope([(b"traceparent", SAMPLED)])
    asyncio.run(meshlib.MeshMiddleware(app, mesh=traced.mesh)(served, gone, StrictSend()))
    (entry,) = traced.logged
    assert (entry.response_code, entry.response_flags) == (0, "DC")
    assert entry.duration < cleanup * 1000 / 2
    (span,) = traced.spans()
    assert span.end_time is not None and span.start_time is not None
    assert (span.end_time - span.start_time) / 1e6 < cleanup * 1000 / 2


class FailingProcessor(SimpleSpanProcessor):
    """An app's span processor with a bug: ending a span raises."""

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("exporter bug")


def test_a_span_processor_failing_loses_nothing(traced: Traced) -> None:
    """When ending the SERVER span raises (an app's processor or exporter), the request is
    still counted and logged, the middleware does not fail, and neither the request's context
    nor its deadline stays current in the thread that served it (a WSGI worker serves the
    next request there)."""
    traced.provider.add_span_processor(FailingProcessor(InMemorySpanExporter()))
    sampled = [(b"traceparent", SAMPLED), (b"x-envoy-expected-rq-timeout-ms", b"5000")]
    asyncio.run(meshlib.MeshMiddleware(ok, mesh=traced.mesh)(scope(sampled), receive, StrictSend()))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    environ = wsgi_environ(
        HTTP_TRACEPARENT=SAMPLED.decode(), HTTP_X_ENVOY_EXPECTED_RQ_TIMEOUT_MS="5000"
    )
    body = meshlib.MeshWSGIMiddleware(app, mesh=traced.mesh)(environ, lambda *a: None)
    assert b"".join(body) == b"ok"
    body.close()  # type: ignore[attr-defined]
    assert [(code, count) for code, _, _, count in traced.counted()] == [("200", 2.0)]
    assert len(traced.logged) == 2
    assert propagation.current.get() is None
    assert not trace.get_current_span().get_span_context().is_valid
    assert "traceparent" not in traced.mesh.propagator.outbound(lambda name: False)


def test_a_wsgi_error_after_the_headers_went_out_keeps_the_status_sent() -> None:
    """PEP 3333: an app that fails mid-body calls start_response again with exc_info; once the
    headers are sent the server re-raises it, and the caller keeps the 200 it got (the access
    log and metrics say 200, not the 500 the second call names). Served by wsgiref on
    loopback."""
    mesh, logged = logging_mesh(MeshConfig(service="ratings", metrics_port=None))

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        write = start_response("200 OK", [("content-type", "text/plain")])
        write(b"first chunk\n")
        try:
            raise ValueError("failed mid-body")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"never sent"]

    server = make_server(
        "127.0.0.1", 0, meshlib.MeshWSGIMiddleware(app, mesh=mesh), handler_class=QuietHandler
    )
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_port)) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: ratings\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        thread.join(10)
        server.server_close()
    assert answer.startswith(b"HTTP/1.0 200 OK") and b"first chunk" in answer
    (entry,) = logged
    assert entry.response_code == 200
    rows = [m for m in mesh.metrics.collect() if m.name == "istio_requests"]
    assert [s.labels["response_code"] for s in rows[0].samples if s.name.endswith("_total")] == [
        "200"
    ]
    mesh.close()


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # wsgiref's own access line


def test_a_file_sent_by_pathsend_is_the_whole_response(traced: Traced, tmp_path: Any) -> None:
    """ASGI's pathsend extension (the server sends a file as the body, Starlette's
    FileResponse under servers that offer it): the response is whole once it is sent, its
    bytes are the file's, and the caller leaving after that is not DC."""
    sent_file = tmp_path / "report.pdf"
    sent_file.write_bytes(b"%PDF" * 100)
    messages = iter(
        [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    )

    async def receive_then_leave() -> dict[str, Any]:
        return next(messages)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": str(sent_file)})
        assert (await receive())["type"] == "http.disconnect"

    request = {**scope([]), "extensions": {"http.response.pathsend": {}}}
    send = StrictSend()
    asyncio.run(meshlib.MeshMiddleware(app, mesh=traced.mesh)(request, receive_then_leave, send))
    assert [m["type"] for m in send.messages][-1] == "http.response.pathsend"
    assert [(code, flags) for code, flags, _, _ in traced.counted()] == [("200", "-")]
    (entry,) = traced.logged
    assert (entry.response_code, entry.response_flags, entry.bytes_sent) == (200, "-", 400)


def test_a_send_failing_with_oserror_is_dc_with_the_bytes_sent(traced: Traced) -> None:
    """ASGI 2.4: once the caller is gone the server raises an OSError from send() (Starlette's
    StreamingResponse relies on it and stops listening for http.disconnect). The request is
    Envoy's DC with the bytes sent before the failed chunk, and the error propagates."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if sum(m["type"] == "http.response.body" for m in sent) == 2:
            raise ConnectionResetError("the caller is gone")  # an OSError
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(5):
            await send({"type": "http.response.body", "body": b"x" * 9, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    spec = {**scope([]), "asgi": {"version": "3.0", "spec_version": "2.4"}}
    with pytest.raises(ConnectionResetError):
        asyncio.run(meshlib.MeshMiddleware(app, mesh=traced.mesh)(spec, receive, send))
    (line,) = traced.logged
    assert (line.response_code, line.response_flags, line.bytes_sent) == (200, "DC", 18)
    assert [(c, f) for c, f, _, _ in traced.counted()] == [("200", "DC")]


@pytest.mark.parametrize(
    "middleware", [meshlib.MeshMiddleware, meshlib.MeshWSGIMiddleware], ids=["asgi", "wsgi"]
)
@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param("mesh.yaml", id="a-policy-file"),
        pytest.param(meshlib.default_mesh, id="uncalled"),
    ],
)
def test_a_mesh_that_is_not_a_mesh_is_refused_when_the_middleware_is_made(
    middleware: Any, mesh: Any
) -> None:
    """`mesh=` given a policy file's name, or `default_mesh` uncalled, is a TypeError naming
    the Mesh it wants when the middleware is made, not an AttributeError on the first request
    (the compiled build's own argument check says as much)."""

    def app(*args: Any) -> Any:  # never called
        raise AssertionError("served")

    with pytest.raises(TypeError, match="Mesh"):
        middleware(app, mesh=mesh)
