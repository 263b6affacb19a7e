"""`MeshMiddleware`: the mesh's inbound side for ASGI apps (Starlette, FastAPI, ...).

    app.add_middleware(meshlib.MeshMiddleware)            # Starlette / FastAPI
    app = meshlib.MeshMiddleware(app, mesh=my_mesh)       # any ASGI app

A pure ASGI middleware — not `BaseHTTPMiddleware`, which runs the app in another task and
loses contextvars. Lifespan and websocket scopes pass through (a lifespan's shutdown first
exports the spans still batched, where uvicorn's SIGTERM would lose them); responses stream
as the app sends them; an app exception is re-raised after the request is accounted for
(as a 500, or, when the response had started, as the status sent with flag UC, as is an
app that returns with its response incomplete), and a cancelled request (its caller went
away) is counted with flag DC, as is one whose app was handed `http.disconnect` before its
response was complete, or whose server raised an `OSError` from `send()` (ASGI 2.4: the
caller is gone). A response started with `trailers: True` (the HTTP Trailers extension) is
complete with its last trailers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import quote

from meshlib._inbound import InboundExchange, InboundSide, InboundSides, django_route
from meshlib._text import ascii_int, host_port
from meshlib.mesh import Mesh, given_mesh
from meshlib.telemetry import peer, threads
from meshlib.telemetry.tracing import FLUSH_TIMEOUT_S

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_EXCHANGE = frozenset(peer.EXCHANGE_HEADERS)
logger = logging.getLogger("meshlib")


class MeshMiddleware:
    """Serve `app` inside the mesh: the caller's context is current while it runs."""

    def __init__(self, app: ASGIApp, mesh: Mesh | None = None) -> None:
        self.app = app
        self._sides = InboundSides(given_mesh(mesh, "meshlib.MeshMiddleware"))
        threads.install()  # context follows work into thread pools and threads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = _Lifespan(self._sides, send).send
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self._sides.current(), scope, receive, send)
        exchange.begin()
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException as exc:  # an app error (500) or a cancellation (DC): see end()
            exchange.end(exc)
            raise
        exchange.end()


_SHUT_DOWN = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class _Lifespan:
    """A lifespan scope's `send`, passing every message on: before the server hears the app
    has shut down, the spans still in the Mesh's batch are exported. uvicorn ends on SIGTERM
    (a pod's termination) by raising the signal again once it has shut down, so the process
    dies without running `atexit`, where OpenTelemetry's provider would have exported them;
    its `--workers` processes end without it too."""

    __slots__ = ("_flushed", "_send", "_sides")

    def __init__(self, sides: InboundSides, send: Send) -> None:
        self._sides = sides
        self._send = send
        self._flushed = False  # once: an app that says it shut down twice waits once

    async def send(self, message: Message) -> None:
        if message["type"] in _SHUT_DOWN and not self._flushed:
            self._flushed = True
            # On the event loop, which has nothing left to serve (the server closed its
            # connections first), for FLUSH_TIMEOUT_S at most.
            try:
                if not self._sides.flush():
                    logger.warning(
                        "meshlib: spans not all exported at shutdown within %g s (is the"
                        " collector reachable?)",
                        FLUSH_TIMEOUT_S,
                    )
            except Exception:  # telemetry never stops the app's shutdown
                logger.exception("meshlib: spans not flushed at shutdown")
        await self._send(message)


