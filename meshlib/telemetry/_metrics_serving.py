"""Serving the scrape over HTTP: the metrics port, and apps to mount in a WSGI or ASGI server.

`serve_metrics` is meshlib's counterpart of Istio's merged-metrics port (15020): a small
threaded HTTP server of the standard library answering `/metrics` and `/stats/prometheus`,
which a Mesh starts on `MeshConfig.metrics_port` and a gunicorn master can start from its
`when_ready` hook. `metrics_wsgi_app` and `metrics_asgi_app` answer the same from inside the
app, on any path it mounts them at. All three serve `exposed_registry(registry)` (in
multiprocess mode, every worker's merged view) as `render` writes it, gzipped at the fastest
level when the scraper takes it. Their public home is `meshlib.telemetry.metrics`
(docs/observability.md, section 4).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from meshlib._text import ascii_int, host_port
from meshlib.config import DEFAULT_METRICS_PORT
from meshlib.telemetry._metrics_exposition import CONTENT_TYPE, render
from meshlib.telemetry._metrics_multiprocess import exposed_registry

__all__ = ["MetricsServer", "metrics_asgi_app", "metrics_wsgi_app", "serve_metrics"]

METRICS_PATHS = ("/metrics", "/stats/prometheus")


def _gzip_accepted(accept_encoding: str | None) -> bool:
    """Whether the scraper takes gzip (Prometheus sends `Accept-Encoding: gzip`)."""
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            name, _, quality = params.partition("=")
            if name.strip().lower() != "q":
                return True
            try:
                return float(quality) > 0  # q=0: refused
            except ValueError:
                return False
    return False


def _scrape(
    source: CollectorRegistry, accept_encoding: str | None
) -> tuple[bytes, list[tuple[str, str]]]:
    """A scrape's body and headers (but Content-Length), gzipped when the scraper takes it:
    each line repeats 25 labels, so gzip's fastest level makes it some 60 times smaller, in
    less time than rendering takes."""
    payload = render(source)
    headers = [("Content-Type", CONTENT_TYPE)]
    if _gzip_accepted(accept_encoding):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
    return payload, headers


class _Handler(BaseHTTPRequestHandler):
    """Answers the metrics paths with what its server's `source` holds; 404 elsewhere."""

    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle kept-alive connection (and its thread) goes after this long
    server: _Server

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        self._skip_body()
        if urlsplit(self.path).path not in METRICS_PATHS:  # origin or absolute form
            status, payload = 404, b"not found\n"
            headers = [("Content-Type", "text/plain; charset=utf-8")]
        else:
            status = 200
            payload, headers = _scrape(self.server.source, self.headers.get("Accept-Encoding"))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _skip_body(self) -> None:
        """A scrape has no body; one sent anyway is read (a small one) or ends the connection,
        so it is not taken for the next request."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            return
        length = self.headers.get("Content-Length")
        if length is not None:
            size = ascii_int(length.strip(), 9)
            if size is None or size > _MAX_SCRAPE_BODY:
                self.close_connection = True
            elif size:
                self.rfile.read(size)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood stderr


_MAX_SCRAPE_BODY = 65_536


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], source: CollectorRegistry) -> None:
        self.source = source
        self._open: set[socket.socket] = set()  # connections being served (kept alive)
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a scraper gone, or a connection ended by close(): nothing to report
        super().handle_error(request, client_address)

    def end_connections(self) -> None:
        """End the connections still open: a closed server answers no more scrapes, on
        kept-alive connections either (they would read a Mesh that is gone)."""
        with self._open_lock:
            open_now = list(self._open)
        for request in open_now:
            with contextlib.suppress(OSError):  # already gone
                request.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A small threaded HTTP server answering `/metrics` and `/stats/prometheus`.

    Closing it (`close()`, calling it, or leaving its `with` block) stops the server.
    """

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._serving = thread
        self.host: str = server.server_address[0]  # type: ignore[assignment]
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{host_port(self.host, self.port)}"

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.end_connections()
        self._serving.join(timeout=5)

    def __call__(self) -> None:
        self.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_metrics(
    port: int = DEFAULT_METRICS_PORT,
    registry: CollectorRegistry | None = None,
    *,
    host: str = "0.0.0.0",
) -> MetricsServer:
    """Serve `exposed_registry(registry)` on `host:port` (0 picks a free port), like Istio's 15020.

    Under a multi-worker server only one process can hold the port: start it from the master
    (gunicorn's `when_ready` hook) in multiprocess mode, or mount `metrics_wsgi_app` /
    `metrics_asgi_app` in the app, which every worker answers with the merged view.
    """
    source = exposed_registry(registry)
    try:
        server = (_Server6 if ":" in host else _Server)((host, port), source)
    except OSError as exc:
        # The socket's own error names no address; this one often ends a process (a gunicorn
        # master's when_ready hook), so say which. OSError(errno, ...) keeps its subclass.
        raise OSError(
            exc.errno, f"meshlib: cannot serve metrics on {host_port(host, port)}: {exc.strerror}"
        ) from exc
    thread = threading.Thread(
        target=server.serve_forever, name="meshlib-metrics", kwargs={"poll_interval": 0.2}
    )
    thread.daemon = True
    thread.start()
    return MetricsServer(server, thread)


WSGIStartResponse = Callable[..., Any]
ASGIReceive = Callable[[], Any]
ASGISend = Callable[[dict[str, Any]], Any]


def metrics_wsgi_app(
    registry: CollectorRegistry | None = None,
) -> Callable[[dict[str, Any], WSGIStartResponse], list[bytes]]:
    """A WSGI app answering GET (any path: mount it where you like) with the metrics."""
    source = exposed_registry(registry)

    def app(environ: dict[str, Any], start_response: WSGIStartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        payload, headers = _scrape(source, environ.get("HTTP_ACCEPT_ENCODING"))
        start_response("200 OK", [*headers, ("Content-Length", str(len(payload)))])
        return [b"" if method == "HEAD" else payload]

    return app


def metrics_asgi_app(
    registry: CollectorRegistry | None = None,
) -> Callable[[dict[str, Any], ASGIReceive, ASGISend], Any]:
    """An ASGI app answering GET (any path: mount it where you like) with the metrics.

    Rendering runs on the event loop, as prometheus-client's own ASGI app does: a few
    milliseconds per scrape for a typical workload.
    """
    source = exposed_registry(registry)

    async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            status, payload = 405, b""
            headers = [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]
        else:
            accept = b",".join(v for k, v in scope.get("headers", ()) if k == b"accept-encoding")
            payload, found = _scrape(source, accept.decode("latin-1"))
            status = 200
            headers = [(name.lower().encode(), value.encode()) for name, value in found]
            headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})

    return app
