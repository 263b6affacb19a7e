"""Meshed httpx: `MeshTransport` / `AsyncMeshTransport` wrap any httpx transport, and
`Client` / `AsyncClient` are real httpx clients that use them.

    client = meshlib.Client()                  # an httpx.Client; requests routed by policy
    client.get("http://reviews:9080/reviews/1")
    transport = meshlib.MeshTransport(httpx.HTTPTransport(retries=0), mesh=my_mesh)

Hosts the mesh does not know go through untouched. For the others the transport routes,
balances, retries and times out as the route says and answers locally where a sidecar would
(503 UO/UH/UF, 504 UT, 404 NR, fault aborts); the Envoy response flags are in
`response.extensions["response_flags"]` and, on local answers, in the
`x-meshlib-response-flags` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpcore
import httpx

from meshlib.clients._aio import Background, sleep, within
from meshlib.clients._common import (
    DRAIN_BYTES,
    DRAIN_SECONDS,
    MAX_MIRRORS_PENDING,
    MIRROR_TIMEOUT,
    REQUEST_ID,
    RESPONSE_FLAGS,
    UPSTREAM_HOST,
    BodyTooLate,
    MirrorCopy,
    MirrorTracker,
    body_broke_off,
    choose_hash_key,
    client_span,
    edited_headers,
    end_client_span,
    forget_identity,
    record_exception,
    record_source,
    reply_headers,
    request_id,
    start_mirror,
)
from meshlib.clients._guard import passthrough_inside
from meshlib.clients._httpx_body import hold
from meshlib.clients._httpx_headers import appended, decoded, encoded, extended, lowercase_raw
from meshlib.dataplane.deadline import remaining as remaining_deadline
from meshlib.dataplane.deadline import within as within_deadline
from meshlib.dataplane.exchange import CALLERS_TIMEOUT, Attempt, Exchange
from meshlib.dataplane.outcome import Flag, LocalReply, ordered
from meshlib.dataplane.retry import (
    CONNECT_FAILURE,
    PER_TRY_TIMEOUT,
    REFUSED_STREAM,
    RESET,
    STREAM_RESET,
    AttemptResult,
    run_attempts,
    run_attempts_async,
)
from meshlib.dataplane.routing import RoutePlan
from meshlib.mesh import Mesh, default_mesh, given_mesh
from meshlib.policy.matching import LazyHeaders, RequestAttributes
from meshlib.policy.routes import Mirror
from meshlib.policy.snapshot import Endpoint
from meshlib.telemetry import peer, propagation

_MESHED = "meshlib.meshed"  # marks transports meshlib made, so nothing is meshed twice


class _Reading:
    """While a `send(stream=False)` runs (`with _Reading(request.extensions):`), the requests
    whose caller reads the whole body, so that the mesh reads it within the try (see
    `_read_whole`), named by their extensions: the request an auth flow sends again is the
    same object, and each redirect's new request, whose extensions httpx copies, is added
    (`_ClientMixin._build_redirect_request`). Emptied when the send ends: a task started
    meanwhile, which keeps this object in its copy of the context, does not find a later send
    of its own marked."""

    __slots__ = ("_token", "first", "more")

    def __init__(self, extensions: dict[str, Any]) -> None:
        self.first: dict[str, Any] | None = extensions  # the request `send` was handed
        self.more: list[dict[str, Any]] = []  # redirects' (rare: no list lookup for most)

    def marks(self, extensions: object) -> bool:
        return extensions is self.first or any(marked is extensions for marked in self.more)

    def __enter__(self) -> None:
        self._token = _READ_WHOLE.set(self)

    def __exit__(self, *exc_info: object) -> None:
        _READ_WHOLE.reset(self._token)
        self.first = None
        self.more.clear()


# Set by meshlib's clients while their `send` runs. A context variable, not a key in the
# request's extensions: the caller's Request is left as it was (it may be sent again, streamed,
# through another client), and a call made meanwhile for another request (an event hook's) is
# not read whole for it.
_READ_WHOLE: contextvars.ContextVar[_Reading | None] = contextvars.ContextVar(
    "meshlib.read_whole", default=None
)
# request.extensions keys meshlib's HTTP/1.1 transport reads (`_http1.TRY_DEADLINE`,
# `_http1.TRY_TIMEOUT`; not imported, so that sync clients do not load it): when a try's
# response headers are due at the latest (the route deadline, then the try's own once it has
# a connection), and the try's time, which starts when it has a connection.
_TRY_DEADLINE = "meshlib.try_deadline"
_TRY_TIMEOUT = "meshlib.try_timeout"
MIRROR_GRACE = 1.0  # seconds aclose() waits for mirrored copies still in flight
_MIRROR_TIMEOUTS = dict.fromkeys(("connect", "read", "write", "pool"), MIRROR_TIMEOUT)


def _smaller(a: float | None, b: float | None) -> float | None:
    return b if a is None else (a if b is None else min(a, b))


def _bound_copy(request: httpx.Request, copy: MirrorCopy) -> httpx.Request:
    """A mirrored copy about to be sent, its timeouts bounded by what is left of the route's
    timeout and by the mirror cluster's connect timeout."""
    timeout = dict(request.extensions["timeout"])
    timeout["connect"], timeout["read"], _ = copy.timeouts(timeout["connect"], timeout["read"])
    left = copy.attempt.route_left()
    if left is not None:
        for phase in ("write", "pool"):
            timeout[phase] = _smaller(timeout[phase], left)
    request.extensions = {**request.extensions, "timeout": timeout}
    return request


_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a transport's `_handle` gives: the response, its headers as `_result` read them (None
# when the response is meshlib's own or was edited since: then they are read again), and
# Envoy's upstream service time in ms, when measured for the access log (`Exchange.began`).
Handled = tuple[httpx.Response, Mapping[str, str] | None, float | None]
# The headers meshlib sends as if the app had set them: the call's `x-request-id` when the
# app set none (Envoy makes one before routing), else nothing.
Added = tuple[tuple[str, str], ...]
# Set per attempt (lowercase, as httpx.Headers keys them).
_OURS = frozenset(
    (b"host", b"x-envoy-attempt-count", *(name.encode() for name in peer.EXCHANGE_HEADERS))
)
_OURS_CLOSING = _OURS | {b"connection"}  # and `Connection: close` replaces the app's


