"""What the httpx and requests adapters share: turning plans and answers into HTTP terms."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from meshlib._text import ascii_int
from meshlib.dataplane import outcome
from meshlib.dataplane.balancer import cookie_to_set, hash_key
from meshlib.dataplane.cluster import ClusterState
from meshlib.dataplane.deadline import Deadline
from meshlib.dataplane.exchange import Attempt, Exchange, local_answer
from meshlib.dataplane.outcome import FLAGS_HEADER, LocalReply, join_flags
from meshlib.dataplane.retry import RESET, AttemptResult
from meshlib.dataplane.routing import HeaderEdits, RoutePlan
from meshlib.mesh import Mesh
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.routes import Mirror
from meshlib.policy.snapshot import Endpoint
from meshlib.telemetry import peer, propagation
from meshlib.telemetry.access_log import AccessLogEntry, protocol_of

RESPONSE_FLAGS = "response_flags"  # httpx: response.extensions key with Envoy's flags
UPSTREAM_HOST = "upstream_host"  # httpx: response.extensions key, "addr:port" that answered
REQUEST_ID = "request_id"  # httpx: response.extensions key, the call's x-request-id


# A retried response's body is read and dropped, so its connection can be kept, when it is
# this small and comes this fast; otherwise the connection is closed, as Envoy resets a
# retried upstream stream (a body that crawls or never ends never holds up the retry).
DRAIN_BYTES = 64 * 1024
DRAIN_SECONDS = 0.05


class BodyTooLate(Exception):
    """The route deadline passed while the body of a response read whole was coming in."""


def body_broke_off(error: BaseException, timed_out: bool, callers_timeout: bool) -> AttemptResult:
    """How a try ends when reading a whole response's body fails, after its headers came.

    Envoy never retries once a response has started (a POST is never sent twice because its
    answer was slow or broke off), so this is final: the route deadline passing is 504 UT
    (`BodyTooLate`, or a read timeout of the mesh's), the caller's own read timeout is its
    error, and a connection lost mid-body is the client's error, as an app behind a sidecar
    sees the response break off."""
    if isinstance(error, BodyTooLate) or (timed_out and not callers_timeout):
        return AttemptResult(reply=outcome.timeout())
    if timed_out:
        return AttemptResult(failure=RESET, error=error, client_timeout=True)
    return AttemptResult(failure=RESET, error=error, broke_off=True)


def forget_identity(headers: MutableMapping[str, Any], found: Mapping[str, Any]) -> None:
    """Remove from a response's `headers` the metadata-exchange headers `found` (read from
    them) holds: the app never sees them, as with Istio's sidecars."""
    for name in peer.EXCHANGE_HEADERS:
        if name in found:
            del headers[name]


