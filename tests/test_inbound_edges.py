"""Inbound edge cases: what the app does to its request, its deadline, and hostile peer headers."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from wsgiref.util import shift_path_info

import pytest

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.config import MeshConfig
from meshlib.dataplane.deadline import inbound_deadline
from meshlib.telemetry import peer
from meshlib.wsgi import MeshWSGIMiddleware
from tests.access_lines import logging_mesh


def logged_mesh() -> tuple[meshlib.Mesh, list[Any]]:
    return logging_mesh(MeshConfig(service="ratings", metrics_port=None))


def _wsgi(middleware: Any, path: str, **extra: str) -> None:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.url_scheme": "http", **extra}
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    list(body)
    body.close()


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    pass


def test_wsgi_access_log_shows_the_request_as_received() -> None:
    """Dispatchers and proxy fixers change `environ` in place; the log keeps what came in."""
    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        shift_path_info(environ)  # what werkzeug's DispatcherMiddleware does
        environ["REMOTE_ADDR"] = "203.0.113.9"  # what ProxyFix does
        environ["REQUEST_METHOD"] = "PUT"  # a method override
        start_response("200 OK", [])
        return [b"ok"]

    with mesh:
        _wsgi(
            MeshWSGIMiddleware(app, mesh=mesh),
            "/api/ratings/1",
            QUERY_STRING="a=1",
            REMOTE_ADDR="10.1.2.3",
            REMOTE_PORT="4567",
            SCRIPT_NAME="",
        )
    (entry,) = entries
    assert (entry.method, entry.path) == ("GET", "/api/ratings/1?a=1")
    assert entry.downstream_remote_address == "10.1.2.3:4567"


def test_asgi_access_log_shows_the_request_as_received() -> None:
    mesh, entries = logged_mesh()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["path"] = "/1"  # a router that rewrites the scope in place
        scope["client"] = ("203.0.113.9", 1)  # a proxy-headers middleware inside
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/ratings/1",
        "scheme": "http",
        "query_string": b"",
        "client": ("10.1.2.3", 4567),
        "headers": [(b"host", b"ratings:9080")],
    }
    with mesh:
        asyncio.run(MeshMiddleware(app, mesh=mesh)(scope, _receive, _send))
    (entry,) = entries
    assert entry.path == "/ratings/1"
    assert entry.downstream_remote_address == "10.1.2.3:4567"


def test_a_deadline_the_app_sets_ends_with_its_request() -> None:
    """An app narrowing its own budget must not leave it to the thread's next request."""
    mesh = meshlib.Mesh(MeshConfig(service="ratings", metrics_port=None), watch=False)
    seen: list[float | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(inbound_deadline.get())
        if environ["PATH_INFO"] == "/tighten":
            inbound_deadline.set(time.monotonic() + 0.01)
        start_response("200 OK", [])
        return [b"ok"]

    with mesh:
        middleware = MeshWSGIMiddleware(app, mesh=mesh)
        _wsgi(middleware, "/tighten")
        _wsgi(middleware, "/next")
    assert seen == [None, None]
    assert inbound_deadline.get() is None


def test_oversized_peer_headers_are_not_kept() -> None:
    """Peer headers longer than the metadata exchange reads count as an unknown peer, and
    the recorder does not keep them: a caller cannot pin memory with distinct huge values."""
    mesh = meshlib.Mesh(MeshConfig(service="ratings", metrics_port=None), watch=False)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = MeshMiddleware(app, mesh=mesh)

    async def main() -> None:
        for i in range(50):
            value = (f"w=x{i};" + "a" * (peer.MAX_HEADER_LENGTH + 10)).encode()
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/",
                "headers": [(b"host", b"r"), (peer.HEADER.encode(), value)],
            }
            await middleware(scope, _receive, _send)

    with mesh:
        asyncio.run(main())
        recorder = middleware._sides.current().recorder
        assert all(
            claimed is None or len(claimed) <= peer.MAX_HEADER_LENGTH
            for claimed, *_ in recorder._cache
        )
        assert len(recorder._memo) == 0  # an unreadable header names no one: not remembered
        unknown = [
            s
            for metric in mesh.registry.collect()
            for s in metric.samples
            if s.name == "istio_requests_total" and s.labels["source_workload"] == "unknown"
        ]
        assert sum(s.value for s in unknown) == 50


def test_an_ipv6_caller_is_logged_in_brackets() -> None:
    """Envoy writes an IPv6 address as `[addr]:port`; `::1:4567` could be read either way."""
    mesh, entries = logged_mesh()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("::1", 4567)}
    with mesh:
        asyncio.run(MeshMiddleware(app, mesh=mesh)(scope, _receive, _send))
        _wsgi(MeshWSGIMiddleware(wsgi_app, mesh=mesh), "/", REMOTE_ADDR="::1", REMOTE_PORT="4568")
    assert [entry.downstream_remote_address for entry in entries] == ["[::1]:4567", "[::1]:4568"]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("http://ratings:9080/ok?q=1", "/ok?q=1"),
        ("https://ratings/", "/"),
        ("http://ratings:9080?q=1", "/?q=1"),
        ("http://ratings:9080", "/"),
        ("/plain?q=1", "/plain?q=1"),
        ("*", "*"),
    ],
)
def test_an_absolute_form_target_is_logged_as_its_path(raw: str, path: str) -> None:
    """A request sent in absolute form (`GET http://host/path`, RFC 9112 §3.2.2) keeps it in
    gunicorn's RAW_URI; the log's path is Envoy's `:path`, the path and query only."""
    mesh, entries = logged_mesh()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    with mesh:
        _wsgi(MeshWSGIMiddleware(app, mesh=mesh), "/ok", RAW_URI=raw)
    (entry,) = entries
    assert entry.path == path
