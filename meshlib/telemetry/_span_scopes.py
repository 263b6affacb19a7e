"""The span of one served request or one outbound attempt, from its start to its end.

`Tracing.server_span` and `Tracing.client_span` return these scopes; entering one decides
what the request or attempt gets (the app's own span annotated instead of a second one, the
caller's unsampled context passed through with no span, or a span of meshlib's with its
attributes built only when it records) and makes it current; leaving it ends a span meshlib
made. They run on every served request and every attempt. The rules are in
`meshlib.telemetry.tracing`'s docstring ("No double spans", "Cost", "Span names").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY, Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from meshlib.policy.hosts import strip_port
from meshlib.telemetry._caller_trace import B3_DEFERRED, B3_SAMPLING_KEY, CallerSpan, decided
from meshlib.telemetry._tracing_policy import HeaderLookup

if TYPE_CHECKING:
    from meshlib.telemetry.tracing import Tracing

__all__ = ["MAX_NAME_PATH", "ServerScope"]

MAX_NAME_PATH = 128
_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SERVER = SpanKind.SERVER
_CLIENT = SpanKind.CLIENT


class _Scope:
    """Enters a span: makes it current, and on exit ends it if meshlib made it."""

    __slots__ = ("_token", "end_time", "owned", "span", "tracing")

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.span: Span = trace.INVALID_SPAN
        self.owned = False
        self._token: Token[Context] | None = None
        self.end_time: int | None = None
        """When the span ends (`time.time_ns()`), if before the block does; None: on exit."""

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Span:
        self._start()
        return self.span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is not None:
            self._token = None
            otel_context.detach(token)
        if self.owned:
            span = self.span
            if exc is not None and isinstance(exc, Exception) and span.is_recording():
                span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end(self.end_time)


class ServerScope(_Scope):
    """`Tracing.server_span`'s scope."""

    __slots__ = (
        "context",
        "headers",
        "host",
        "method",
        "path",
        "query",
        "route",
        "scheme",
        "unrouted",
    )

    def __init__(
        self,
        tracing: Tracing,
        method: str,
        path: str,
        scheme: str,
        host: str,
        context: Context | None,
        route: str | None,
        headers: HeaderLookup | None,
        query: Callable[[], str] | None,
    ) -> None:
        super().__init__(tracing)
        self.method = method
        self.path = path
        self.scheme = scheme
        self.host = host
        self.context = context
        self.route = route
        self.headers = headers
        self.query = query
        self.unrouted = False
        """Whether the span wants the route its framework matched: a span of meshlib's that
        records (a sampled request), named at its start by no route. What only a route reads
        is read then, never for the requests left unsampled."""

    def _start(self) -> None:
        current = trace.get_current_span()
        if current.is_recording():
            if getattr(current, "kind", None) is _SERVER:
                self.span = current  # the app's instrumentation made it: no second one
                return
            parent = None  # an app span is current: ours is its child
        else:
            parent = self.context
            if parent is not None and parent.get(B3_SAMPLING_KEY) == B3_DEFERRED:
                parent = decided(parent, self.tracing.decide)  # the B3 caller left it to us
        tracer = self.tracing._tracer
        if tracer is None:
            self.span = current
            return
        report = self.tracing.report_server
        if not report:  # disableSpanReporting: a trace that came in (or the app's) goes on
            remote = trace.get_current_span(parent) if parent is not None else current
            if remote.get_span_context().is_valid:
                self.span = remote
                if parent is not None:
                    self._token = otel_context.attach(parent)
                return
        if self.tracing._sampler is not None and parent is not None:
            remote = trace.get_current_span(parent)
            if _unsampled(remote):  # ParentBased drops it: pass the caller's context through
                self.span = remote
                self._token = otel_context.attach(parent)
                return
        path = self.path.partition("?")[0]
        method = _method(self.method)
        span = tracer.start_span(self._name(method, self.route or path), parent, kind=_SERVER)
        if not report:
            # No trace came in: this span is the request's trace root (its ids and sampling
            # decision go on to the calls made), but it is never ended, so never reported.
            self.span = span
            self._token = otel_context.attach(trace.set_span_in_context(span, parent))
            return
        if span.is_recording():
            host, port = strip_port(self.host)
            attributes: dict[str, str | int] = {
                "http.request.method": method,
                "url.path": path,
                "url.scheme": self.scheme,
                "server.address": host,
            }
            if method == "_OTHER":
                attributes["http.request.method_original"] = self.method
            if port is not None:
                attributes["server.port"] = port
            if self.route:
                attributes["http.route"] = self.route
            if self.query is not None:
                query = self.query()
                if query:
                    attributes["url.query"] = _redacted(query)
            self.tracing.tags.add_to(attributes, self.headers)
            span.set_attributes(attributes)
            self.unrouted = not self.route
        self.span = span
        self.owned = True
        self._token = otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def _name(method: str, target: str) -> str:
        """`method`: as `_method` gives it."""
        if len(target) > MAX_NAME_PATH:
            target = target[:MAX_NAME_PATH]
        return f"{'HTTP' if method == '_OTHER' else method} {target}"

    def routed(self, route_of: Callable[[], str | None]) -> None:
        """Name the span by the route its framework matched, `route_of()` (a template,
        `/reviews/{id}`; None: none known), and say it (`http.route`), as OpenTelemetry's HTTP
        conventions ask, where a name with the path gives every id a name of its own. Asked
        only when the span is `unrouted`."""
        if not self.unrouted:
            return
        route = route_of()
        if route:
            span = self.span
            span.update_name(self._name(_method(self.method), route))
            span.set_attribute("http.route", route)