def edited_headers(
    headers: Iterable[tuple[str, str]], edits: HeaderEdits, extra: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Request or response headers with a route's set/add/remove applied, in Envoy's order
    (`HeaderEdits` never removes a name it sets or adds, so removing first or last is the
    same; the last pass takes a removed name out of `extra` too)."""
    drop = set(edits.set) | set(edits.remove) | set(extra)
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend(edits.set.items())
    out.extend(edits.add)
    out.extend(extra.items())
    removed = set(edits.remove)
    return [(k, v) for k, v in out if k.lower() not in removed] if removed else out


def reply_headers(
    reply: LocalReply, flags: list[str], plan: RoutePlan | None
) -> list[tuple[str, str]]:
    headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body)))]
    headers.extend(reply.headers.items())
    headers.append((FLAGS_HEADER, join_flags(flags)))
    if plan is not None and plan.response_headers:
        headers = edited_headers(headers, plan.response_headers, {})
    return headers


# Mirrors are fire-and-forget: a few threads send them, off the request's path.
MIRROR_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="meshlib-mirror"
)
# Copies waiting or in flight at most, over every sync client: a mirror that answers slowly
# (or never) must not pile up copies in memory; past this, new copies are dropped, as
# Envoy's connection-pool limits drop shadow requests.
MAX_MIRRORS_PENDING = 256
MIRROR_TIMEOUT = 10.0  # seconds a copy may take when neither the route nor the caller says
_mirror_slots = threading.BoundedSemaphore(MAX_MIRRORS_PENDING)


class MirrorTracker:
    """A sync client's mirrored copies, sent from `MIRROR_POOL` (`MAX_MIRRORS_PENDING` at
    most waiting or in flight, over every sync client), and its count of closes, which a copy
    queued before one checks when it runs: sent then through a connection pool opened after
    the close, it must leave no connection open. Closing a client waits for no copy."""

    def __init__(self) -> None:
        self.closes = 0  # its client's closes: a copy queued before one checks it when it runs
        # The pool copies go through when the client keeps one of its own for them (an httpx
        # transport; copies are sent from a thread pool, hence the lock). One class for every
        # client: the compiled build does not let an interpreted module subclass it.
        self.lock = threading.Lock()
        self.pool: Any = None

    def submit(self, fn: Any, *args: Any) -> bool:
        """Send a copy from the pool; False (dropped) when `MAX_MIRRORS_PENDING` are pending,
        or when the pool takes no more work (the interpreter is exiting)."""
        if not _mirror_slots.acquire(blocking=False):
            return False
        try:
            future = MIRROR_POOL.submit(fn, *args)
        except RuntimeError:
            _mirror_slots.release()
            return False
        future.add_done_callback(_slot_freed)
        return True


def _slot_freed(_future: concurrent.futures.Future[Any]) -> None:
    _mirror_slots.release()


def choose_hash_key(exchange: Exchange, mesh: Mesh, attributes: RequestAttributes) -> None:
    """The exchange's consistent-hash key, and the cookie to set when the route's hash cookie
    is missing and must be generated (`consistentHash.httpCookie` with a `ttl`)."""
    settings = exchange.cluster.policy.load_balancer
    if settings is None or settings.consistent_hash is None:
        return  # no hash key: the common case, nothing to read
    exchange.hash_key = hash_key(settings, attributes, mesh.source_ip)
    if exchange.hash_key is None:
        generated = cookie_to_set(settings, attributes)
        if generated is not None:
            exchange.hash_key, exchange.set_cookie = generated


def mirror_cluster(mesh: Mesh, plan: RoutePlan, mirror: Mirror) -> ClusterState:
    """The cluster a mirrored copy goes to: Istio's `outbound|port|subset|host` of the mirror,
    with its own DestinationRule policy (balancer, outlier detection, pool limits).

    Without a port in the mirror, the request's port if the mirror's service has it, else
    the service's only port (as for a route destination)."""
    port = mirror.port
    if port is None:
        port = plan.cluster[2] if plan.cluster else None
        service = mesh.snapshot.service(mirror.host)
        served = service.serving_port(port) if service is not None else None
        if served is not None:
            port = served.number
    return mesh.cluster((mirror.host, mirror.subset, port))


class MirrorCopy:
    """One mirrored copy's try on its mirror cluster, as Envoy sends a shadow through that
    cluster's own router: an `Exchange` of its own with no retries, so the copy is balanced
    over the endpoints outlier detection has not ejected, takes a request slot of the
    cluster's connection-pool limits (an overflow drops it, counted as the cluster's
    overflow), counts as in flight for LEAST_REQUEST, has the route's timeout, and its
    outcome feeds the cluster's outlier detection. Made by `start_mirror`; the sender waits
    for a connection if the copy must (`wait_async`), sends it, and calls `end` in
    every case, exactly once (later calls do nothing)."""

    def __init__(self, exchange: Exchange, attempt: Attempt) -> None:
        self.exchange = exchange
        self.attempt = attempt
        self.ended = False

    @property
    def endpoint(self) -> Endpoint:
        return self.attempt.endpoint

    def timeouts(
        self, connect: float | None, read: float | None
    ) -> tuple[float | None, float | None, bool]:
        """(connect, read, mesh_owned) for sending the copy now, from the caller's connect and
        read timeouts (MIRROR_TIMEOUT for each it left unset: a copy never waits for good),
        bounded by the mirror cluster's connect timeout and what is left of the route's timeout
        (the copy's whole time: it has no per-try timeout)."""
        attempt = self.attempt
        attempt.timeout = attempt.route_left()
        return attempt.timeouts(
            MIRROR_TIMEOUT if connect is None else connect,
            MIRROR_TIMEOUT if read is None else read,
        )

    async def wait_async(self) -> bool:
        """Wait for a connection if maxConnections are in use (as long as `wait_bound`
        allows); False (the copy is dropped, and ended) if none came in time."""
        attempt = self.attempt
        if attempt.ticket.granted:
            return True
        exchange = self.exchange
        if await attempt.ticket.wait_async(exchange.wait_bound()) and exchange.connected(attempt):
            return True
        self.end(None)
        return False

    def given_up(self, _task: object = None) -> None:
        """`end(None)`: a done callback for the task that sends the copy, so that a task
        cancelled before it ever ran (its `finally` never runs) still gives back its slot."""
        self.end(None)

    def end(self, result: AttemptResult | None) -> None:
        """The copy is done: its outcome goes to the cluster's outlier detection and its slot
        and in-flight count are given back; None when it was never sent or never finished
        (dropped, cancelled): then nothing is said of the endpoint."""
        if self.ended:
            return
        self.ended = True
        if result is None:
            self.exchange.abandon_attempt(self.attempt)
        else:
            self.exchange.finish_attempt(self.attempt, result)