def _upstream_url(url: httpx.URL, scheme: str, endpoint: Endpoint, path: str | None) -> httpx.URL:
    """`url` sent to `endpoint` (and `path`, if rewritten), without re-parsing the URL.

    Parsing a URL costs more than all the mesh's other work per request, so the parsed
    form httpx keeps (`URL._uri_reference`, a NamedTuple) is copied with a new host and port.
    Should a future httpx change that, the public (slower) way is used.
    """
    port: int | None = endpoint.port
    if _DEFAULT_PORTS.get(scheme) == port:
        port = None
    reference = getattr(url, "_uri_reference", None)
    if reference is None or path is not None:
        # host and port apart: httpx splits a `netloc` at its first ':' (an IPv6 address's)
        rest = {"path": path} if path else {}
        return url.copy_with(scheme=scheme, host=endpoint.address, port=port, **rest)
    new = httpx.URL.__new__(httpx.URL)
    new._uri_reference = reference._replace(scheme=scheme, host=endpoint.address, port=port)
    return new


_PHASES = ("connect", "read", "write", "pool")


def _passthrough(
    mesh: Mesh, request: httpx.Request, view: dict[str, str], added: Added
) -> httpx.Request:
    """A passthrough request with the call's `x-request-id` (`added`), the trace context and
    propagated headers added, and each of its timeouts ending within the served request's
    deadline: meshlib does not answer for a passthrough host, so the caller's deadline shows as
    httpx's own timeout exception. A request of its own when anything changes: the caller's
    is left as it was (it may be sent again, and would carry this call's headers)."""
    extra = [*added, *mesh.propagator.outbound(view.__contains__)]
    extensions = request.extensions
    left = remaining_deadline()
    if left is not None:
        caller = extensions.get("timeout") or {}
        timeout = {phase: within_deadline(caller.get(phase), left) for phase in _PHASES}
        extensions = {**extensions, "timeout": timeout}
    if not extra and left is None:
        return request
    return httpx.Request(
        request.method,
        request.url,
        headers=extended(request.headers, frozenset(), extra) if extra else request.headers,
        stream=request.stream,
        extensions=extensions,
    )


def request_attributes(
    request: httpx.Request, items: list[tuple[str, str]] | None = None
) -> RequestAttributes:
    """What routing sees: the request, plus the headers the served request propagates.

    Behind a sidecar the app copies `end-user` & co. itself, so routing sees them; meshlib
    adds them for the app, so routing must see them too. `items` are the request's headers
    as `multi_items()` gives them, when the caller decoded them already.
    """
    url = request.url
    pairs = decoded(request.headers) if items is None else items
    host = None
    for name, value in pairs:
        if name == "host":
            host = value
            break
    inbound = propagation.current.get()
    if inbound is not None and inbound.headers:
        present = {name for name, _ in pairs}
        pairs = [*pairs, *((n, v) for n, v in inbound.headers if n not in present)]
    raw = url.raw_path  # as sent: Envoy matches and rewrites `:path` undecoded (a%2Fb stays)
    query_at = raw.find(b"?")
    return RequestAttributes(
        request.method,
        host or url.netloc.decode("ascii"),
        (raw if query_at < 0 else raw[:query_at]).decode("ascii"),
        scheme=url.scheme,
        query=url.query.decode("ascii", "replace"),
        headers=LazyHeaders(pairs),
        port=url.port,
    )


# The response headers the mesh reads: one pass over them collects all four.
_RESPONSE_HEADERS = {
    name.encode(): name
    for name in (
        "content-length",
        "content-encoding",
        "grpc-status",
        "x-envoy-ratelimited",
        *peer.EXCHANGE_HEADERS,
    )
}


def _response_headers(headers: httpx.Headers) -> dict[str, str]:
    """The response headers of `_RESPONSE_HEADERS` that are present (first value each)."""
    found: dict[str, str] = {}
    for lower, value in lowercase_raw(headers):
        name = _RESPONSE_HEADERS.get(lower)
        if name is not None and name not in found:
            found[name] = value.decode("latin-1")
    return found


def _record(
    mesh: Mesh,
    plan: RoutePlan,
    request_headers: dict[str, str],
    response: httpx.Response,
    started: float,
    response_headers: Mapping[str, str] | None,
    service_time_ms: float | None = None,
) -> None:
    """Count the call, and say its `x-request-id` (the app's, or the one meshlib made) in
    `response.extensions["request_id"]`, for the app and its response hooks to read: meshlib
    does not write it into the caller's request (see `_view`). `response_headers` are the ones
    `_result` read, when still current."""
    extensions = response.extensions
    rid = request_headers["x-request-id"]
    if plan.passthrough:  # the inner transport's dict, maybe not this response's alone
        response.extensions = extensions = {**extensions, REQUEST_ID: rid}
    else:  # a dict of meshlib's (`_finish`, `_local`)
        extensions[REQUEST_ID] = rid
    if response_headers is None:
        response_headers = _response_headers(response.headers)
    record_source(
        mesh,
        plan,
        response.status_code,
        response_headers,
        started,
        request_headers,
        extensions.get(RESPONSE_FLAGS, ()),
        extensions.get(UPSTREAM_HOST),
        extensions.get("http_version"),
        service_time_ms,
    )
    forget_identity(response.headers, response_headers)


def _view(request: httpx.Request) -> tuple[list[tuple[str, str]], dict[str, str], Added]:
    """The request's headers decoded once — (lowercase name, value) pairs and a dict of
    them — with the call's `x-request-id` when the app set none, and that header (`Added`).

    The id goes in each try, copy and passthrough request meshlib builds (`_upstream`,
    `_mirror_request`, `_passthrough`), never in the caller's `httpx.Request`: one the app
    sends again (its own retry, `client.send` twice) is a new call with an id of its own, as
    behind a sidecar, and the app's request keeps the headers the app gave it."""
    items = decoded(request.headers)
    view = dict(items)
    if "x-request-id" in view:
        return items, view, ()
    rid = ("x-request-id", request_id())
    items.append(rid)
    view["x-request-id"] = rid[1]
    return items, view, (rid,)


def _exception_flag(exc: BaseException) -> str:
    """Envoy's flag for a call that raised: the caller gave up (DC), or the connection failed."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Flag.UPSTREAM_CONNECTION_FAILURE
    if isinstance(exc, httpx.TimeoutException) or not isinstance(exc, Exception):
        return Flag.DOWNSTREAM_TERMINATION  # the caller's timeout, a cancellation, Ctrl-C
    return Flag.UPSTREAM_CONNECTION_TERMINATION


# Transport errors that say the request is wrong, not the upstream: never retried, never held
# against an endpoint, raised to the app as httpx raises them.
_CALLERS_OWN = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def _read_timeout_first(request: httpx.Request, delay: float) -> float | None:
    """The caller's read timeout, when a fault's `delay` would outlast it: behind a sidecar
    the app's read times out while the sidecar holds its request (see `_delay_timed_out`)."""
    read = (request.extensions.get("timeout") or {}).get("read")
    return read if read is not None and read < delay else None


