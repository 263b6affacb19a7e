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
from meshlib.policy.regex import compile_re2
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
    """Header changes to apply, in order: set (replace), add (append), remove."""

    set: dict[str, str] = field(default_factory=dict)
    add: list[tuple[str, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    def extend(self, ops: HeaderOperations | None) -> None:
        if ops is None:
            return
        for name, value in ops.set.items():
            if name.lower() not in _AUTHORITY_KEYS:
                self.set[name.lower()] = value
        for name, value in ops.add.items():
            if name.lower() not in _AUTHORITY_KEYS:
                self.add.append((name.lower(), value))
        self.remove.extend(name.lower() for name in ops.remove)

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
    service = snapshot.service(destination.host)
    if service is None or (
        destination.subset is not None
        and not snapshot.has_subset(destination.host, destination.subset)
    ):
        plan.reply = outcome.no_cluster()  # Envoy has no cluster for it: 503 NC
        return plan
    service_port = service.port(port)
    if (
        service_port is None
        and port is not None
        and len(service.ports) == 1
        and destination.port is None
    ):
        service_port = service.ports[
            0
        ]  # a one-port service answers on its port whatever the client used
    if service_port is None:
        plan.reply = outcome.no_cluster()
        return plan
    plan.destination = destination
    plan.cluster = (destination.host, destination.subset, service_port.number)
    plan.retries = route.retries
    plan.timeout = route.timeout.seconds if route.timeout is not None else None
    _rewrite(plan, route, decision.matched, request)
    _request_headers(plan, route.headers, destination.headers)
    _response_headers(plan, route.headers, destination.headers)
    _decide_faults(plan, route, rng)
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
) -> None:
    rewrite = route.rewrite
    authority = _header_authority(route.headers)
    if rewrite is not None and rewrite.authority:
        authority = rewrite.authority
    if authority is None and plan.destination is not None:
        authority = _header_authority(plan.destination.headers)
    if authority is not None:
        plan.authority = authority
    if rewrite is None:
        return
    path = request.path
    if rewrite.uri is not None:
        uri = matched.uri if matched is not None else None
        if uri is not None and uri.prefix is not None and path.startswith(uri.prefix):
            path = rewrite.uri + path[len(uri.prefix) :]
        elif uri is not None and (uri.exact is not None or uri.regex is not None):
            path = rewrite.uri
        else:  # no uri match: Envoy rewrites the "/" prefix
            path = rewrite.uri + path[1:] if path.startswith("/") else rewrite.uri + path
    elif rewrite.uri_regex_rewrite is not None:
        pattern = compile_re2(rewrite.uri_regex_rewrite.match)
        path = pattern.sub(rewrite.uri_regex_rewrite.rewrite, path)
    if path != request.path:
        plan.original_path = request.path
        plan.path = path


def _header_authority(headers: Headers | None) -> str | None:
    """An authority set through `headers.request.set|add` (set wins over add)."""
    if headers is None or headers.request is None:
        return None
    for ops in (headers.request.set, headers.request.add):
        for name, value in ops.items():
            if name.lower() in _AUTHORITY_KEYS:
                return value
    return None


def _request_headers(plan: RoutePlan, route: Headers | None, dest: Headers | None) -> None:
    route_ops = route.request if route is not None else None
    dest_ops = dest.request if dest is not None else None
    if route_ops is None and dest_ops is None and plan.original_path is None:
        return  # the plan keeps the shared NO_EDITS
    edits = plan.request_headers = HeaderEdits()
    edits.extend(route_ops)  # route ops first, destination ops second (ISTIO.md)
    edits.extend(dest_ops)
    if plan.original_path is not None:
        edits.set["x-envoy-original-path"] = plan.original_path


def _response_headers(plan: RoutePlan, route: Headers | None, dest: Headers | None) -> None:
    route_ops = route.response if route is not None else None
    dest_ops = dest.response if dest is not None else None
    if route_ops is None and dest_ops is None:
        return
    edits = plan.response_headers = HeaderEdits()
    edits.extend(route_ops)
    edits.extend(dest_ops)


def _decide_faults(plan: RoutePlan, route: CompiledRoute, rng: random.Random) -> None:
    fault = route.fault
    if fault is None:
        return
    delay = fault.delay
    if delay is not None and delay.fixed_delay is not None and _chance(delay.fraction, rng):
        plan.fault_delay = delay.fixed_delay.seconds
    if fault.abort is not None and _chance(fault.abort.fraction, rng):
        status = fault.abort.http_status
        if status is None:  # a gRPC abort: HTTP 200 with grpc-status, as Envoy sends it
            code = str(_GRPC_CODES.get(fault.abort.grpc_status or "", 2))
            plan.fault_abort = LocalReply(
                200,
                b"",
                outcome.Flag.FAULT_INJECTED,
                {"grpc-status": code, "grpc-message": "fault filter abort"},
            )
        else:
            plan.fault_abort = outcome.fault_abort(status)


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
    elif port is None and redirect.derive_port is None and not redirect.authority:
        _, port = strip_port(request.authority)
    if port is not None and (scheme, port) in (("http", 80), ("https", 443)):
        port = None  # default ports are dropped from the URL
    path = redirect.uri if redirect.uri is not None else request.path
    query = f"?{request.query}" if request.query else ""
    netloc = f"{host}:{port}" if port is not None else host
    return outcome.redirect(f"{scheme}://{netloc}{path}{query}", redirect.redirect_code or 301)


def _host_only(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
