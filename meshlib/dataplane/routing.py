"""From a request to a RoutePlan: everything decided before the first byte is sent.

    plan = plan_route(snapshot, RequestAttributes("GET", "reviews:9080", "/r/1"), rng)
    plan.reply          # a LocalReply when Envoy would answer itself (NR, NC, redirect, ...)
    plan.cluster        # (host, subset, port) whose endpoints to balance over
    plan.path, plan.authority, plan.request_headers   # what to send upstream

The same plan serves httpx sync, httpx async and requests: adapters only carry it out.
Random choices (weighted destination, fault and mirror percentages) take an injected
`random.Random`, so tests can make them repeatable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from meshlib.dataplane import outcome
from meshlib.dataplane.outcome import LocalReply
from meshlib.policy.hosts import strip_port
from meshlib.policy.matching import RequestAttributes, RouteMatcher
from meshlib.policy.regex import re2_replace_all
from meshlib.policy.routes import CompiledRoute, Mirror, RetryPolicy, RouteDestination
from meshlib.policy.snapshot import RouteDecision, Snapshot
from meshlib.policy.virtual_service import (
    GRPC_STATUS_CODES,
    HeaderOperations,
    Headers,
    HTTPRedirect,
)

ClusterKey = tuple[str, str | None, int | None]  # (host FQDN, subset, service port)
_AUTHORITY_KEYS = ("host", ":authority")


@dataclass(slots=True)
class HeaderEdits:
    """Header changes to apply: drop `set` and `remove` names, then put `set`, then `add`.

    Built from Istio `headers` operations with Envoy's `HeaderParser::evaluateHeaders` order:
    each parser removes first, then overwrites (every `set`), then appends (every `add`).
    `then` folds one more parser in, so that a name is never both removed and set or added:
    applying `remove` before or after `set`/`add` gives the same headers (`edited_headers`
    relies on it).
    """

    set: dict[str, str] = field(default_factory=dict)
    add: list[tuple[str, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    def then(self, *parsers: HeaderOperations | None) -> None:
        """Apply these operations after the ones already here, as one Envoy parser: every
        remove of them, then every set, then every add. An empty value is skipped, as Envoy
        skips it without `keep_empty_value` (which Istio never sets)."""
        for ops in parsers:
            if ops is not None:
                for name in ops.remove:
                    self._remove(name.lower())
        for ops in parsers:
            if ops is not None:
                for name, value in ops.set.items():
                    if value and name.lower() not in _AUTHORITY_KEYS:
                        self.overwrite(name.lower(), value)
        for ops in parsers:
            if ops is not None:
                for name, value in ops.add.items():
                    if value and name.lower() not in _AUTHORITY_KEYS:
                        self._append(name.lower(), value)

    def overwrite(self, name: str, value: str) -> None:
        if any(n == name for n, _ in self.add):
            self.add = [(n, v) for n, v in self.add if n != name]
        if name in self.remove:
            self.remove.remove(name)  # `set` drops what came before as well
        self.set[name] = value

    def _append(self, name: str, value: str) -> None:
        if name in self.remove:  # removed, then added: the same as set
            self.remove.remove(name)
            self.set[name] = value
        else:
            self.add.append((name, value))

    def _remove(self, name: str) -> None:
        self.set.pop(name, None)
        if any(n == name for n, _ in self.add):
            self.add = [(n, v) for n, v in self.add if n != name]
        if name not in self.remove:
            self.remove.append(name)

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


NO_EDITS = HeaderEdits()
"""What plans without header edits share (most of them): read only, never modified."""


@dataclass(slots=True)
class RoutePlan:
    """What to do with one request. Built once per request by `plan_route`."""

    decision: RouteDecision
    method: str = "GET"
    query: str = ""
    reply: LocalReply | None = None  # answered locally, no upstream involved
    passthrough: bool = False  # unknown host: send as is
    destination: RouteDestination | None = None
    cluster: ClusterKey | None = None
    scheme: str = "http"
    authority: str = ""  # Host to send upstream
    path: str = "/"
    original_path: str | None = None  # set when the path was rewritten
    request_headers: HeaderEdits = field(default_factory=lambda: NO_EDITS)
    response_headers: HeaderEdits = field(default_factory=lambda: NO_EDITS)
    retries: RetryPolicy | None = None
    timeout: float | None = None  # the route's deadline over all attempts, seconds
    fault_delay: float | None = None  # decided: delay this request by this many seconds
    fault_abort: LocalReply | None = None  # decided: abort this request with this answer
    mirrors: tuple[Mirror, ...] = ()  # decided: send a copy to each of these

    @property
    def route(self) -> CompiledRoute | None:
        return self.decision.route


def plan_route(snapshot: Snapshot, request: RequestAttributes, rng: random.Random) -> RoutePlan:
    """Decide how `request` is routed, as a sidecar with `snapshot` would."""
    decision = snapshot.route(request)
    plan = RoutePlan(
        decision,
        method=request.method,
        query=request.query,
        scheme=request.scheme,
        authority=request.authority,
        path=request.path,
    )
    route = decision.route
    if decision.passthrough:
        plan.passthrough = True
        return plan
    if route is None:
        plan.reply = outcome.no_route()
        return plan
    if route.redirect is not None:
        plan.reply = _redirect(route.redirect, request, decision)
        _response_headers(plan, route.headers, None)  # Envoy edits redirects' headers too
        return plan
    if route.direct_response is not None:
        body = route.direct_response.body
        plan.reply = outcome.direct(route.direct_response.status, body.content() if body else b"")
        _response_headers(plan, route.headers, None)
        return plan
    destination = _pick(route.destinations, route.total_weight, rng)
    if destination is None:
        plan.reply = outcome.no_cluster()
        return plan
    port = destination.port if destination.port is not None else decision.port
    if port is None:  # no port in the authority: the URL's, else the scheme's (80 / 443)
        port = request.port
    service = snapshot.service(destination.host)
    if service is None or (
        destination.subset is not None
        and not snapshot.has_subset(destination.host, destination.subset)
    ):
        plan.reply = outcome.no_cluster()  # Envoy has no cluster for it: 503 NC
        return plan
    service_port = service.serving_port(port, named=destination.port is not None)
    if service_port is None:
        plan.reply = outcome.no_cluster()
        return plan
    plan.destination = destination
    plan.cluster = (destination.host, destination.subset, service_port.number)
    plan.retries = route.retries
    plan.timeout = route.timeout.seconds if route.timeout is not None else None
    original = _rewrite(plan, route, decision.matched, request)
    _request_headers(plan, route.headers, destination.headers, route.weighted, original)
    _response_headers(plan, route.headers, destination.headers, route.weighted)
    _decide_faults(plan, route, request, rng)
    plan.mirrors = tuple(m for m in route.mirrors if m.fraction >= 1.0 or rng.random() < m.fraction)
    return plan


def _pick(
    destinations: tuple[RouteDestination, ...], total: int, rng: random.Random
) -> RouteDestination | None:
    if len(destinations) == 1:
        return destinations[0]
    if total <= 0:
        return None
    point = rng.random() * total
    for destination in destinations:
        point -= destination.weight
        if point < 0:
            return destination
    return destinations[-1]


def _rewrite(
    plan: RoutePlan, route: CompiledRoute, matched: RouteMatcher | None, request: RequestAttributes
) -> str | None:
    """Rewrite the plan's authority and path; the `x-envoy-original-path` to send, if any."""
    rewrite = route.rewrite
    authority = _header_authority(route.headers)
    if rewrite is not None and rewrite.authority:
        authority = rewrite.authority
    if authority is None and plan.destination is not None:
        authority = _header_authority(plan.destination.headers)
    if authority is not None:
        plan.authority = authority
    if rewrite is None:
        return None
    path = request.path
    if rewrite.uri is not None:
        uri = matched.uri if matched is not None else None
        if uri is not None and uri.prefix is not None and _has_prefix(path, uri.prefix, matched):
            # Envoy's prefix_rewrite replaces as many characters as the prefix has, so with
            # ignoreUriCase `/API/v1` under prefix `/api` keeps `/v1`.
            path = rewrite.uri + path[len(uri.prefix) :]
        elif uri is not None and (uri.exact is not None or uri.regex is not None):
            path = rewrite.uri
        else:  # no uri match: Envoy rewrites the "/" prefix
            path = rewrite.uri + path[1:] if path.startswith("/") else rewrite.uri + path
    elif route.uri_regex_rewrite is not None:
        pattern, template = route.uri_regex_rewrite
        path = re2_replace_all(pattern, template, path)
    else:
        return None  # only the authority is rewritten
    if path != request.path:
        plan.original_path = request.path
        plan.path = path
    # Envoy copies the whole :path, query included, whenever a prefix or regex rewrite is
    # configured, even one that leaves the path as it was.
    return f"{request.path}?{request.query}" if request.query else request.path