class _ClientScope(_Scope):
    __slots__ = ("attempt", "cluster", "headers", "method", "subset", "upstream", "url")

    def __init__(
        self,
        tracing: Tracing,
        method: str,
        url: str,
        attempt: int,
        cluster: str | None,
        subset: str | None,
        upstream: str | None,
        headers: HeaderLookup | None,
    ) -> None:
        super().__init__(tracing)
        self.method = method
        self.url = url
        self.attempt = attempt
        self.cluster = cluster
        self.subset = subset
        self.upstream = upstream
        self.headers = headers

    def _start(self) -> None:
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is _CLIENT:
            self.span = current  # the app's instrumentation made it: annotate, do not nest
            mesh: dict[str, str | int] = {}
            self._mesh_attributes(mesh)
            current.set_attributes(mesh)
            return
        tracing = self.tracing
        tracer = tracing._tracer
        if not tracing.report_client:
            self.span = trace.INVALID_SPAN  # disableSpanReporting: none made, nothing annotated
            return
        if tracer is None or (tracing._sampler is not None and _unsampled(current)):
            self.span = current  # off, or ParentBased would drop it: nothing to make
            return
        scheme, authority, userinfo = _split_url(self.url)
        method = _method(self.method)
        name = "HTTP" if method == "_OTHER" else method
        if authority:
            name = f"{name} {authority}"
        span = tracer.start_span(name, None, kind=_CLIENT)
        if span.is_recording():
            host, port = strip_port(authority)
            if port is None:
                port = _DEFAULT_PORTS.get(scheme)
            url = self.url
            if userinfo:
                url = url.replace(userinfo + "@", "", 1)
            if "?" in url:
                url = _redacted(url)
            attributes: dict[str, str | int] = {
                "http.request.method": method,
                "url.full": url,
                "server.address": host,
            }
            if method == "_OTHER":
                attributes["http.request.method_original"] = self.method
            if port is not None:
                attributes["server.port"] = port
            self._mesh_attributes(attributes)
            if self.upstream:
                _peer(attributes, self.upstream)
            self.tracing.client_tags.add_to(attributes, self.headers)
            span.set_attributes(attributes)
        self.span = span
        self.owned = True
        ctx = trace.set_span_in_context(span)
        # instrumentation-httpx/requests/urllib3 under meshlib: skip their CLIENT spans
        self._token = otel_context.attach(
            otel_context.set_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, ctx)
        )

    def _mesh_attributes(self, attributes: dict[str, str | int]) -> None:
        if self.attempt > 1:
            attributes["http.request.resend_count"] = self.attempt - 1
        if self.cluster:
            attributes["meshlib.upstream_cluster"] = self.cluster
        if self.subset:
            attributes["meshlib.subset"] = self.subset


def _method(method: str) -> str:
    """The semconv `http.request.method`: a known method upper-cased, else `_OTHER`."""
    if method in _KNOWN_METHODS:
        return method
    upper = method.upper()
    return upper if upper in _KNOWN_METHODS else "_OTHER"


# Query parameters whose values are credentials (signed URLs): OpenTelemetry's HTTP semantic
# conventions (and its instrumentations' defaults) record them as REDACTED.
_SENSITIVE_QUERY = re.compile(r"(^|[?&])(AWSAccessKeyId|Signature|sig|X-Goog-Signature)=[^&#]*")


def _redacted(text: str) -> str:
    """A query string or URL with the values of credential parameters replaced."""
    return _SENSITIVE_QUERY.sub(r"\1\2=REDACTED", text) if "=" in text else text


def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme, authority without userinfo, userinfo) of an absolute URL, by string scanning."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", ""
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1 and found < end:
            end = found
    authority = rest[:end]
    userinfo, at, hostport = authority.rpartition("@")
    return scheme.lower(), (hostport if at else authority), userinfo


def _peer(attributes: dict[str, str | int], upstream: str) -> None:
    address, port = strip_port(upstream)
    attributes["network.peer.address"] = address
    if port is not None:
        attributes["network.peer.port"] = port


def _unsampled(span: Span) -> bool:
    """A valid span context whose trace is not sampled (the ParentBased sampler drops it)."""
    if type(span) is CallerSpan:  # valid by construction; its flag is read without building
        return not span.sampled
    span_context = span.get_span_context()
    return span_context.is_valid and not span_context.trace_flags.sampled