def start_mirror(
    mesh: Mesh, plan: RoutePlan, mirror: Mirror, wait: float | None
) -> MirrorCopy | None:
    """Start a mirrored copy of `plan`'s request on `mirror`'s cluster, or None when Envoy's
    shadow would end there with a local answer nobody sees: no endpoint outlier detection
    left in the pool (503 UH), or the cluster's pool limits full (503 UO, counted as its
    overflow). Copies are never retried.

    `wait` bounds waiting for a connection when `maxConnections` are in use (the caller's
    pool timeout, else MIRROR_TIMEOUT), as does the route's timeout; `wait=0` (the sync
    clients: their copies share a few threads, which one cluster's queue must not hold)
    drops such a copy at once, counted as the cluster's overflow."""
    cluster = mirror_cluster(mesh, plan, mirror)
    exchange = Exchange(
        plan, cluster, mesh.rng, replayable=False, deadline=Deadline.after(plan.timeout)
    )
    exchange.retries = None  # Envoy's shadow router has no retry policy
    exchange.pool_timeout = MIRROR_TIMEOUT if wait is None else wait
    attempt = exchange.start_attempt()
    if isinstance(attempt, LocalReply):
        return None
    if wait == 0 and not attempt.ticket.granted:
        exchange.abandon_attempt(attempt)  # out of the queue
        if cluster.on_overflow is not None:
            cluster.on_overflow()
        return None
    return MirrorCopy(exchange, attempt)


_NO_SPAN: AbstractContextManager[Any] = contextlib.nullcontext(None)


def cluster_name(plan: RoutePlan | None) -> str:
    """Envoy's cluster name: `outbound|9080|v1|reviews.default.svc.cluster.local`."""
    if plan is None or plan.cluster is None:
        return "PassthroughCluster"
    host, subset, port = plan.cluster
    return f"outbound|{port or ''}|{subset or ''}|{host}"


def client_span(
    mesh: Mesh,
    method: str,
    url: object,
    plan: RoutePlan | None,
    attempt: Attempt | None,
    headers: Mapping[str, str] | None = None,
) -> AbstractContextManager[Any]:
    """The CLIENT span of one attempt (current while it runs), or nothing if tracing is off.
    `headers` (the app's request headers, lowercase names) and the headers propagated for it
    feed the Telemetry's `header` custom tags, as a sidecar sees the request."""
    tracing = mesh.tracing
    if not tracing.enabled:
        return _NO_SPAN
    lookup = None
    if tracing.client_tags.headers:
        given = headers or {}

        def lookup(name: str) -> str | None:
            value = given.get(name)
            inbound = propagation.current.get() if value is None else None
            if inbound is not None:
                value = next((v for n, v in inbound.headers if n == name), None)
            return value

    return tracing.client_span(
        method,
        str(url),
        attempt=attempt.number if attempt is not None else 1,
        cluster=cluster_name(plan),
        subset=plan.cluster[1] if plan is not None and plan.cluster else None,
        upstream=attempt.endpoint.key if attempt is not None else None,
        headers=lookup,
    )


def end_client_span(mesh: Mesh, span: Any, result: AttemptResult) -> None:
    if span is not None:
        # An attempt with no response: Envoy's flag for it (UF, UT, UC); the caller's own
        # timeout is no flag of the mesh's.
        reply = result.reply if result.client_timeout else local_answer(result)
        flags = reply.flag if reply is not None else None
        mesh.tracing.finish_client(span, result.status, flags, upstream=result.endpoint)