def _has_prefix(path: str, prefix: str, matched: RouteMatcher | None) -> bool:
    if path.startswith(prefix):
        return True
    return (
        matched is not None
        and matched.ignore_uri_case
        and path[: len(prefix)].lower() == prefix.lower()
    )


def _header_authority(headers: Headers | None) -> str | None:
    """An authority set through `headers.request.set|add` (set wins over add)."""
    if headers is None or headers.request is None:
        return None
    for ops in (headers.request.set, headers.request.add):
        for name, value in ops.items():
            if value and name.lower() in _AUTHORITY_KEYS:  # pilot ignores an empty one
                return value
    return None


def _request_headers(
    plan: RoutePlan,
    route: Headers | None,
    dest: Headers | None,
    weighted: bool,
    original_path: str | None,
) -> None:
    route_ops = route.request if route is not None else None
    dest_ops = dest.request if dest is not None else None
    if route_ops is None and dest_ops is None and original_path is None:
        return  # the plan keeps the shared NO_EDITS
    edits = plan.request_headers = HeaderEdits()
    _fold(edits, route_ops, dest_ops, weighted)
    if original_path is not None:
        edits.overwrite("x-envoy-original-path", original_path)


def _response_headers(
    plan: RoutePlan, route: Headers | None, dest: Headers | None, weighted: bool = False
) -> None:
    route_ops = route.response if route is not None else None
    dest_ops = dest.response if dest is not None else None
    if route_ops is None and dest_ops is None:
        return
    edits = plan.response_headers = HeaderEdits()
    _fold(edits, route_ops, dest_ops, weighted)


