"""What the ASGI and WSGI middleware share: one served request, from headers to the end.

`InboundExchange` extracts the caller's context (trace, x-request-id, propagated headers,
deadline), makes it current and opens the SERVER span, so meshed clients called while the
request is served send it all on with no app code; `end()` closes the span and restores the
previous context. The adapters only translate their framework's request and response.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from meshlib.dataplane.outcome import Flag
from meshlib.mesh import Mesh, default_mesh, made_default_mesh
from meshlib.telemetry import peer
from meshlib.telemetry._request_context import Activation, InboundContext
from meshlib.telemetry._span_scopes import ServerScope
from meshlib.telemetry.access_log import AccessLogEntry, protocol_of

logger = logging.getLogger("meshlib")


class InboundSide:
    """What every request served through one Mesh shares, computed once per Mesh."""

    __slots__ = ("answers", "mesh", "names", "recorder", "wsgi_answers")

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        # content-length: the request bytes of a body the app does not read (asgi.py).
        wanted = {*mesh.propagator.inbound_headers, *peer.EXCHANGE_HEADERS, "content-length"}
        self.names: dict[bytes, str] = {name.encode("latin-1"): name for name in wanted}
        """The request headers read on every request, as ASGI spells them -> their name (the
        ones only a span or the access log reads are looked up when they are)."""
        config = mesh.config
        service = config.service or config.workload
        self.recorder = mesh.metrics.destination(
            # Istio's "unknown" when this workload was not told which service it is.
            destination_service=(
                f"{service}.{config.namespace}.svc.{config.cluster_domain}"
                if service
                else "unknown"
            ),
            destination_service_name=service or "unknown",
            destination_service_namespace=config.namespace,
            connection_security_policy="none",
        )
        # The identity headers each answer sets, by `InboundExchange.answer` (a sum of
        # MESHLIB_ANSWER, ISTIO_ANSWER and ISTIO_ID_ANSWER), for WSGI as str and ASGI as bytes.
        identity = mesh.identity_headers  # meshlib's form, Istio's and its id, in this order
        self.wsgi_answers: tuple[tuple[tuple[str, str], ...], ...] = tuple(
            tuple(pair for bit, pair in enumerate(identity) if answer & (1 << bit))
            for answer in range(8)
        )
        self.answers = tuple(
            tuple((name.encode(), value.encode("latin-1")) for name, value in pairs)
            for pairs in self.wsgi_answers
        )


# What a caller is answered (`InboundExchange.answer`, their sum): nothing (it sent no
# identity); this workload's identity in meshlib's form, to a meshlib caller; in Istio's, to
# an Envoy sidecar's; Istio's id, to a caller that sent its own (Envoy's peer_metadata filter
# answers each of its headers only to a request that carried it).
NO_ANSWER, MESHLIB_ANSWER, ISTIO_ANSWER, ISTIO_ID_ANSWER = 0, 1, 2, 4


class InboundSides:
    """The InboundSide a middleware serves with: of the Mesh it was given, else of the default
    Mesh as it is now; rebuilt when that Mesh changes."""

    __slots__ = ("_mesh", "_side")

    def __init__(self, mesh: Mesh | None) -> None:
        self._mesh = mesh
        self._side: InboundSide | None = None

    def flush(self) -> bool:
        """Export the spans the Mesh still holds in its batch (its own provider's), without
        making a default Mesh when there is none yet; False when that did not end in time."""
        mesh = self._mesh if self._mesh is not None else made_default_mesh()
        return mesh is None or mesh.tracing.flush()

    def current(self) -> InboundSide:
        mesh = self._mesh if self._mesh is not None else default_mesh()
        side = self._side
        if side is None or side.mesh is not mesh:
            side = self._side = InboundSide(mesh)
        return side


class _Received(NamedTuple):
    """The request as it arrived, for its access log line."""

    wall_time: float
    method: str
    path: str  # with the query
    client: str | None
    x_forwarded_for: str | None
    user_agent: str | None
    authority: str | None
    protocol: str  # as Envoy's %PROTOCOL% says it: HTTP/1.0, HTTP/1.1, HTTP/2, HTTP/3
    port: int | None  # the port the request came in on: Envoy's inbound cluster names it


class InboundExchange:
    """One request served by this workload, from its headers to its end.

    An adapter subclasses it to say what the request is (`request_line`, `origin`, read only
    when a span or an access log needs them; `method`, read only for a response with a body),
    sets `status` and counts the bytes, and sets `dropped` when the caller went away before
    the response was complete. For a request the access log will write (`logged`), it sets
    `answered` when the response headers go to the server. Constructing it reads the caller's
    context; `begin()` makes it current and opens the SERVER span; `end()` closes both and
    records the request.
    """

    __slots__ = (
        "_received",
        "_scope",
        "_span",
        "_token",
        "answer",
        "answered",
        "claimed",
        "completed",
        "context",
        "dropped",
        "request_bytes",
        "response_bytes",
        "side",
        "started",
        "status",
        "watched",
    )

    def __init__(
        self,
        side: InboundSide,
        first: Mapping[str, str] | None = None,
        more: Mapping[str, list[str]] | None = None,
    ) -> None:
        """`first`: the first value of each header read on every request (`InboundSide.names`),
        when the adapter collected them, and `more` every value of those that came more than
        once; else they are read through `get_all`."""
        self.started = time.perf_counter()
        self.side = side
        mesh = side.mesh
        self.status = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.dropped: tuple[int, int, float] | None = None
        """(status, response bytes sent, when: `perf_counter`) when the caller went away
        before the response was complete; None while it has not."""
        self.completed: float | None = None
        """When the caller had the whole response (`perf_counter`), if the adapter knows it
        before the app returns (an ASGI app may run background work after it)."""
        if first is None:
            self.context: InboundContext = mesh.propagator.extract(self.get_all)
            first = self._exchanged()
        else:
            self.context = mesh.propagator.extract_found(first, more)
        # `claimed`: the caller's peer metadata header (see `peer.claim`), decoded only when
        # its series is new; the caller is answered in its form.
        mine, istio = first.get(peer.HEADER), first.get(peer.ISTIO_HEADER)
        if istio is None:
            self.claimed = mine
            self.answer = NO_ANSWER if mine is None else MESHLIB_ANSWER
        else:
            self.claimed = claimed = peer.claim(mine, istio)
            self.answer = MESHLIB_ANSWER if claimed is mine else ISTIO_ANSWER
        if peer.ISTIO_ID_HEADER in first:
            self.answer |= ISTIO_ID_ANSWER
        self._token: Activation | None = None
        self._scope: ServerScope | None = None
        self._span: Any = None
        self._received: _Received | None = None
        # Whether anything wants the response's start: an access log line (`logged`) or a
        # sampled span's route (`routing`). One slot the adapter reads on every response.
        self.watched = False

    def _exchanged(self) -> dict[str, str]:
        """The metadata-exchange headers the caller sent (the first value of each)."""
        found = {}
        for name in peer.EXCHANGE_HEADERS:
            values = self.get_all(name)
            if values:
                found[name] = values[0]
        return found

    def get_all(self, name: str) -> list[str] | None:
        """The values of request header `name` (lowercase); None or [] when absent. Called
        on every request only when the adapter gives no `first`."""
        raise NotImplementedError

    def request_line(self) -> tuple[str, str, str, str]:
        """The request's method, path (without the query), scheme and host."""
        raise NotImplementedError

    def origin(self) -> tuple[str | None, str]:
        """The caller's address (`host:port`, None when unknown) and the query string."""
        raise NotImplementedError

    def method(self) -> str:
        """The request's method, as the server sees it."""
        raise NotImplementedError

    def broke_off(self, error: BaseException | None) -> bool:
        """Whether the response went out in part only: started, and ended (by `error`, an
        `Exception`, or the app returning) before the caller had all of it."""
        return False

    def listener(self) -> tuple[object, int | None]:
        """The HTTP version the server reports (for `protocol_of`) and the local port the
        request came in on (None when unknown)."""
        return None, None

    @property
    def logged(self) -> bool:
        """Whether the access log will write this request: only then is `answered` set, and
        read."""
        return self._received is not None

    @property
    def routing(self) -> bool:
        """Whether the request's route is wanted (`ServerScope.unrouted`: a sampled request's
        span of meshlib's): what only a route reads is read then."""
        scope = self._scope
        return scope is not None and scope.unrouted

    def spanned(self) -> None:
        """Called once the request has a SERVER span, before the app runs."""

    def route(self) -> str | None:
        """The route template the app's framework matched the request by, once the app ran
        (`/reviews/{id}`); None when it does not say. Read only when `routing`."""
        return None

    def query(self) -> str:
        """The request's query string ("" when none)."""
        return self.origin()[1]

    def target(self) -> str:
        """The request target as the caller sent it, for the access log (Envoy's
        `%REQ(:PATH)%`: percent-encoded, with the query); adapters that can see the raw
        target say it, this is the decoded path and the query."""
        path = self.request_line()[1]
        query = self.query()
        return f"{path}?{query}" if query else path

    def begin(self) -> None:
        """Make the caller's context current and open this request's SERVER span."""
        context = self.context
        mesh = self.side.mesh
        if mesh.access_log.enabled("inbound"):
            self._received = self._as_received()  # before the app can change its request
            self.watched = True
            self.answered: float | None = None
            """When the app's response headers went to the server (`perf_counter`), for
            Envoy's upstream service time; None before (set by the adapter when `logged`)."""
        self._token = activation = mesh.propagator.activate(context)
        tracing = mesh.tracing
        # Else an outer span (the app's own instrumentation's) stays current, recording or
        # not: the SERVER span is its child, in its trace, whatever the caller's headers say.
        attached = activation.otel is not None
        if tracing.needs_server_span(context.otel_context, context.sampled if attached else None):
            try:
                method, path, scheme, host = self.request_line()
                self._scope = tracing.server_span(
                    method,
                    path,
                    scheme=scheme,
                    host=host,
                    context=context.otel_context if attached else None,
                    headers=self.get_all,
                    query=self.query,
                )
                self._span = self._scope.__enter__()
                self.spanned()
                if self._scope.unrouted:
                    self.watched = True
            except Exception:  # a tracing failure must never fail the request being served
                self._scope = self._span = None
                logger.warning("meshlib: could not start the SERVER span", exc_info=True)

    def end(self, error: BaseException | None = None) -> None:
        """Close the span with the response status and restore the previous context.

        `error`: what the app raised. An `Exception` is answered 500 by the server (the
        adapter sets `status`), unless the response had started: then the caller got part
        of it (`broke_off`), recorded as Envoy records an upstream that terminates its
        response midway, the status sent with flag UC (so is an ASGI app that returns with
        its response incomplete); anything else (a cancelled task: the caller went away, or the
        server stops) is recorded as Envoy records a request its caller abandoned: the status
        sent so far (0 if none) and flag DC. So is a request whose caller went away before
        its response was complete (`dropped`), with what had been sent by then.

        A response to HEAD has no body (RFC 9110 §9.3.2; servers drop what the app writes):
        its body bytes count 0, as Envoy counts what was sent.

        Once the caller had the whole response (`completed`), what the app does after (a
        background task that raises, or is cancelled) does not change what it got: the
        request is recorded as answered, and its duration and its span end there, as Envoy's
        do. So do those of a request whose caller went away."""
        mesh = self.side.mesh
        ended = self.completed
        dropped = self.dropped
        if dropped is not None:  # what the app sent after that reached no one
            status, self.response_bytes, ended = dropped
            flags = Flag.DOWNSTREAM_TERMINATION
        elif ended is not None:
            status, flags = self.status, "-"
            error = None  # the app's, after the caller had it all
        elif error is not None and not isinstance(error, Exception):
            status, flags = self.status, Flag.DOWNSTREAM_TERMINATION
        elif self.status and self.broke_off(error):
            # Started, then cut short (the server drops the connection): Envoy's inbound
            # sidecar keeps the status sent and flags its upstream's (the app's) termination.
            status, flags = self.status, Flag.UPSTREAM_CONNECTION_TERMINATION
        else:
            status, flags = self.status or 500, "-"
        if self.response_bytes and self.method() == "HEAD":
            self.response_bytes = 0
        early = ended is not None
        if ended is None:
            ended = time.perf_counter()
        duration_ms = (ended - self.started) * 1000.0
        scope, self._scope = self._scope, None
        if scope is not None:
            if early:  # the span ends with the response, not with the app's later work
                scope.end_time = time.time_ns() - int((time.perf_counter() - ended) * 1e9)
            try:
                scope.routed(self.route)
                try:
                    mesh.tracing.finish_server(self._span, status, None if flags == "-" else flags)
                finally:
                    scope.__exit__(type(error) if error else None, error, None)
            except Exception:  # an app's span processor failing must not lose the request
                logger.warning("meshlib: could not end the SERVER span", exc_info=True)
        token, self._token = self._token, None
        if token is None:
            return
        mesh.propagator.deactivate(token)
        # Count the request as Istio's server-side proxy does (reporter="destination").
        self.side.recorder.record(
            self.claimed, status, duration_ms, self.request_bytes, self.response_bytes, flags
        )
        received = self._received
        if received is not None:
            mesh.access_log.log(self._entry(received, status, flags, duration_ms, ended))

    def _as_received(self) -> _Received:
        """What the access log says of the request, read before the app runs: dispatchers and
        proxy fixers change the scope or environ in place."""

        def first(name: str) -> str | None:
            values = self.get_all(name)
            return values[0] if values else None

        version, port = self.listener()
        return _Received(
            time.time(),
            self.method(),
            self.target(),
            self.origin()[0],
            first("x-forwarded-for"),
            first("user-agent"),
            first("host"),
            protocol_of(version),
            port,
        )

    def _entry(
        self, received: _Received, status: int, flags: str, duration_ms: float, ended: float
    ) -> AccessLogEntry:
        # Envoy's inbound router times its upstream, the app: from the request to the
        # response headers. With a status and no headers from the app, the server answered
        # for it (its 500 for an app that raised or returned without answering) as it ended;
        # with no status, nothing was answered (the caller left first): no service time.
        answered = self.answered
        if answered is None and status:
            answered = ended
        service_time_ms = None if answered is None else (answered - self.started) * 1000.0
        return AccessLogEntry(
            start_time=received.wall_time,
            method=received.method,
            path=received.path,
            protocol=received.protocol,
            response_code=status,
            response_flags=flags,
            bytes_received=self.request_bytes,
            bytes_sent=self.response_bytes,
            duration_ms=duration_ms,
            upstream_service_time_ms=service_time_ms,
            x_forwarded_for=received.x_forwarded_for,
            user_agent=received.user_agent,
            request_id=self.context.request_id,
            authority=received.authority,
            upstream_host=None,
            upstream_cluster=f"inbound|{received.port or ''}||",
            route_name="default",
            downstream_remote_address=received.client,
            direction="inbound",
        )


def django_route(path: str, script_name: str | None = None) -> str | None:
    """The route Django's URL resolver matches `path` by, as Django's `ResolverMatch.route`
    and OpenTelemetry's Django instrumentation write it (`reviews/<int:id>/`), when Django is
    serving the request here: called while its handler holds the request, which set the
    URLconf it resolves with (`get_urlconf()`: the request's own `urlconf` when a middleware
    set one; cleared once a request finishes) and the language its `i18n_patterns` match.
    `path` is WSGI's PATH_INFO, or ASGI's path with the `script_name` (the scope's root_path)
    to strip from it, as Django's ASGI handler strips it, or its `FORCE_SCRIPT_NAME` in its
    place. None when Django is not serving the request (not loaded, or another app in the
    process), for a path no pattern matches (a 404), and for the empty route of the root.
    Django is never imported here, only asked when already loaded; the request's
    `resolver_match` is out of reach (no handler puts the request in the environ or scope),
    so the path is resolved again, for a sampled request only."""
    urls = sys.modules.get("django.urls")
    if urls is None:
        return None
    try:
        urlconf = urls.get_urlconf()
        if urlconf is None:  # no Django request in this context
            return None
        if script_name is not None:
            script = sys.modules["django.conf"].settings.FORCE_SCRIPT_NAME or script_name
            if isinstance(script, str) and script:
                path = path.removeprefix(script)
        route = urls.resolve(path, urlconf).route
    except Exception:  # Resolver404, or a URLconf that fails to load: no route known
        return None
    return route if isinstance(route, str) and route else None