def record_source(
    mesh: Mesh,
    plan: RoutePlan,
    status: int,
    response_headers: Mapping[str, str],
    started: float,
    request_headers: Mapping[str, str],
    flags: Sequence[str],
    upstream_host: str | None = None,
    http_version: object = None,
    service_time_ms: float | None = None,
) -> None:
    """Count a client call as Istio's client-side proxy does (reporter="source"); log it
    (`http_version`: the response's, as the client says it, and `service_time_ms`, Envoy's
    upstream service time as `Exchange.service_time` measures it, for the access log).

    The destination's identity comes from its metadata-exchange header when a meshlib
    workload answered; local answers (UO, NR, a fault's abort, ...) have an unknown peer, and
    so do hosts outside the mesh (passthrough), whatever they answer: a server meshlib did not
    send its identity to has no business naming itself in the mesh's metrics.
    """
    decision = plan.decision
    claimed = peer.claim(response_headers.get(peer.HEADER), response_headers.get(peer.ISTIO_HEADER))
    if plan.cluster is not None:
        host = plan.cluster[0]
        name, namespace = _service_name(mesh, host)
    elif decision.passthrough:
        host, name, namespace = decision.host, "PassthroughCluster", "unknown"
        claimed = None
    else:
        host = decision.host
        name, namespace = _service_name(mesh, host)
    duration_ms = (time.perf_counter() - started) * 1000.0
    # An answer to HEAD, a 204 or a 304 has no body on the wire, whatever its Content-Length
    # says (RFC 9110 §8.6): Envoy counts the bytes that came, as the middleware does.
    bodiless = status in (204, 304) or plan.method == "HEAD"
    response_bytes = 0 if bodiless else _length(response_headers)
    mesh.metrics.record(
        "source",
        peer.decode(claimed) if claimed else peer.UNKNOWN_PEER,
        destination_service=host,
        destination_service_name=name,
        destination_service_namespace=namespace,
        response_code=status,
        response_flags=join_flags(tuple(flags)),
        duration_ms=duration_ms,
        request_bytes=_length(request_headers),
        response_bytes=response_bytes,
    )
    log = mesh.access_log
    if log.enabled("outbound"):
        if decision.passthrough and status:
            # Envoy's router sends passthrough too: its service time is the call's, whose
            # duration ends here, as the response headers come (the body is the caller's).
            service_time_ms = duration_ms
        log.log(
            AccessLogEntry(
                start_time=time.time() - duration_ms / 1000.0,
                method=plan.method,
                path=_target(plan.original_path or plan.path, plan.query),
                protocol=_call_protocol(http_version),
                response_code=status,
                response_flags=join_flags(tuple(flags)),
                bytes_received=_length(request_headers),
                bytes_sent=response_bytes,
                duration_ms=duration_ms,
                upstream_service_time_ms=service_time_ms,
                x_forwarded_for=request_headers.get("x-forwarded-for"),
                user_agent=request_headers.get("user-agent"),
                request_id=request_headers.get("x-request-id"),
                authority=plan.authority or None,
                upstream_host=upstream_host,
                upstream_cluster=cluster_name(plan),
                route_name=(plan.route.name if plan.route is not None else None) or "default",
                downstream_remote_address=None,
                direction="outbound",
            )
        )


def record_exception(
    mesh: Mesh,
    plan: RoutePlan,
    started: float,
    request_headers: Mapping[str, str],
    flag: str,
    upstream_host: str | None = None,
    flags: Sequence[str] = (),
) -> None:
    """Count a call that ended in an exception, not a response, as Envoy logs a request it
    sent no response for: response code 0 and `flag` — DC when the caller gave up (its own
    timeout, a cancellation), UF / UC when the connection failed — besides the `flags` the
    mesh had already set (DI for a fault delay: `DI,DC` when the caller gave up during it)."""
    record_source(mesh, plan, 0, {}, started, request_headers, (*flags, flag), upstream_host)


def _call_protocol(http_version: object) -> str:
    """The HTTP version a call was made in, as Envoy's %PROTOCOL% names the app's to its
    sidecar: the response's, but HTTP/1.1 for an HTTP/1.0 answer (the clients send HTTP/1.1;
    an old server answering in 1.0 does not change what the app spoke)."""
    protocol = protocol_of(http_version)
    return "HTTP/1.1" if protocol == "HTTP/1.0" else protocol


def _target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def _length(headers: Mapping[str, str]) -> int:
    value = headers.get("content-length") or ""
    return ascii_int(value, 19) or 0  # at most 2^63


def _service_name(mesh: Mesh, host: str) -> tuple[str, str]:
    """(service name, namespace) of a destination host, as Istio labels them."""
    suffix = f".svc.{mesh.config.cluster_domain}"
    if host.endswith(suffix):
        name, _, namespace = host[: -len(suffix)].partition(".")
        return name, namespace or "unknown"
    service = mesh.snapshot.service(host)
    return host, service.namespace if service is not None else "unknown"


def request_id() -> str:
    """The x-request-id for an outbound call: the served request's, or a new one (first hop).

    Set once per call, before routing, so every attempt, the access log and the peer see
    the same id, as with Envoy.
    """
    inbound = propagation.current.get()
    return inbound.request_id if inbound is not None else propagation.new_request_id()