class _Exchange(InboundExchange):
    """One ASGI request: its receive and send, wrapped (bound methods: no closures to make)."""

    __slots__ = (
        "_complete",
        "_declared",
        "_receive",
        "_resolved",
        "_root",
        "_send",
        "_started",
        "_trailers",
        "scope",
    )

    def __init__(self, side: InboundSide, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._complete = False  # the last body message (no more_body) was sent, or the
        # last trailers message (no more_trailers) for a response started with trailers
        self._trailers = False  # the response was started with `trailers: True`
        self._started: Sequence[tuple[bytes, bytes]] | None = None  # the response's headers
        self._root: object = None  # the scope's root_path as it came, read for a span only
        self._resolved: str | None = None  # the route Django matched, for a sampled request
        # The headers read on every request, decoded; the others untouched. One string per
        # name (a list per name would cost an allocation per header on every request).
        names = side.names
        first: dict[str, str] = {}
        more: dict[str, list[str]] | None = None  # every value of the names seen again
        exchanged: list[Any] | None = None  # the caller's metadata-exchange headers
        headers = scope.get("headers", ())
        for pair in headers:
            key, value = pair
            name = names.get(key)
            if name is None:
                if key.islower():  # ASGI servers send names lowercased; others are rare
                    continue
                name = names.get(key.lower())
                if name is None:
                    continue
            if name in _EXCHANGE:
                if exchanged is None:
                    exchanged = []
                exchanged.append(pair)
            if name not in first:
                first[name] = value.decode("latin-1")
            else:
                if more is None:
                    more = {}
                values = more.get(name)
                if values is None:
                    values = more[name] = [first[name]]
                values.append(value.decode("latin-1"))
        if exchanged is not None:
            # Read, then removed from the request the app sees, as Istio's metadata exchange
            # removes its own (an app relaying its request's headers must not pass them on).
            kept = list(headers)
            for pair in exchanged:
                kept.remove(pair)  # by identity first: the very pair seen
            scope["headers"] = kept
        declared = first.pop("content-length", None)
        # What the caller sends, read or not (Envoy counts what arrived): its Content-Length.
        self._declared = (ascii_int(declared.strip(), 19) or 0) if declared else 0
        super().__init__(side, first, more)

    def end(self, error: BaseException | None = None) -> None:
        if self._declared > self.request_bytes:  # the app left (part of) the body unread
            self.request_bytes = self._declared
        super().end(error)

    def spanned(self) -> None:
        self._root = self.scope.get("root_path", "")  # before a router's Mount extends it

    def route(self) -> str | None:
        return self._starlette_route() or self._resolved

    def _starlette_route(self) -> str | None:
        # Starlette and FastAPI leave the route they matched in the scope (a `Mount`'s routes
        # add its path to root_path): its template, without the parameters' convertors.
        scope = self.scope
        matched = scope.get("route")
        template = getattr(matched, "path_format", None)
        if not isinstance(template, str) or not template.startswith("/"):
            return None
        if not hasattr(matched, "endpoint"):  # a Mount of an app without routes: no template
            return None
        root, start = scope.get("root_path", ""), self._root
        if not isinstance(root, str) or not isinstance(start, str) or not root.startswith(start):
            return template
        mounted = root[len(start) :]  # the path the Mounts matched, as the request had it
        params = scope.get("path_params")
        if (
            mounted
            and isinstance(params, dict)
            and any(f"{{{name}}}" not in template for name in params)
        ):
            return None  # a Mount's own parameter: its values are in `mounted`
        return mounted + template

    def get_all(self, name: str) -> list[str] | None:
        # Only for a span or the access log: the headers are read again, not kept per request.
        key = name.encode("latin-1")
        return [
            value.decode("latin-1")
            for raw, value in self.scope.get("headers", ())
            if raw == key or raw.lower() == key
        ]

    def request_line(self) -> tuple[str, str, str, str]:
        scope = self.scope
        host = self.get_all("host")
        return (
            scope.get("method", "GET"),
            scope.get("path", "/"),
            scope.get("scheme", "http"),
            host[0] if host else "",
        )

    def origin(self) -> tuple[str | None, str]:
        scope = self.scope
        client = scope.get("client")
        query = scope.get("query_string")
        return (
            host_port(client[0], client[1]) if client else None,
            query.decode("latin-1") if query else "",
        )

    def method(self) -> str:
        return self.scope.get("method", "GET")  # type: ignore[no-any-return]

    def listener(self) -> tuple[object, int | None]:
        scope = self.scope
        server = scope.get("server")  # (host, port), or (path, None) on a Unix socket
        port = server[1] if server and isinstance(server[1], int) else None
        return scope.get("http_version"), port

    def target(self) -> str:
        scope = self.scope
        raw = scope.get("raw_path")  # as sent, percent-encoded (optional in ASGI)
        path = raw.decode("latin-1") if isinstance(raw, bytes) else quote(scope.get("path", "/"))
        query = scope.get("query_string")
        return f"{path}?{query.decode('latin-1')}" if query else path

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.request_bytes += len(message.get("body", b""))
        elif (
            message["type"] == "http.disconnect"
            and not self._complete
            and self.dropped is None
            and not self._delivered()
        ):
            # The caller went away before the response was complete (servers also answer
            # http.disconnect once it is, which is normal): Envoy's DC, with what was sent.
            self.dropped = (self.status, self.response_bytes, time.perf_counter())
        return message

    def broke_off(self, error: BaseException | None) -> bool:
        return self._started is not None and not self._complete and not self._delivered()

    def _delivered(self) -> bool:
        """Whether the caller has the whole response though the app has not ended it: an
        answer to HEAD, a 204 or a 304 is whole once started; one that declared its
        Content-Length once that many bytes went (the caller may close then, as Envoy's codec
        ends the stream)."""
        status = self.status
        if not status or self._trailers:  # trailers to come: the response goes on
            return False
        if status in (204, 304) or self.method() == "HEAD":
            return True
        for name, value in self._started or ():
            if name.lower() == b"content-length":
                length = ascii_int(value.decode("latin-1").strip(), 19)
                return length is not None and self.response_bytes >= length
        return False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            # A second start is the app's error (the server refuses it): the first counts.
            self.status = self.status or message["status"]
            headers = message.get("headers", ())
            answer = self.answer
            if answer:
                # A meshed caller (it sent its identity) gets ours, in its form, as Istio's
                # sidecars answer only a peer that sent its metadata; set, not added: one the
                # app relayed (an upstream's) is replaced. A copy: the app may send the same
                # message (and headers list) again.
                headers = peer.with_identity(headers, self.side.answers[answer])
                message = {**message, "headers": headers}
            elif not isinstance(headers, (list, tuple)):  # read again by _delivered()
                headers = list(headers)
                message = {**message, "headers": headers}
            if self._started is None:
                # The HTTP Trailers extension: the response ends with its last trailers.
                self._trailers = bool(message.get("trailers"))
                if self.watched:
                    self._watched_start()
            self._started = headers
        size = 0
        if kind == "http.response.body":
            size = len(message.get("body", b""))
            self.response_bytes += size
            self._complete = not message.get("more_body") and not self._trailers
        elif kind == "http.response.trailers":
            self._complete = not message.get("more_trailers")
        elif kind == "http.response.pathsend":  # the server sends a file as the whole body
            size = _size_of(message.get("path"))
            self.response_bytes += size
            self._complete = not self._trailers
        try:
            await self._send(message)
        except OSError:
            # ASGI 2.4: the server raises an OSError from send() once the caller is gone (the
            # only sign of it an app that never calls receive() gets): Envoy's DC, with what
            # was sent before this message, which never went.
            if self.dropped is None and self.completed is None:
                self.response_bytes -= size
                self._complete = False
                self.dropped = (self.status, self.response_bytes, time.perf_counter())
            raise
        if self._complete and self.completed is None:
            self.completed = time.perf_counter()  # sent: the caller has it all

    def _watched_start(self) -> None:
        """The response starts, and an access log line or a sampled span wants to know."""
        if self.logged:
            self.answered = time.perf_counter()  # Envoy's upstream service time ends here
        if self.routing:  # while Django's handler holds the request (its task)
            scope = self.scope
            root = scope.get("root_path")
            self._resolved = django_route(
                scope.get("path", "/"), root if isinstance(root, str) else ""
            )


def _size_of(path: object) -> int:
    """The size of the file a `pathsend` names (0 when it cannot be read: the server fails)."""
    try:
        return os.stat(path).st_size if isinstance(path, str) else 0
    except OSError:
        return 0
