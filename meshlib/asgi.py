"""`MeshMiddleware`: the mesh's inbound side for ASGI apps (Starlette, FastAPI, ...).

    app.add_middleware(meshlib.MeshMiddleware)            # Starlette / FastAPI
    app = meshlib.MeshMiddleware(app, mesh=my_mesh)       # any ASGI app

A pure ASGI middleware — not `BaseHTTPMiddleware`, which runs the app in another task and
loses contextvars. Lifespan and websocket scopes pass through untouched; responses stream
as the app sends them; an app exception is re-raised after the request is accounted for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meshlib._inbound import InboundExchange, InboundSides
from meshlib.mesh import Mesh
from meshlib.telemetry import threads

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MeshMiddleware:
    """Serve `app` inside the mesh: the caller's context is current while it runs."""

    def __init__(self, app: ASGIApp, mesh: Mesh | None = None) -> None:
        self.app = app
        self._sides = InboundSides(mesh)
        threads.install()  # context follows work into thread pools and threads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        side = self._sides.current()
        mesh = side.mesh
        headers = side.collect(scope.get("headers", ()))
        exchange = InboundExchange(side, headers.get)
        identity = mesh.identity_header

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.request_bytes += len(message.get("body", b""))
            return message

        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), identity]}
            elif kind == "http.response.body":
                exchange.response_bytes += len(message.get("body", b""))
            await send(message)

        host = headers.get("host")
        client = scope.get("client")
        if client:
            exchange.client = f"{client[0]}:{client[1]}"
        query = scope.get("query_string")
        if query:
            exchange.query = query.decode("latin-1")
        exchange.begin(
            scope.get("method", "GET"),
            scope.get("path", "/"),
            scheme=scope.get("scheme", "http"),
            host=host[0] if host else "",
        )
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:
            exchange.status = exchange.status or 500  # what the server will answer
            exchange.end(exc)
            raise
        exchange.end()