def _delay_timed_out(request: httpx.Request) -> httpx.ReadTimeout:
    """The caller's read timeout, run out during a fault's delay: as httpx raises it."""
    return httpx.ReadTimeout("timed out", request=request)


try:  # httpx's multipart body (`files=`): replayable when every part is held in memory
    from httpx._multipart import DataField as _DataField
    from httpx._multipart import MultipartStream as _MultipartStream
except ImportError:  # another httpx: a multipart body is then never sent twice
    _MultipartStream = _DataField = None  # type: ignore[assignment, misc]


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again (retried, mirrored): bytes, or a multipart body
    (`files=`) whose every part is bytes or text, which httpx renders anew on each read (a
    file object's part is read from where the file is: never sent twice)."""
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):
        return True
    if _MultipartStream is None or type(stream) is not _MultipartStream:
        return False
    try:
        return all(
            isinstance(field, _DataField) or isinstance(field.file, (bytes, str))
            for field in stream.fields
        )
    except AttributeError:  # another layout: not replayable
        return False


def _body_failed(exc: Exception, request: httpx.Request, attempt: Attempt) -> AttemptResult:
    """How a try ends when reading the body of a response read whole fails."""
    timed_out = isinstance(exc, httpx.TimeoutException)
    caller = request.extensions.get("timeout") or {}
    mesh_owned = timed_out and attempt.timeouts(caller.get("connect"), caller.get("read"))[2]
    return body_broke_off(exc, timed_out, timed_out and not mesh_owned)


def _failed(exc: httpx.TransportError, request: httpx.Request, attempt: Attempt) -> AttemptResult:
    """How a transport error ends an attempt, in Envoy's terms."""
    caller = request.extensions.get("timeout") or {}
    if isinstance(exc, httpx.TimeoutException) and _try_expired(exc):
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc)  # the try's time: Envoy's UT
    if isinstance(exc, httpx.ConnectTimeout):
        cause = attempt.connect_timed_out(caller.get("connect"))
        if cause == CALLERS_TIMEOUT:
            return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=True)
        return AttemptResult(failure=cause, error=exc)
    if isinstance(exc, httpx.ConnectError):
        return AttemptResult(failure=CONNECT_FAILURE, error=exc)
    if isinstance(exc, httpx.PoolTimeout):  # the route deadline bounds it too (see above)
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=True)
    if isinstance(exc, httpx.TimeoutException):
        # the try's time bounds each phase; the caller's own for this phase may be shorter
        phase = "write" if isinstance(exc, httpx.WriteTimeout) else "read"
        mesh_owned = attempt.timeouts(caller.get("connect"), caller.get(phase))[2]
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=not mesh_owned)
    return AttemptResult(failure=_reset_kind(exc), error=exc)


_REFUSED_STREAM_CODE = 0x7  # HTTP/2's REFUSED_STREAM error code


def _reset_kind(exc: httpx.TransportError) -> str:
    """A lost connection (Envoy's UC), or, over HTTP/2, a stream the upstream reset (UR),
    which httpcore reports as a RemoteProtocolError holding h2's `StreamReset` event."""
    cause = exc.__cause__
    if isinstance(cause, httpcore.RemoteProtocolError) and cause.args:
        event = cause.args[0]
        if type(event).__name__ == "StreamReset":
            code = getattr(event, "error_code", None)
            return REFUSED_STREAM if code == _REFUSED_STREAM_CODE else STREAM_RESET
    return RESET


def _try_expired(exc: httpx.TimeoutException) -> bool:
    """Whether the try's own deadline (`_TRY_DEADLINE`, which the default async transport
    enforces) has passed: then the timeout is the mesh's, whichever phase raised it."""
    try:
        deadline = exc.request.extensions.get(_TRY_DEADLINE)
    except RuntimeError:  # an exception raised without its request
        return False
    return deadline is not None and time.monotonic() >= deadline - 0.002


class _AsyncCopies(Background):
    """The asyncio twin of a MeshTransport's `MirrorTracker`: an AsyncMeshTransport's copies
    and their pool, shared with the transport that replaces it (`adopt_mirrors`), so one close
    stops them all."""

    pool: httpx.AsyncBaseTransport | None = None  # see AsyncMeshTransport._mirroring_transport


class _CopyPool:
    """The connection pool a MeshTransport's mirrored copies go through (see `pool_like`),
    and how many copies use it now. Closing the client retires it: it is closed when no copy
    uses it any more, at once when none is in flight."""

    __slots__ = ("retired", "transport", "users")

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport
        self.users = 0  # copies sending through it now (under the MirrorTracker's lock)
        self.retired = False  # no copy takes it any more: the last one out closes it


class _Closes:
    """How many closes of the transport under a MeshTransport have begun (see `closing`):
    shared with the transport that replaces it over the same inner one (`adopt_mirrors`), so
    that a call in flight on the earlier one fails as the app's doing too."""

    __slots__ = ("begun",)

    def __init__(self) -> None:
        self.begun = 0


