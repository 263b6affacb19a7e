"""What the ASGI and WSGI middleware share: one served request, from headers to the end.

`InboundExchange` extracts the caller's context (trace, x-request-id, propagated headers,
deadline), makes it current and opens the SERVER span, so meshed clients called while the
request is served send it all on with no app code; `end()` closes the span and restores the
previous context. The adapters only translate their framework's request and response.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import Token
from typing import Any

from meshlib.mesh import Mesh
from meshlib.telemetry import peer
from meshlib.telemetry.access_log import AccessLogEntry
from meshlib.telemetry.propagation import InboundContext

GetAll = Callable[[str], list[str]]


class InboundExchange:
    """One request served by this workload."""

    __slots__ = (
        "_get_all",
        "_method",
        "_path",
        "_scope",
        "_span",
        "_token",
        "_wall",
        "client",
        "context",
        "mesh",
        "peer",
        "query",
        "request_bytes",
        "response_bytes",
        "started",
        "status",
    )

    def __init__(self, mesh: Mesh, get_all: GetAll) -> None:
        self.mesh = mesh
        self.status = 0
        self.started = time.perf_counter()
        self._wall = time.time()
        self._get_all = get_all
        self._method = "GET"
        self._path = "/"
        self.client: str | None = None  # the caller's address, for access logs
        self.query = ""  # the query string, for access logs
        self.request_bytes = 0
        self.response_bytes = 0
        self.context: InboundContext = mesh.propagator.extract(get_all)
        claimed = get_all(peer.HEADER)
        self.peer = peer.decode(claimed[0]) if claimed else peer.UNKNOWN_PEER
        self._token: Token[InboundContext | None] | None = None
        self._scope: AbstractContextManager[Any] | None = None
        self._span: Any = None

    def begin(self, method: str, path: str, *, scheme: str, host: str) -> None:
        """Make the caller's context current and open this request's SERVER span."""
        self._method, self._path = method, path
        self._token = self.mesh.propagator.activate(self.context)
        tracing = self.mesh.tracing
        if tracing.enabled:
            self._scope = tracing.server_span(
                method, path, scheme=scheme, host=host, context=self.context.otel_context
            )
            self._span = self._scope.__enter__()

    def end(self, error: BaseException | None = None) -> None:
        """Close the span with the response status and restore the previous context."""
        scope, self._scope = self._scope, None
        if scope is not None:
            self.mesh.tracing.finish_server(self._span, self.status or 500)
            scope.__exit__(type(error) if error else None, error, None)
        token, self._token = self._token, None
        if token is not None:
            self.mesh.propagator.deactivate(token)
            self._record()

    def _record(self) -> None:
        """Count the request as Istio's server-side proxy does (reporter="destination")."""
        config = self.mesh.config
        service = config.service or config.workload or "unknown"
        self.mesh.metrics.record(
            "destination",
            self.peer,
            destination_service=f"{service}.{config.namespace}.svc.{config.cluster_domain}",
            destination_service_name=service,
            destination_service_namespace=config.namespace,
            response_code=self.status or 500,
            connection_security_policy="none",
            duration_ms=(time.perf_counter() - self.started) * 1000.0,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
        )
        log = self.mesh.access_log
        if log.enabled("inbound"):
            log.log(self._entry())

    def _entry(self) -> AccessLogEntry:
        def first(name: str) -> str | None:
            values = self._get_all(name)
            return values[0] if values else None

        return AccessLogEntry(
            start_time=self._wall,
            method=self._method,
            path=f"{self._path}?{self.query}" if self.query else self._path,
            protocol="HTTP/1.1",
            response_code=self.status or 500,
            response_flags="-",
            bytes_received=self.request_bytes,
            bytes_sent=self.response_bytes,
            duration_ms=(time.perf_counter() - self.started) * 1000.0,
            upstream_service_time_ms=None,
            x_forwarded_for=first("x-forwarded-for"),
            user_agent=first("user-agent"),
            request_id=self.context.request_id,
            authority=first("host"),
            upstream_host=None,
            upstream_cluster="inbound|||",
            route_name="default",
            downstream_remote_address=self.client,
            direction="inbound",
        )

    @property
    def response_header(self) -> tuple[str, str]:
        """This workload's identity for the caller's metrics (Istio's metadata exchange)."""
        return (peer.HEADER, self.mesh.identity)