def _fold(
    edits: HeaderEdits,
    route_ops: HeaderOperations | None,
    dest_ops: HeaderOperations | None,
    weighted: bool,
) -> None:
    """Route and destination operations in the order Istio and Envoy apply them.

    One destination: pilot appends its operations to the route's, in one Envoy parser, so
    all removes go first, then route set, destination set, route add, destination add (a
    route `add` is appended after a destination `set` of the same header). Several
    destinations: each is an Envoy weighted cluster, whose parser runs before the route's,
    so the route has the last word.
    """
    if weighted:
        edits.then(dest_ops)
        edits.then(route_ops)
    else:
        edits.then(route_ops, dest_ops)


def _decide_faults(
    plan: RoutePlan, route: CompiledRoute, request: RequestAttributes, rng: random.Random
) -> None:
    fault = route.fault
    if fault is None:
        return
    delay = fault.delay
    if delay is not None and delay.fixed_delay is not None and _chance(delay.fraction, rng):
        plan.fault_delay = delay.fixed_delay.seconds
    abort = fault.abort
    # An abort without an error type is no abort: pilot leaves it out of the Envoy route.
    if abort is not None and (abort.http_status or abort.grpc_status) is not None:
        if not _chance(abort.fraction, rng):
            return
        if abort.http_status is None:
            code = _GRPC_CODES.get(abort.grpc_status or "", 2)
            plan.fault_abort = outcome.grpc_fault_abort(code, _is_grpc(request))
        else:
            plan.fault_abort = outcome.fault_abort(abort.http_status)


def _is_grpc(request: RequestAttributes) -> bool:
    """Envoy's test for a gRPC request: content-type `application/grpc`, alone or followed
    by `+` (so not gRPC-Web)."""
    content_type = request.headers.get("content-type", "")
    return content_type.startswith("application/grpc") and (
        len(content_type) == 16 or content_type[16] == "+"
    )


def _chance(fraction: float, rng: random.Random) -> bool:
    return fraction >= 1.0 or (fraction > 0.0 and rng.random() < fraction)


_GRPC_CODES = {name: code for code, name in enumerate(GRPC_STATUS_CODES)}


def _redirect(
    redirect: HTTPRedirect, request: RequestAttributes, decision: RouteDecision
) -> LocalReply:
    scheme = redirect.scheme or request.scheme
    host = (
        redirect.authority or decision.host if redirect.authority else _host_only(request.authority)
    )
    port: int | None = redirect.port
    if port is None and redirect.derive_port == "FROM_REQUEST_PORT":
        port = request.port
    elif port is None and not redirect.authority:
        # No port_redirect (pilot emits none for FROM_PROTOCOL_DEFAULT): Envoy keeps the
        # request's host:port
        _, port = strip_port(request.authority)
        if scheme != request.scheme and (request.scheme, port) in _DEFAULT_PORTS:
            port = None  # Envoy drops the old scheme's default port when the scheme changes
    if port is not None and (scheme, port) in _DEFAULT_PORTS:
        port = None  # default ports are dropped from the URL
    query = f"?{request.query}" if request.query else ""
    if redirect.uri is None:
        path = request.path
    else:
        # Envoy's path_redirect: a query in it replaces the request's, a path without a
        # leading "/" gets one.
        path, mark, own_query = redirect.uri.partition("?")
        if mark:
            query = mark + own_query
        if not path.startswith("/"):
            path = "/" + path
    netloc = f"{host}:{port}" if port is not None else host
    return outcome.redirect(f"{scheme}://{netloc}{path}{query}", redirect.redirect_code or 301)


_DEFAULT_PORTS = (("http", 80), ("https", 443))


def _host_only(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
