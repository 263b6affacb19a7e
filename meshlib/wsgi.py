"""`MeshWSGIMiddleware`: the mesh's inbound side for WSGI apps (Flask, Django, ...).

    flask_app.wsgi_app = meshlib.MeshWSGIMiddleware(flask_app.wsgi_app)

The caller's context is current while the app runs and while each chunk of the response is
produced (a streaming generator still sees it), in a `contextvars.Context` of the request's
own: nothing of it is left in the server's thread between chunks or after the response. The
request ends when the server has taken the last chunk, or at `close()` if that comes first
(servers that never call `close()`, such as uvicorn's WSGI interface and asgiref's
`WsgiToAsgi`, still count it); `close()` always reaches the app's iterable. An exception
from the app, or from its iterable before any body was sent, is counted as the 500 the
server answers and recorded on the span. A response with a length keeps it (servers set
Content-Length from `len()`). A file the app returns through the server's
`wsgi.file_wrapper` is iterated by the server through the middleware, not sent with
sendfile: what was sent, and a caller leaving midway, can then be counted exactly.

The response bytes counted are those the server sends, as Envoy counts them: a chunk once
the server has written it (it asks for the next one, or its `write()` returned), none for a
204, a 304 or a 1xx, and no more than a declared Content-Length (gunicorn and waitress drop
the rest, RFC 9110 §8.6). A `write()` the server fails because the caller went away (an
`OSError`, waitress's `ClientDisconnected`) is counted as Envoy's DC, with what was sent
before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import Context, copy_context
from typing import Any
from urllib.parse import quote

from meshlib._inbound import InboundExchange, InboundSide, InboundSides, django_route
from meshlib._text import ascii_int, host_port
from meshlib.mesh import Mesh, given_mesh
from meshlib.telemetry import peer, threads

StartResponse = Callable[..., Any]
# The two request headers WSGI (CGI) names without the HTTP_ prefix.
_CGI_NAMES = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
# The metadata-exchange headers, by name and as WSGI spells them.
_EXCHANGE = tuple(
    (name, "HTTP_" + name.upper().replace("-", "_")) for name in peer.EXCHANGE_HEADERS
)


class MeshWSGIMiddleware:
    """Serve a WSGI app inside the mesh."""

    def __init__(self, app: WSGIApp, mesh: Mesh | None = None) -> None:
        self.app = app
        self._sides = InboundSides(given_mesh(mesh, "meshlib.MeshWSGIMiddleware"))
        threads.install()  # context follows work into thread pools and threads

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # The request's context lives in a Context of its own, entered while the app runs and
        # while each chunk is produced: the server's thread never keeps it, whether or not
        # the server calls close().
        context = copy_context()
        return context.run(self._serve, context, environ, start_response)

    def _serve(
        self, context: Context, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        side = self._sides.current()
        exchange = _Exchange(side, environ)
        # Only a meshed caller (it sent its identity) gets ours, in its form, as with Istio's
        # sidecars.
        identity = side.wsgi_answers[exchange.answer] or None

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if identity is not None:
                # Set, not added: one the app relayed (an upstream's) is replaced, as Istio's
                # metadata exchange sets its own. A copy: the app may reuse its list.
                headers = peer.with_identity(headers, identity)
            # First: once the headers went out, the server re-raises `exc_info` here (PEP 3333)
            # and the caller keeps the status it got.
            write = start_response(status, headers, exc_info)
            try:
                exchange.status = int(status.split(" ", 1)[0])
            except ValueError:
                exchange.status = 0
            exchange.body_limit = _body_limit(exchange.status, headers)
            exchange._write = write
            if exchange.routing:
                # While the framework still holds its request: Flask lets go of it, and
                # Django of its URLconf, before the response's body is read, and the span
                # ends after that. Django has set PATH_INFO to the path it resolves.
                exchange.rule = _flask_rule(environ) or django_route(environ.get("PATH_INFO", "/"))
            return exchange.write

        length = environ.get("CONTENT_LENGTH")
        if length:
            exchange.request_bytes = ascii_int(length, 19) or 0
        elif "HTTP_TRANSFER_ENCODING" in environ and "wsgi.input" in environ:
            # A chunked body (gunicorn decodes it): counted as the app reads it.
            environ["wsgi.input"] = _CountedInput(environ["wsgi.input"], exchange)
        exchange.begin()
        try:
            iterable = self.app(environ, start)
        except BaseException as exc:  # an app error (500) or the worker stopping (DC)
            if isinstance(exc, Exception) and not exchange.headers_sent:
                exchange.status = 500  # what the server answers, whatever start_response said
            exchange.end(exc)
            raise
        if hasattr(iterable, "__len__"):
            return _SizedClosing(iterable, exchange, context)
        return _Closing(iterable, exchange, context)


class _Exchange(InboundExchange):
    """One WSGI request, read from its environ."""

    __slots__ = ("_write", "body_limit", "environ", "headers_sent", "rule")

    def __init__(self, side: InboundSide, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.headers_sent = False  # by write() or with a chunk: an error after it is no 500
        self.body_limit: int | None = None  # the most body bytes the server sends
        self._write: Callable[[bytes], Any] = _unstarted
        self.rule: str | None = None  # the framework's route, for a sampled request
        super().__init__(side)

    def _exchanged(self) -> dict[str, str]:
        # Read, then removed from what the app sees, as Istio does: one pass does both.
        found = {}
        for name, key in _EXCHANGE:
            value = self.environ.pop(key, None)
            if isinstance(value, str):
                found[name] = value
        return found

    def end(self, error: BaseException | None = None) -> None:
        # The bytes were counted as the app gave them; the server sent no more than this.
        limit = self.body_limit
        if limit is not None:
            self.response_bytes = min(self.response_bytes, limit)
            dropped = self.dropped
            if dropped is not None and dropped[1] > limit:
                self.dropped = (dropped[0], limit, dropped[2])
        super().end(error)

    def broke_off(self, error: BaseException | None) -> bool:
        # The headers went (with a chunk, or by write()) and then the app failed: the server
        # drops the connection, and the caller has it all only if the body had its length.
        if error is None or not self.headers_sent:
            return False
        limit = self.body_limit
        return not (self.method() == "HEAD" or (limit is not None and self.response_bytes >= limit))

    def route(self) -> str | None:
        return self.rule

    def get_all(self, name: str) -> list[str] | None:
        key = _CGI_NAMES.get(name) or "HTTP_" + name.upper().replace("-", "_")
        value = self.environ.get(key)
        return [value] if isinstance(value, str) else None

    def request_line(self) -> tuple[str, str, str, str]:
        environ = self.environ
        return (
            environ.get("REQUEST_METHOD", "GET"),
            _path(environ),
            environ.get("wsgi.url_scheme", "http"),
            environ.get("HTTP_HOST", ""),
        )

    def method(self) -> str:
        return self.environ.get("REQUEST_METHOD", "GET")  # type: ignore[no-any-return]

    def listener(self) -> tuple[object, int | None]:
        environ = self.environ
        port = environ.get("SERVER_PORT")
        return environ.get("SERVER_PROTOCOL"), ascii_int(port, 5) if isinstance(port, str) else None

    def target(self) -> str:
        environ = self.environ
        # As sent, where the server keeps it (gunicorn's RAW_URI, uWSGI's REQUEST_URI); else
        # rebuilt from the decoded path as wsgiref does.
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if isinstance(raw, str) and raw:
            return _origin_form(raw)
        path = _path(environ)
        try:
            path = quote(path, safe="/;=,", encoding="latin-1")  # PEP 3333's bytes-as-latin-1
        except UnicodeEncodeError:  # a server that decoded the path otherwise: UTF-8
            path = quote(path, safe="/;=,")
        query = environ.get("QUERY_STRING")
        return f"{path}?{query}" if query else path

    def write(self, data: bytes) -> Any:
        """The app's `write()` (PEP 3333's imperative body): counted as the iterable's."""
        if not self.headers_sent and self.logged:
            self.answered = time.perf_counter()  # the server sends the headers first
        try:
            result = self._write(data)  # the server's: it sends the headers first
        except Exception as exc:
            if not _caller_gone(exc):
                raise
            if self.dropped is None:  # Envoy's DC, with what the caller had
                self.dropped = (self.status, self.response_bytes, time.perf_counter())
            raise
        self.headers_sent = True
        self.response_bytes += len(data)
        return result

    def origin(self) -> tuple[str | None, str]:
        environ = self.environ
        address = environ.get("REMOTE_ADDR")
        port = environ.get("REMOTE_PORT")
        client = (host_port(address, port) if port else address) if address else None
        return client, environ.get("QUERY_STRING", "")