class _MeshTransportBase:
    """Everything MeshTransport and AsyncMeshTransport share: no I/O here."""

    _mesh: Mesh | None
    _closes: _Closes  # a call that saw one begin fail under it is the app's doing

    @property
    def mesh(self) -> Mesh:
        return self._mesh if self._mesh is not None else default_mesh()

    def closing(self) -> None:
        """The transport under this one is being closed, by the app: a call in flight that
        fails now is never retried nor held against its endpoint. (`close()` says so; for a
        stock transport under `instrument()`, the wrapper of its own `close`.)"""
        self._closes.begun += 1

    def _upstream(
        self,
        mesh: Mesh,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        plan: RoutePlan,
        attempt: Attempt,
    ) -> httpx.Request:
        """The request as sent to `attempt.endpoint`: route header edits, the call's
        `x-request-id`, trace context and the caller's propagated headers, the Host the route
        says, per-try timeouts. `view` is the request's headers by lowercase name."""
        path = None if plan.original_path is None else plan.path
        edits = plan.request_headers
        original = request.headers
        # Only headers the app did not set; the budget is this try's, as Envoy's router says.
        propagated = mesh.propagator.outbound(view.__contains__, attempt.timeout)
        ours = [
            ("host", plan.authority),
            ("x-envoy-attempt-count", str(attempt.number)),
            *mesh.identity_headers,
        ]
        if attempt.close_connection:
            ours.append(("connection", "close"))
        if edits:  # added and propagated headers count as the app's: the route's edits apply
            pairs = [*original.multi_items(), *added, *propagated]
            headers = encoded(edited_headers(pairs, edits, dict(ours)), original.encoding)
        else:  # the caller's headers as httpx holds them, ours appended: nothing re-encoded
            drop = _OURS_CLOSING if attempt.close_connection else _OURS
            headers = extended(original, drop, [*added, *propagated, *ours])
        caller = request.extensions.get("timeout") or {}
        connect, read, _ = attempt.timeouts(caller.get("connect"), caller.get("read"))
        timeout = {
            "connect": connect,
            "read": read,
            "write": _smaller(caller.get("write"), attempt.timeout),
            # waiting for the pool comes before the try's time (Envoy's onPoolReady)
            "pool": _smaller(caller.get("pool"), attempt.route_left()),
        }
        extensions = {**request.extensions, "timeout": timeout}
        if attempt.timeout is not None:  # the try's headers are due by then (_http1 reads it)
            extensions[_TRY_DEADLINE] = attempt.deadline
            extensions[_TRY_TIMEOUT] = attempt.timeout
        return httpx.Request(
            request.method,
            _upstream_url(request.url, plan.scheme, attempt.endpoint, path),
            headers=headers,
            stream=request.stream,
            extensions=extensions,
        )

    @staticmethod
    def _result(response: httpx.Response) -> AttemptResult:
        headers = _response_headers(response.headers)
        return AttemptResult(
            status=response.status_code,
            grpc_status=headers.get("grpc-status"),
            response=response,
            rate_limited="x-envoy-ratelimited" in headers,
            headers=headers,
        )

    @staticmethod
    def _local(
        reply: LocalReply, request: httpx.Request, flags: list[str], plan: RoutePlan | None
    ) -> httpx.Response:
        if reply.flag is not None:
            flags = ordered([*flags, reply.flag])
        response = httpx.Response(
            reply.status,
            headers=reply_headers(reply, flags, plan),
            # A stream, not `content=` (which httpx reads at once): a caller streaming the
            # answer can read it raw, as a server's. HEAD: headers only.
            stream=httpx.ByteStream(b"" if request.method == "HEAD" else reply.body),
            request=request,
            extensions={RESPONSE_FLAGS: flags},
        )
        return response

    @staticmethod
    def _finish(
        response: httpx.Response, plan: RoutePlan, exchange: Exchange, flags: list[str]
    ) -> httpx.Response:
        if plan.response_headers:
            original = response.headers
            edited = edited_headers(original.multi_items(), plan.response_headers, {})
            response.headers = encoded(edited, original.encoding)
        if exchange.set_cookie is not None:  # the client's cookie jar keeps it
            appended(response.headers, "set-cookie", exchange.set_cookie)
        response.extensions = {
            **response.extensions,
            RESPONSE_FLAGS: flags,
            UPSTREAM_HOST: exchange.upstream_host,
        }
        return response

    def _mirror_request(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        plan: RoutePlan,
        copy: MirrorCopy,
    ) -> httpx.Request:
        """The copy a mirror gets: the request as the route sends it, with the call's
        `x-request-id`, the trace context and propagated headers, as a sidecar mirrors what
        the app sent (its own headers copied); this workload's identity, as on every call."""
        mesh = self.mesh
        endpoint = copy.endpoint  # host and port apart, as in `_upstream_url`
        url = request.url.copy_with(host=endpoint.address, port=endpoint.port, path=plan.path)
        extra = {"host": plan.authority, **dict(mesh.identity_headers)}
        if copy.attempt.close_connection:
            extra["connection"] = "close"  # the mirror's maxRequestsPerConnection reached
        original = request.headers
        pairs = [*original.multi_items(), *added, *mesh.propagator.outbound(view.__contains__)]
        edited = edited_headers(pairs, plan.request_headers, extra)
        headers = encoded(edited, original.encoding)
        # the caller's timeouts (httpx's 5 s by default), 10 s where it set none: a copy never
        # waits for good (`_bound_copy` bounds them by the route's timeout as it is sent)
        timeout = {
            phase: MIRROR_TIMEOUT if seconds is None else seconds
            for phase, seconds in (request.extensions.get("timeout") or _MIRROR_TIMEOUTS).items()
        }
        return httpx.Request(
            request.method,
            url,
            headers=headers,
            stream=request.stream,
            extensions={"timeout": timeout},
        )

    def _start_copy(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        plan: RoutePlan,
        mirror: Mirror,
        *,
        may_wait: bool,
    ) -> tuple[httpx.Request, MirrorCopy] | None:
        """A mirrored copy started on its mirror cluster (see `start_mirror`), and the
        request it sends; None when the cluster drops it. `may_wait`: it may wait for a
        connection (bounded by the caller's pool timeout); else it is dropped."""
        pool = (request.extensions.get("timeout") or {}).get("pool") if may_wait else 0
        copy = start_mirror(self.mesh, plan, mirror, pool)
        if copy is None:
            return None
        return self._mirror_request(request, view, added, plan, copy), copy

    @staticmethod
    def _exchange(
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        request: httpx.Request,
        replayable: bool,
    ) -> Exchange:
        exchange = mesh.exchange(plan, replayable=replayable)
        choose_hash_key(exchange, mesh, attributes)
        # Waiting for a connection (maxConnections) is bounded by httpx's pool timeout. Set
        # on every request: a policy update may add maxConnections before a retry.
        exchange.pool_timeout = (request.extensions.get("timeout") or {}).get("pool")
        exchange.pool_timeout_error = httpx.PoolTimeout
        exchange.caller_request = request
        return exchange

    def _respond(
        self,
        request: httpx.Request,
        plan: RoutePlan,
        exchange: Exchange,
        result: AttemptResult,
        flags: list[str],
    ) -> Handled:
        """The response for the final attempt: upstream's, or the answer Envoy would give."""
        if (result.client_timeout or result.broke_off) and result.error is not None:
            raise result.error  # the caller's own timeout, a body broken off: as without the mesh
        if exchange.flags or result.reply is not None or result.failure is not None:
            flags = ordered(flags + exchange.response_flags(result))
        reply = exchange.final_reply(result)
        if reply is not None:
            return self._local(reply, request, flags, plan), None, None
        response = self._finish(result.response, plan, exchange, flags)
        headers = None if plan.response_headers else result.headers
        return response, headers, exchange.service_time(result)

    def _prepare(
        self, request: httpx.Request, items: list[tuple[str, str]]
    ) -> tuple[Mesh, RoutePlan, RequestAttributes]:
        mesh = self.mesh
        attributes = request_attributes(request, items)
        return mesh, mesh.plan(attributes), attributes


