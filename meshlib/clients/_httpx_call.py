"""One meshed httpx call as the mesh sees it, and the requests meshlib sends for it.

The adapter's translation between httpx's request and response and the mesh's neutral model:
the request's headers decoded once (`_view`), what routing sees (`request_attributes`), the URL
a try goes to, built without parsing it again (`_upstream_url`), a passthrough host's request
(`_passthrough`), whether a body can be sent again (`_replayable`), the response headers the
mesh reads, in one pass (`_response_headers`), and the call counted once answered (`_record`).
The transports (`_httpx_transport`, and `_httpx_base` for what the two share) run these on
every request: plain functions, imported by name.

Split out of `meshlib.clients.httpx`, and, like it, not compiled (see pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from meshlib.clients._common import (
    REQUEST_ID,
    RESPONSE_FLAGS,
    UPSTREAM_HOST,
    forget_identity,
    record_source,
    request_id,
)
from meshlib.clients._httpx_headers import decoded, extended, lowercase_raw
from meshlib.dataplane.deadline import remaining as remaining_deadline
from meshlib.dataplane.deadline import within as within_deadline
from meshlib.dataplane.routing import RoutePlan
from meshlib.mesh import Mesh
from meshlib.policy.matching import LazyHeaders, RequestAttributes
from meshlib.policy.snapshot import Endpoint
from meshlib.telemetry import peer, propagation

# request.extensions keys meshlib's HTTP/1.1 transport reads (`_http1.TRY_DEADLINE`,
# `_http1.TRY_TIMEOUT`; not imported, so that sync clients do not load it): when a try's
# response headers are due at the latest (the route deadline, then the try's own once it has
# a connection), and the try's time, which starts when it has a connection.
_TRY_DEADLINE = "meshlib.try_deadline"
_TRY_TIMEOUT = "meshlib.try_timeout"


def _smaller(a: float | None, b: float | None) -> float | None:
    return b if a is None else (a if b is None else min(a, b))


_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a transport's `_handle` gives (`_httpx_transport`): the response, its headers as
# `_MeshTransportBase._result` read them (None when the response is meshlib's own or was edited
# since: then they are read again), and Envoy's upstream service time in ms, when measured for
# the access log (`Exchange.began`).
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
    `_MeshTransportBase._result` read, when still current."""
    extensions = response.extensions
    rid = request_headers["x-request-id"]
    if plan.passthrough:  # the inner transport's dict, maybe not this response's alone
        response.extensions = extensions = {**extensions, REQUEST_ID: rid}
    else:  # a dict of meshlib's (`_MeshTransportBase._finish`, `_local`)
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

    The id goes in each try, copy and passthrough request meshlib builds
    (`_MeshTransportBase._upstream` and `_mirror_request`, `_passthrough`), never in the
    caller's `httpx.Request`: one the app sends again (its own retry, `client.send` twice) is a
    new call with an id of its own, as behind a sidecar, and the app's request keeps the
    headers the app gave it."""
    items = decoded(request.headers)
    view = dict(items)
    if "x-request-id" in view:
        return items, view, ()
    rid = ("x-request-id", request_id())
    items.append(rid)
    view["x-request-id"] = rid[1]
    return items, view, (rid,)


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