def _flask_rule(environ: dict[str, Any]) -> str | None:
    """The URL rule Flask (werkzeug's routing) matched the request by, `/reviews/<int:id>`,
    as OpenTelemetry's Flask instrumentation names it; None for another framework."""
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) and rule.startswith("/") else None


def _caller_gone(error: Exception) -> bool:
    """Whether the server's `write()` failed because the caller went away: an `OSError` from
    the socket (gunicorn, wsgiref), or waitress's `ClientDisconnected` (not an `OSError`)."""
    return isinstance(error, OSError) or type(error).__name__ == "ClientDisconnected"


def _body_limit(status: int, headers: list[tuple[str, str]]) -> int | None:
    """The most body bytes a server sends with this response (RFC 9110 §6.4.1, §8.6): none
    for a 1xx, 204 or 304, the Content-Length when one is declared; None: no limit."""
    if status < 200 or status in (204, 304):
        return 0
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":  # len: no lower() for most
            return ascii_int(value.strip(), 19)
    return None


def _origin_form(target: str) -> str:
    """The request target as Envoy's `:path` holds it: an absolute-form target
    (`http://host/path?q`, RFC 9112 §3.2.2) reduced to its path and query."""
    if target.startswith("/"):
        return target
    scheme, found, rest = target.partition("://")
    if not found or not scheme.isalpha():
        return target  # `*`, or not a URL: as sent
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path.startswith("/") else "/" + path