class MeshTransport(_MeshTransportBase, httpx.BaseTransport):
    """An httpx transport that applies the mesh's policy, over any inner transport."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        self._mesh = given_mesh(mesh, "meshlib.MeshTransport")
        self._inner = transport if transport is not None else httpx.HTTPTransport(**kwargs)
        # Its `closes` counts close_mirrors() calls: a copy queued before one goes through a
        # pool of its own (see `_take_pool`), not through one opened after the close, which
        # nobody would close. Its `pool` is a `_CopyPool`.
        self._mirroring = MirrorTracker()
        self._closes = _Closes()
        setattr(self, _MESHED, True)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        items, view, added = _view(request)
        mesh, plan, attributes = self._prepare(request, items)
        flags: list[str] = []  # the flags set so far, counted with an exception too
        try:
            response, headers, service = self._handle(
                request, view, added, mesh, plan, attributes, started, flags
            )
        except BaseException as exc:
            record_exception(mesh, plan, started, view, _exception_flag(exc), flags=flags)
            raise
        _record(mesh, plan, view, response, started, headers, service)
        return response

    def _handle(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        started: float,
        flags: list[str],
    ) -> Handled:
        if plan.passthrough:
            with client_span(mesh, request.method, request.url, None, None, view) as span:
                with passthrough_inside():
                    response = self._inner.handle_request(_passthrough(mesh, request, view, added))
                passed = self._result(response)
                end_client_span(mesh, span, passed)
                return response, passed.headers, None  # its service time: see record_source
        if plan.reply is not None:
            return self._local(plan.reply, request, flags, plan), None, None
        if plan.fault_delay is not None:
            flags.append(Flag.DELAY_INJECTED)  # set as the delay starts, as Envoy's is
            read = _read_timeout_first(request, plan.fault_delay)
            time.sleep(plan.fault_delay if read is None else read)
            if read is not None:
                raise _delay_timed_out(request)
        if plan.fault_abort is not None:
            return self._local(plan.fault_abort, request, flags, plan), None, None
        replayable = _replayable(request)
        exchange = self._exchange(mesh, plan, attributes, request, replayable)
        if plan.mirrors and replayable:
            exchange.shadow = lambda: self._start_mirrors(request, view, added, plan)

        reading = _READ_WHOLE.get()
        whole = reading is not None and reading.marks(request.extensions)
        closes = self._closes
        begun = closes.begun

        def send(attempt: Attempt) -> AttemptResult:
            with client_span(mesh, request.method, request.url, plan, attempt, view) as span:
                try:
                    with passthrough_inside():
                        upstream = self._upstream(mesh, request, view, added, plan, attempt)
                        response = self._inner.handle_request(upstream)
                except _CALLERS_OWN:
                    raise  # the request itself is wrong: the app's error, as without the mesh
                except httpx.TransportError as exc:
                    if closes.begun != begun:
                        raise  # the app closed the client under it: its error, never retried
                    result = _failed(exc, request, attempt)
                else:
                    result = self._result(response)
                    if exchange.began is not None:  # its headers came: before a body is read
                        result.answered = time.perf_counter()
                    if whole and not exchange.would_retry(result):
                        try:
                            _read_whole(response, exchange.deadline.at, result.headers, started)
                        except (httpx.TransportError, BodyTooLate) as exc:
                            result = _body_failed(exc, request, attempt)
                end_client_span(mesh, span, result)
                return result

        result = run_attempts(exchange, send, _close)
        return self._respond(request, plan, exchange, result, flags)

    def _start_mirrors(
        self, request: httpx.Request, view: dict[str, str], added: Added, plan: RoutePlan
    ) -> None:
        for mirror in plan.mirrors:
            started = self._start_copy(request, view, added, plan, mirror, may_wait=False)
            if started is not None and not self._mirroring.submit(
                self._send_mirror, *started, self._mirroring.closes
            ):
                started[1].end(None)  # MAX_MIRRORS_PENDING copies pending: dropped

    def _take_pool(self, epoch: int) -> _CopyPool | None:
        """The pool a copy sent now goes through, counted as in use until `_give_back`: the
        transport's pool for copies, made when first needed (see `pool_like`); for a copy
        queued before the last `close_mirrors`, a pool of its own, closed after it (the
        transport's was closed, or is closed once its copies in flight end). None when no pool
        like the inner transport can be made: the copy goes through the inner one."""
        copies = self._mirroring
        with copies.lock:
            pool: _CopyPool | None = copies.pool if epoch == copies.closes else None
            if pool is None:
                made = pool_like(self._inner)
                if made is None:
                    return None
                pool = _CopyPool(made)
                if epoch == copies.closes:
                    copies.pool = pool
                else:
                    pool.retired = True
            pool.users += 1
            return pool

    def _give_back(self, pool: _CopyPool) -> None:
        """A copy is done with `pool`: the last one out of a retired pool closes it."""
        with self._mirroring.lock:
            pool.users -= 1
            last = pool.retired and pool.users == 0
        if last:
            pool.transport.close()

    def _send_mirror(self, request: httpx.Request, copy: MirrorCopy, epoch: int) -> None:
        result: AttemptResult | None = None
        pool: _CopyPool | None = None
        try:
            pool = self._take_pool(epoch)
            transport = self._inner if pool is None else pool.transport
            if pool is None and epoch != self._mirroring.closes:
                # Queued before a close: sent through the inner transport's pool, opened anew
                # for it, on a connection closed after it.
                request.headers["connection"] = "close"
            with passthrough_inside():
                try:
                    response = transport.handle_request(_bound_copy(request, copy))
                except httpx.TransportError as exc:
                    if pool is not None or epoch == self._mirroring.closes:
                        result = _failed(exc, request, copy.attempt)  # as a try's
                    # else the app closed the transport under it: not the mirror's failure
                    return
                result = AttemptResult(status=response.status_code)
                try:
                    response.read()
                finally:
                    response.close()  # read or not, its connection is given back
        except Exception:  # a mirror never affects anything: its failures are dropped
            pass
        finally:
            try:
                copy.end(result)  # its outcome to outlier detection, its slot given back
            finally:
                if pool is not None:
                    self._give_back(pool)

    def close(self) -> None:
        self.closing()
        self.close_mirrors()
        self._inner.close()

    def adopt_mirrors(self, earlier: MeshTransport) -> None:
        """Share the mirrored copies and their pool of the transport this one replaces over
        the same inner one (`instrument()` with another Mesh), before sending any: closing
        this one retires the pool the earlier one's copies go through too, and one it queued
        goes on a pool of its own; and its count of closes, so that its calls in flight are
        not retried through the closed pool."""
        self._mirroring = earlier._mirroring
        self._closes = earlier._closes

    def close_mirrors(self) -> None:
        """Count a close, without waiting for the mirrored copies (Envoy never holds a caller
        for its shadow, and `httpx.get()` closes a client on every call), and retire their
        pool: closed now when no copy is in flight on it, else by the last one to end, so a
        copy in flight is not cut off. A copy still queued goes when a thread frees, on a pool
        of its own closed after it (see `_take_pool`): no copy is dropped, and no connection
        stays open in a pool nobody closes. (Copies that go through the inner transport, one
        meshlib cannot copy, end with it as anything on it does.) `close()` does it;
        `instrument()` does it when a stock transport closes."""
        copies = self._mirroring
        with copies.lock:
            copies.closes += 1
            pool, copies.pool = copies.pool, None
            if pool is not None:
                pool.retired = True
                if pool.users:
                    return  # closed by the last copy in flight
        if pool is not None:
            pool.transport.close()


def _read_whole(
    response: httpx.Response,
    until: float | None,
    headers: Mapping[str, str] | None,
    started: float,
) -> None:
    """Read the body of a response the caller reads whole (not streamed) within its try, as
    Envoy's timeouts and in-flight counts cover the whole response: the route deadline
    (`until`, `time.monotonic()`) bounds it, checked between reads (each read is bounded by
    the try's read timeout). The response then holds the bytes, read again as httpx would."""
    stream = response.stream
    if isinstance(stream, httpx.ByteStream):  # it came whole
        _hand_over(response, b"".join(stream), headers, started)
        return
    assert isinstance(stream, httpx.SyncByteStream)
    chunks = []
    try:
        for chunk in stream:
            if until is not None and time.monotonic() > until:
                raise BodyTooLate
            chunks.append(chunk)
    finally:
        stream.close()
    _hand_over(response, b"".join(chunks), headers, started)


async def _aread_whole(
    response: httpx.Response,
    until: float | None,
    headers: Mapping[str, str] | None,
    started: float,
) -> None:
    """`_read_whole` for asyncio: the route deadline bounds the whole read."""
    stream = response.stream
    if isinstance(stream, httpx.ByteStream):  # it came whole
        _hand_over(response, b"".join(stream), headers, started)
        return
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        if until is None:
            body = await _joined(stream)
        else:
            try:
                body = await within(_joined(stream), until - time.monotonic())
            except asyncio.TimeoutError:
                raise BodyTooLate from None
    finally:
        await stream.aclose()
    _hand_over(response, body, headers, started)


def _hand_over(
    response: httpx.Response, body: bytes, headers: Mapping[str, str] | None, started: float
) -> None:
    """`response` holding `body`, read as httpx would read it (see `_httpx_body`); `elapsed`
    set as httpx sets it, when the body is in. `headers` are those `_result` read (None:
    unknown, so the body is left for httpx to decode)."""
    encoded = headers is None or "content-encoding" in headers
    hold(response, body, encoded)
    if not encoded:
        response.elapsed = datetime.timedelta(seconds=time.perf_counter() - started)


async def _joined(stream: httpx.AsyncByteStream) -> bytes:
    return b"".join([chunk async for chunk in stream])


def _close(response: Any) -> None:
    """Discard a response that will be retried (see DRAIN_BYTES)."""
    if response is None:
        return
    until = time.monotonic() + DRAIN_SECONDS
    read = 0
    try:
        with contextlib.suppress(Exception):  # a discarded answer never fails the call
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > DRAIN_BYTES or time.monotonic() > until:
                    break
    finally:
        response.close()  # also when interrupted: its connection is given back


async def _aclose(response: Any) -> None:
    """`_close` for asyncio."""
    if response is None:
        return
    try:
        with contextlib.suppress(Exception):  # a discarded answer never fails the call
            await within(_drain(response), DRAIN_SECONDS)
    finally:
        await response.aclose()  # also when cancelled: its connection is given back


async def _drain(response: httpx.Response) -> None:
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read > DRAIN_BYTES:
            return


class AsyncMeshTransport(_MeshTransportBase, httpx.AsyncBaseTransport):
    """The asyncio twin of MeshTransport. Its default inner transport keeps throughput
    under concurrency (see `meshlib.clients._http1`)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        self._mesh = given_mesh(mesh, "meshlib.AsyncMeshTransport")
        self._inner = transport if transport is not None else _default_async_transport(**kwargs)
        self._mirrors = _AsyncCopies()
        self._closes = _Closes()
        setattr(self, _MESHED, True)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        items, view, added = _view(request)
        mesh, plan, attributes = self._prepare(request, items)
        flags: list[str] = []  # the flags set so far, counted with an exception too
        try:
            response, headers, service = await self._handle(
                request, view, added, mesh, plan, attributes, started, flags
            )
        except BaseException as exc:
            record_exception(mesh, plan, started, view, _exception_flag(exc), flags=flags)
            raise
        _record(mesh, plan, view, response, started, headers, service)
        return response

    async def _handle(
        self,
        request: httpx.Request,
        view: dict[str, str],
        added: Added,
        mesh: Mesh,
        plan: RoutePlan,
        attributes: RequestAttributes,
        started: float,
        flags: list[str],
    ) -> Handled:
        if plan.passthrough:
            with client_span(mesh, request.method, request.url, None, None, view) as span:
                with passthrough_inside():
                    response = await self._inner.handle_async_request(
                        _passthrough(mesh, request, view, added)
                    )
                passed = self._result(response)
                end_client_span(mesh, span, passed)
                return response, passed.headers, None  # its service time: see record_source
        if plan.reply is not None:
            return self._local(plan.reply, request, flags, plan), None, None
        if plan.fault_delay is not None:
            flags.append(Flag.DELAY_INJECTED)  # set as the delay starts, as Envoy's is
            read = _read_timeout_first(request, plan.fault_delay)
            await sleep(plan.fault_delay if read is None else read)
            if read is not None:
                raise _delay_timed_out(request)
        if plan.fault_abort is not None:
            return self._local(plan.fault_abort, request, flags, plan), None, None
        replayable = _replayable(request)
        exchange = self._exchange(mesh, plan, attributes, request, replayable)
        if plan.mirrors and replayable:
            exchange.shadow = lambda: self._start_mirrors(request, view, added, plan)

        reading = _READ_WHOLE.get()
        whole = reading is not None and reading.marks(request.extensions)
        closes = self._closes
        begun = closes.begun

        async def send(attempt: Attempt) -> AttemptResult:
            with client_span(mesh, request.method, request.url, plan, attempt, view) as span:
                try:
                    with passthrough_inside():
                        upstream = self._upstream(mesh, request, view, added, plan, attempt)
                        response = await self._inner.handle_async_request(upstream)
                except _CALLERS_OWN:
                    raise  # the request itself is wrong: the app's error, as without the mesh
                except httpx.TransportError as exc:
                    if closes.begun != begun:
                        raise  # the app closed the client under it: its error, never retried
                    result = _failed(exc, request, attempt)
                else:
                    result = self._result(response)
                    if exchange.began is not None:  # its headers came: before a body is read
                        result.answered = time.perf_counter()
                    if whole and not exchange.would_retry(result):
                        try:
                            await _aread_whole(
                                response, exchange.deadline.at, result.headers, started
                            )
                        except (httpx.TransportError, BodyTooLate) as exc:
                            result = _body_failed(exc, request, attempt)
                end_client_span(mesh, span, result)
                return result

        result = await run_attempts_async(exchange, send, _aclose)
        return self._respond(request, plan, exchange, result, flags)

    def _start_mirrors(
        self, request: httpx.Request, view: dict[str, str], added: Added, plan: RoutePlan
    ) -> None:
        for mirror in plan.mirrors:
            if len(self._mirrors) >= MAX_MIRRORS_PENDING:
                return  # copies pending: new ones are dropped
            started = self._start_copy(request, view, added, plan, mirror, may_wait=True)
            if started is not None:
                copied, copy = started
                self._mirrors.start(
                    functools.partial(self._send_mirror, copied, copy), copy.given_up
                )

    def _mirroring_transport(self) -> httpx.AsyncBaseTransport:
        """Where copies go: a pool of their own when one like the inner transport can be made
        (see `pool_like`), else the inner transport."""
        copies = self._mirrors
        if copies.pool is None:
            copies.pool = pool_like(self._inner)
        return copies.pool or self._inner

    async def _send_mirror(self, request: httpx.Request, copy: MirrorCopy) -> None:
        result: AttemptResult | None = None
        try:
            if not await copy.wait_async():  # maxConnections in use: wait, not for good
                return
            with passthrough_inside():
                try:
                    response = await self._mirroring_transport().handle_async_request(
                        _bound_copy(request, copy)
                    )
                except httpx.TransportError as exc:
                    result = _failed(exc, request, copy.attempt)  # as a try's
                    return
                result = AttemptResult(status=response.status_code)
                try:
                    await response.aread()
                finally:
                    await response.aclose()  # read or not, its connection is given back
        except Exception:  # a mirror never affects anything: its failures are dropped
            pass
        finally:
            copy.end(result)  # its outcome to outlier detection; cancelled: given back

    async def aclose(self) -> None:
        self.closing()
        await self.aclose_mirrors()
        await self._inner.aclose()

    def adopt_mirrors(self, earlier: AsyncMeshTransport) -> None:
        """Share the mirrored copies and their pool of the transport this one replaces over
        the same inner one (`instrument()` with another Mesh), before sending any: closing
        this one gives the earlier one's copies their grace and cancels them too (one waiting
        for a connection would otherwise open a pool nobody closes), and closes the pool; and
        its count of closes, so that its calls in flight are not retried through the closed
        pool."""
        self._mirrors = earlier._mirrors
        self._closes = earlier._closes

    async def aclose_mirrors(self) -> None:
        """Give copies in flight up to MIRROR_GRACE to finish (then drop them), and close
        their own pool.

        Unlike the sync clients' `close()`, this waits. A sync copy runs on a process-wide
        thread that outlives the client (and that Python lets finish at exit), so not waiting
        loses nothing. An async copy is a task of the event loop, which ends with it, and an
        `AsyncClient` is most often closed as the app shuts down, right before its loop ends:
        httpx has no function that makes and closes one per call, as `httpx.get()` does, and
        advises one client for the app's life. Not waiting would not let those copies go, only
        leave them to be cancelled with the loop."""
        copies = self._mirrors
        await copies.aclose(MIRROR_GRACE)
        pool, copies.pool = copies.pool, None
        if pool is not None:
            await pool.aclose()


def pool_like(inner: Any) -> Any:
    """A transport with `inner`'s settings and a connection pool of its own, for mirrored
    copies (Envoy sends them through the mirror cluster's own pool: a slow shadow must not
    take the connections the calls themselves wait for): meshlib's HTTP/1.1 transport makes
    its `sibling()`; httpx's own, without a proxy, is matched by a new one with its TLS
    context and HTTP versions (for asyncio, meshlib's HTTP/1.1 pool when it speaks only
    HTTP/1.1). None for any other transport (an app's own, a mock): copies go through it."""
    sibling = getattr(inner, "sibling", None)
    if callable(sibling):
        return sibling()  # None when it cannot make one
    pool = getattr(inner, "_pool", None)
    try:
        if type(inner) is httpx.HTTPTransport and type(pool) is httpcore.ConnectionPool:
            return httpx.HTTPTransport(
                verify=pool._ssl_context or True, http1=pool._http1, http2=pool._http2
            )
        if type(inner) is httpx.AsyncHTTPTransport and type(pool) is httpcore.AsyncConnectionPool:
            # Not meshlib's HTTP/1.1 pool for an HTTP/2 one: a prior-knowledge mirror would get
            # HTTP/1.1, and over TLS the context they share offers h2 by ALPN once httpcore
            # has set it so, which that pool must refuse.
            only_h2: dict[str, Any] = {} if pool._http1 else {"http1": False}
            return _default_async_transport(
                verify=pool._ssl_context or True, http2=pool._http2, **only_h2
            )
    except AttributeError:  # another httpcore: the inner transport it is
        pass
    return None


# httpx's own default pool limits (`httpx.Limits()` alone sets none)
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def _default_async_transport(
    *,
    verify: Any = True,
    limits: httpx.Limits | None = None,
    http2: bool = False,
    trust_env: bool = True,
    **kwargs: Any,
) -> httpx.AsyncBaseTransport:
    """meshlib's HTTP/1.1 pool (it keeps throughput under concurrency), unless HTTP/2 or an
    option only httpx's own transport understands is asked for."""
    if http2 or kwargs:
        return httpx.AsyncHTTPTransport(
            verify=verify,
            limits=limits or _DEFAULT_LIMITS,
            http2=http2,
            trust_env=trust_env,
            **kwargs,
        )
    from meshlib.clients._http1 import Http1Transport

    limits = limits or _DEFAULT_LIMITS
    return Http1Transport(
        verify=verify,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        trust_env=trust_env,
    )


class _Cookies(httpx.Cookies):
    """httpx's cookie store, skipping the cookie jar when a response sets no cookie.

    httpx hands every response to `http.cookiejar` (through urllib request and response
    adapters), which then finds no `Set-Cookie` header in most responses: that costs ~15 µs
    per request, more than routing it. Responses that do set cookies go the usual way.
    """

    @classmethod
    def sharing(cls, cookies: httpx.Cookies) -> _Cookies:
        """This store over the same jar (a `CookieJar` the app passed stays the one used)."""
        store = cls()
        store.jar = cookies.jar
        return store

    def extract_cookies(self, response: httpx.Response) -> None:
        for name, _ in lowercase_raw(response.headers):
            if name == b"set-cookie" or name == b"set-cookie2":
                super().extract_cookies(response)
                return


_PARSED_URLS = 256  # distinct URL strings a client keeps parsed; more start the cache anew


class _ClientMixin:
    """What meshlib's clients change in httpx's own per-request work, behaviour unchanged.

    - The cookie store skips the cookie jar for responses that set no cookie (`_Cookies`);
      setting `client.cookies` keeps that store.
    - A URL string is parsed once: httpx parses it on every call (~8 µs, more than routing
      the request), though apps call the same few URLs again and again. httpx URLs are
      immutable, so requests can share the parsed form; the cache holds at most
      `_PARSED_URLS` strings and starts anew when `base_url` changes.
    - A response `send` has read is freed when the app drops it (`_unbound`).
    - A redirect's new request is read whole as the first was (`_Reading`).
    """

    _cookies: httpx.Cookies
    _base_url: httpx.URL
    _parsed: tuple[httpx.URL, dict[str, httpx.URL]] | None = None

    @property
    def cookies(self) -> httpx.Cookies:
        return self._cookies

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        self._cookies = _Cookies(cookies)

    def _build_redirect_request(self, request: httpx.Request, response: httpx.Response) -> Any:
        redirect = super()._build_redirect_request(request, response)  # type: ignore[misc]
        reading = _READ_WHOLE.get()
        if reading is not None and reading.marks(request.extensions):
            reading.more.append(redirect.extensions)  # httpx copied them: the next hop's
        return redirect

    def _merge_url(self, url: httpx.URL | str) -> httpx.URL:
        if not isinstance(url, str):
            return super()._merge_url(url)  # type: ignore[misc, no-any-return]
        parsed = self._parsed
        if parsed is None or parsed[0] is not self._base_url or len(parsed[1]) >= _PARSED_URLS:
            parsed = self._parsed = (self._base_url, {})
        merged = parsed[1].get(url)
        if merged is None:
            merged = parsed[1][url] = super()._merge_url(url)  # type: ignore[misc]
        return merged


def _unbound(response: httpx.Response) -> httpx.Response:
    """`response`, read and closed, its stream no longer pointing back at it.

    httpx wraps each response's stream in one that points back at the response, to set
    `elapsed` when it closes: a reference cycle, so every response (its headers, body and
    decoder) waits for the cyclic garbage collector instead of being freed when the app drops
    it. Under concurrency those collections cost more CPU than the mesh's routing. Once the
    body is read and the stream closed, the binding has done its job: the stream becomes the
    bytes read, which is all a read response's stream can still give.
    """
    for read in (*response.history, response):
        if read.is_closed:
            try:
                content = read.content
            except httpx.ResponseNotRead:  # closed without being read: left as httpx made it
                continue
            read.stream = httpx.ByteStream(content)
    return response


def _mesh_every_transport(
    client: httpx.Client | httpx.AsyncClient, wrap: Callable[[Any], Any]
) -> None:
    """Wrap the transports httpx made for `client` — the given or default one, `mounts=`,
    and the proxies from `proxy=` or the environment (HTTP_PROXY, NO_PROXY, ...) — so that
    every request goes through the mesh, whichever transport httpx picks for its URL."""

    def meshed(transport: Any) -> Any:
        return (
            transport
            if transport is None or getattr(transport, _MESHED, False)
            else wrap(transport)
        )

    client._transport = meshed(client._transport)
    client._mounts = {pattern: meshed(t) for pattern, t in client._mounts.items()}


class Client(_ClientMixin, httpx.Client):
    """An `httpx.Client` whose requests go through the mesh.

    Every httpx feature still works: httpx makes its transports as it always does (the given
    one or its default, `mounts=`, proxies from `proxy=` or the environment), and each is
    wrapped, not replaced.
    """

    def __init__(self, *args: Any, mesh: Mesh | None = None, **kwargs: Any) -> None:
        given_mesh(mesh, "meshlib.Client")  # before httpx opens anything
        super().__init__(*args, **kwargs)
        _mesh_every_transport(self, lambda inner: MeshTransport(inner, mesh=mesh))
        self._cookies = _Cookies.sharing(self._cookies)

    def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes | httpx._client.UseClientDefault | None = (
            httpx.USE_CLIENT_DEFAULT
        ),
        follow_redirects: bool | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if stream:
            return super().send(request, stream=True, auth=auth, follow_redirects=follow_redirects)
        with _Reading(request.extensions):
            response = super().send(request, auth=auth, follow_redirects=follow_redirects)
        return _unbound(response)


class AsyncClient(_ClientMixin, httpx.AsyncClient):
    """An `httpx.AsyncClient` whose requests go through the mesh.

    As `Client`; without `transport=`, the default one is meshlib's HTTP/1.1 pool (it keeps
    throughput under concurrency), unless an option only httpx's own transport has is given
    (`http2`, `cert`). Proxies, from `proxy=` or the environment, go through httpx's transports.
    """

    def __init__(self, *args: Any, mesh: Mesh | None = None, **kwargs: Any) -> None:
        given_mesh(mesh, "meshlib.AsyncClient")  # before httpx opens anything
        super().__init__(*args, **kwargs)
        if kwargs.get("transport") is None:
            options = {"cert": kwargs["cert"]} if kwargs.get("cert") is not None else {}
            if kwargs.get("http1") is False:  # HTTP/2 only (prior knowledge): httpx's transport
                options["http1"] = False
            # httpx made its own default transport, unused yet (no connection, nothing to close)
            self._transport = _default_async_transport(
                verify=kwargs.get("verify", True),
                limits=kwargs.get("limits"),
                http2=kwargs.get("http2", False),
                trust_env=kwargs.get("trust_env", True),
                **options,
            )
        _mesh_every_transport(self, lambda inner: AsyncMeshTransport(inner, mesh=mesh))
        self._cookies = _Cookies.sharing(self._cookies)

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes | httpx._client.UseClientDefault | None = (
            httpx.USE_CLIENT_DEFAULT
        ),
        follow_redirects: bool | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if stream:
            return await super().send(
                request, stream=True, auth=auth, follow_redirects=follow_redirects
            )
        with _Reading(request.extensions):
            response = await super().send(request, auth=auth, follow_redirects=follow_redirects)
        return _unbound(response)