def _path(environ: dict[str, Any]) -> str:
    """The request's path, decoded, with the prefix the app is mounted under (SCRIPT_NAME)."""
    return environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "") or "/"


class _CountedInput:
    """`wsgi.input` for a body of unknown length: counts the bytes the app reads."""

    def __init__(self, stream: Any, exchange: _Exchange) -> None:
        self._stream = stream
        self._exchange = exchange

    def read(self, *size: int) -> bytes:
        data: bytes = self._stream.read(*size)
        self._exchange.request_bytes += len(data)
        return data

    def readline(self, *size: int) -> bytes:
        line: bytes = self._stream.readline(*size)
        self._exchange.request_bytes += len(line)
        return line

    def readlines(self, *hint: int) -> list[bytes]:
        lines: list[bytes] = self._stream.readlines(*hint)
        self._exchange.request_bytes += sum(map(len, lines))
        return lines

    def __iter__(self) -> Iterator[bytes]:
        for line in self._stream:
            self._exchange.request_bytes += len(line)
            yield line

    def __getattr__(self, name: str) -> Any:  # anything else the server's stream has
        return getattr(self._stream, name)


def _unstarted(data: bytes) -> Any:
    raise AssertionError("write() before start_response()")  # the server returns write()


class _Closing:
    """The app's response iterable, each chunk produced in the request's context. The request
    ends when the iterable is exhausted or raises, or at close() if that comes first (once);
    close() then reaches the app's iterable."""

    def __init__(self, iterable: Iterable[bytes], exchange: _Exchange, context: Context) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._exchange = exchange
        self._context = context
        self._error: BaseException | None = None
        self._pending = 0  # the last chunk's length: sent once the server asks for more
        self._ended = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._ended:
            raise StopIteration
        return self._context.run(_next_chunk, self)

    def close(self) -> None:
        self._context.run(_close, self)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._exchange.end(self._error)


def _next_chunk(closing: _Closing) -> bytes:
    """The next chunk of the app's iterable, in the request's context (module functions, not
    bound methods: nothing made per chunk)."""
    exchange = closing._exchange
    exchange.response_bytes += closing._pending  # written: the server asks for more
    closing._pending = 0
    try:
        iterator = closing._iterator
        if iterator is None:
            iterator = closing._iterator = iter(closing._iterable)
        chunk = next(iterator)
    except StopIteration:
        closing._end()  # the server took the whole body: the caller has it
        raise
    except BaseException as exc:
        closing._error = exc
        if not exchange.headers_sent and isinstance(exc, Exception):
            exchange.status = 500  # nothing sent yet: the server answers 500 instead
        closing._end()
        raise
    if not exchange.headers_sent:  # servers send the status line with the first chunk, even empty
        exchange.headers_sent = True
        if exchange.logged:
            exchange.answered = time.perf_counter()  # Envoy's upstream service time ends here
    closing._pending = len(chunk)
    return chunk


def _close(closing: _Closing) -> None:
    exchange = closing._exchange
    # Closed before the end, the app not at fault: the server gave up on the response (its
    # write failed: the caller went away).
    if not closing._ended and exchange.dropped is None:
        exchange.dropped = (exchange.status, exchange.response_bytes, time.perf_counter())
    try:
        close = getattr(closing._iterable, "close", None)
        if close is not None:
            close()
    finally:
        closing._end()


class _SizedClosing(_Closing):
    """`_Closing` for an iterable with a length (a list of chunks, say): servers read it to
    set Content-Length (PEP 3333), so it stays visible."""

    _iterable: Any

    def __len__(self) -> int:
        return len(self._iterable)
