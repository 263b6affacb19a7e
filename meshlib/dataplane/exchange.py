"""One outbound request's journey through its attempts, without I/O.

An adapter asks `start_attempt()` where to send the next try (or gets a local answer),
sends it, and reports back with `finish_attempt()`. `should_retry()` is tenacity's retry
predicate; it counts attempts, watches the deadline and the retry budget, and records the
response flags that telemetry and access logs report.

    exchange = Exchange(plan, cluster, rng, replayable=True)
    for attempt in tenacity.Retrying(**retrying_kwargs(exchange, close_previous)):
        ...   # start_attempt -> send -> finish_attempt
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshlib.dataplane import outcome
from meshlib.dataplane.cluster import ClusterState
from meshlib.dataplane.deadline import LEAST_WAIT, Deadline
from meshlib.dataplane.limits import Ticket
from meshlib.dataplane.outcome import Flag, LocalReply, ordered
from meshlib.dataplane.retry import (
    CONNECT_FAILURE,
    PER_TRY_TIMEOUT,
    REFUSED_STREAM,
    STREAM_RESET,
    AttemptResult,
    is_retriable,
)
from meshlib.dataplane.routing import RoutePlan
from meshlib.policy.routes import RetryPolicy
from meshlib.policy.snapshot import Endpoint

DEFAULT_CONNECT_TIMEOUT = 10.0  # Istio's MeshConfig connectTimeout
CALLERS_TIMEOUT = "callers-timeout"  # a connect timeout of the caller's own (see Attempt)


@dataclass(slots=True)
class Attempt:
    """Where and how to send one try."""

    number: int  # 1 for the first try
    endpoint: Endpoint
    timeout: float | None  # seconds for this try (per-try timeout clamped by the deadline)
    per_try_limited: bool  # True when the per-try timeout, not the deadline, set `timeout`
    retry_slot: bool  # holds a retry-budget slot until it finishes
    ticket: Ticket  # its hold on a connection; not yet granted = waiting (maxConnections)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # DestinationRule tcp.connectTimeout
    close_connection: bool = False  # http.maxRequestsPerConnection reached: `Connection: close`
    deadline: float | None = None  # the route deadline (absolute time.monotonic()), if any

    def route_left(self) -> float | None:
        """Seconds left of the route deadline (None without one)."""
        at = self.deadline
        return None if at is None else max(0.0, at - time.monotonic())

    def timeouts(
        self, caller_connect: float | None, caller_read: float | None
    ) -> tuple[float | None, float | None, bool]:
        """(connect, read) timeouts with the caller's own, and whether the mesh's read timeout
        is the binding one (then expiry is the mesh's answer, 504; else the caller's
        exception). Connecting is not part of the try's time: Envoy starts the per-try timer
        once the connection is made (onPoolReady), so connecting gets the connect timeout, or
        less when what is left of the route deadline or the caller's connect timeout is
        shorter."""
        mesh = self.timeout
        read = (
            mesh
            if caller_read is None
            else (caller_read if mesh is None else min(mesh, caller_read))
        )
        connect = self.connect_timeout
        for bound in (self.route_left(), caller_connect):
            if bound is not None and bound < connect:
                connect = bound
        # The route deadline may pass between the try's start and here (the try's time is
        # then 0): a timeout of 0 is refused (urllib3) or not waited on at all (a non-blocking
        # socket fails at once: a UF or UC against a sound endpoint), so each gets the least
        # wait, and its expiry reads as the deadline's, 504 UT.
        connect = max(connect, LEAST_WAIT)
        if read is not None and read < LEAST_WAIT:
            read = LEAST_WAIT
        mesh_owned = mesh is not None and (caller_read is None or mesh <= caller_read)
        return connect, read, mesh_owned

    def connect_timed_out(self, caller_connect: float | None) -> str:
        """What a connect timeout means, by which bound on connecting was the smallest:
        `CALLERS_TIMEOUT` (the caller's own connect timeout: its exception, not retried),
        `PER_TRY_TIMEOUT` (the route deadline passed: Envoy's 504 UT, not retried) or
        `CONNECT_FAILURE` (the DestinationRule's connect timeout: UF)."""
        at = self.deadline
        if at is not None and time.monotonic() >= at - 0.002:
            return PER_TRY_TIMEOUT  # the route deadline bounded connecting, and it has passed
        if caller_connect is not None and caller_connect < self.connect_timeout:
            return CALLERS_TIMEOUT
        return CONNECT_FAILURE


def _timeout_error(message: str, request: object = None) -> BaseException:
    return TimeoutError(message)


class Exchange:
    """The state of one request across its attempts."""

    def __init__(
        self,
        plan: RoutePlan,
        cluster: ClusterState,
        rng: random.Random,
        *,
        replayable: bool,
        deadline: Deadline | None = None,
    ) -> None:
        self.plan = plan
        self.cluster = cluster
        self.rng = rng
        self.replayable = replayable
        self.retries: RetryPolicy | None = plan.retries
        self.deadline = deadline if deadline is not None else Deadline.after(plan.timeout)
        self.flags: list[str] = []
        self.tried: list[str] = []
        self.attempts = 0
        self.retried = False  # a retry was decided (Envoy's is_retry_): reset bodies say so
        self._retry_slot = False
        self.upstream_host: str | None = None
        self.hash_key: str | None = None  # consistent-hash key, set by the adapter
        self.set_cookie: str | None = None  # a generated hash cookie for the response
        # The caller's own bound on waiting for a connection (httpx's pool timeout), and the
        # error its client raises when that runs out, made as `error(message, request=...)`
        # with the caller's request; set by the adapter.
        self.pool_timeout: float | None = None
        self.pool_timeout_error: Callable[..., BaseException] = _timeout_error
        self.caller_request: object = None
        self.pool_timeout_name = "pool timeout"  # what the caller calls that bound
        # Sends the route's mirrored copies; the adapter sets it, the first try that gets an
        # endpoint and a request slot calls it once (see `retry._attempt`).
        self.shadow: Callable[[], None] | None = None
        # When Envoy's router would have had the whole request (time.perf_counter()), set by
        # the Mesh only when the access log will want `upstream_service_time`: the adapter
        # then stamps each try's response with the time its headers came (`answered`).
        self.began: float | None = None

    # -- one attempt -------------------------------------------------------------------

    def start_attempt(self) -> Attempt | LocalReply:
        """Choose the endpoint and timeout for the next try, or answer locally."""
        if self.deadline.expired:
            return self._timed_out()
        cluster = self.cluster
        endpoint = self._choose(self._avoid())
        if endpoint is None and self.tried:
            endpoint = self._choose(set())  # only tried hosts are left: Envoy takes one again
        if endpoint is None:
            self._release_retry_slot()
            return outcome.no_healthy_upstream()
        ticket = cluster.limits.try_acquire_request()
        if ticket is None:
            self._release_retry_slot()
            if cluster.on_overflow is not None:
                cluster.on_overflow()
            return outcome.overflow()
        key = endpoint.key
        cluster.in_flight.start(key)
        self.attempts += 1
        self.tried.append(key)
        self.upstream_host = key
        per_try = self.retries.per_try_timeout if self.retries is not None else None
        timeout = self.deadline.clamp(per_try)
        slot, self._retry_slot = self._retry_slot, False
        tcp = cluster.policy.connection_pool.tcp if cluster.policy.connection_pool else None
        connect = tcp.connect_timeout.seconds if tcp and tcp.connect_timeout else None
        per_connection = cluster.limits.max_requests_per_connection
        return Attempt(
            self.attempts,
            endpoint,
            timeout,
            per_try is not None and timeout == per_try,
            slot,
            ticket,
            connect or DEFAULT_CONNECT_TIMEOUT,
            per_connection is not None and cluster.count_sent(key) % per_connection == 0,
            self.deadline.at,
        )

    # -- waiting for a connection (maxConnections in use) --------------------------------

    def wait_bound(self) -> float | None:
        """How long a waiting attempt may wait: what is left of the route deadline, or the
        caller's pool timeout if shorter (None: as long as it takes, as Envoy does)."""
        left = self.deadline.remaining()
        caller = self.pool_timeout
        return caller if left is None else (left if caller is None else min(left, caller))

    def connected(self, attempt: Attempt) -> bool:
        """A waiting attempt got its connection: its try's time starts now (Envoy starts the
        per-try timer when the connection pool hands the request a connection). False if the
        route deadline passed meanwhile (the connection came too late)."""
        if self.deadline.expired:
            return False
        per_try = self.retries.per_try_timeout if self.retries is not None else None
        attempt.timeout = self.deadline.clamp(per_try)
        attempt.per_try_limited = per_try is not None and attempt.timeout == per_try
        return True

    def waited_too_long(self, attempt: Attempt) -> AttemptResult:
        """A waiting attempt ran out of time before it got a connection: nothing was sent.
        The route deadline's expiry is Envoy's 504 UT; the caller's pool timeout is the
        caller's own error, as from its client's pool. Never retried."""
        self.abandon_attempt(attempt)
        self.tried.pop()
        self.upstream_host = self.tried[-1] if self.tried else None
        caller = self.pool_timeout
        left = self.deadline.remaining()
        if caller is None or (left is not None and left <= 0.0):
            return AttemptResult(reply=self._timed_out())
        maximum = self.cluster.limits.thresholds.max_connections
        host = self.plan.cluster[0] if self.plan.cluster else self.plan.authority
        error = self.pool_timeout_error(
            f"no connection to {host} within the {self.pool_timeout_name} ({caller:g} s): its "
            f"DestinationRule allows {maximum} connections (connectionPool.tcp.maxConnections),"
            " all in use; raise maxConnections, or wait longer",
            request=self.caller_request,
        )
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=error, client_timeout=True)

    def _choose(self, avoid: set[str]) -> Endpoint | None:
        """A usable endpoint not in `avoid`: not ejected, or any in panic."""
        cluster = self.cluster
        endpoints = cluster.endpoints
        total = len(endpoints)
        outlier = cluster.outlier

        def usable(e: Endpoint) -> bool:
            key = e.key
            return key not in avoid and outlier.available(key, total)

        chosen = cluster.balancer.pick(endpoints, usable, self.hash_key)
        outlier.deliver()  # what the filter's sweeps changed, now the balancer's lock is free
        return chosen

    def _avoid(self) -> set[str]:
        """Endpoints a retry should not pick again (retryIgnorePreviousHosts, the default).

        Istio leaves this out under consistent hashing, where the hash decides the host, but
        only for a route with a single destination and no explicit retryIgnorePreviousHosts.
        """
        retries = self.retries
        if not self.tried or (retries is not None and not retries.retry_ignore_previous_hosts):
            return set()
        if retries is None or not retries.ignore_previous_hosts_when_hashing:
            balancer = self.cluster.policy.load_balancer
            if balancer is not None and balancer.consistent_hash is not None:
                return set()
        return set(self.tried)

    def finish_attempt(self, attempt: Attempt, result: AttemptResult) -> AttemptResult:
        """Record how a try ended (outlier detection, counters) and turn failures into answers."""
        key = self._release(attempt)
        result.endpoint = key
        if result.client_timeout:
            return result  # the caller gave up: nothing said of the endpoint
        outlier = self.cluster.outlier
        total = len(self.cluster.endpoints)
        if result.failure is not None:
            outlier.record(
                key,
                status=None,
                local_origin_failure=True,
                connected=result.failure != CONNECT_FAILURE,
                total_endpoints=total,
            )
            if result.failure == PER_TRY_TIMEOUT and (
                not attempt.per_try_limited or self.deadline.expired
            ):  # the route deadline passed (connecting is bounded by it, not by perTryTimeout)
                return AttemptResult(reply=self._timed_out(), endpoint=key, error=result.error)
        elif result.status is not None:
            outlier.record(key, status=result.status, total_endpoints=total)
        return result

    def abandon_attempt(self, attempt: Attempt) -> None:
        """A try that will never report: its sender raised (a cancellation, Ctrl-C, a bug
        in an inner transport). What it held is given back — its request and retry slots, its
        in-flight count — and outlier detection hears nothing of it."""
        self._release(attempt)

    def _release(self, attempt: Attempt) -> str:
        """Give back the slots and in-flight count a finished try held; its endpoint key."""
        cluster = self.cluster
        key = attempt.endpoint.key
        cluster.in_flight.finish(key)
        cluster.limits.release_request(attempt.ticket)
        if attempt.retry_slot:
            cluster.limits.release_retry()
        return key

    def abandon(self) -> None:
        """The request ends between tries (cancelled during the back-off): the retry slot
        taken for the next try is given back."""
        self._release_retry_slot()

    # -- the retry decision (tenacity's predicate) ------------------------------------

    def would_retry(self, result: AttemptResult) -> bool:
        """Whether `result` will be retried, as `should_retry` would decide it after
        `finish_attempt` (this is asked before, while the try holds its slot), without
        deciding (no slot taken, no flag): Envoy judges a response by its headers, so the body
        of one about to be retried is left unread, and a final one is read within its try. (A
        retry slot another request takes meanwhile makes it final after all: then it is read
        after the try, as a streamed one.)"""
        policy = self._covering(result)
        if policy is None or self.attempts > policy.attempts or self.deadline.expired:
            return False
        # Asked within the try, whose request slot is still held: what `should_retry` will
        # count once `finish_attempt` gave it back is one less.
        return self.cluster.limits.retry_available(self._still_active(result) - 1)

    def _covering(self, result: AttemptResult) -> RetryPolicy | None:
        """The retry policy if it covers `result` and the request can be sent again."""
        policy = self.retries
        if policy is None or not is_retriable(policy, result):
            return None
        if not self.replayable and result.failure != CONNECT_FAILURE:
            return None  # the body cannot be sent again (a failed connect sent nothing)
        return policy

    def should_retry(self, result: AttemptResult) -> bool:
        policy = self._covering(result)
        if policy is None:
            return False
        if self.attempts > policy.attempts:
            self.flags.append(Flag.RETRY_LIMIT_EXCEEDED)
            return False
        if self.deadline.expired:
            return False
        allowed, _reason = self.cluster.limits.try_acquire_retry(self._still_active(result))
        if not allowed:
            self.flags.append(Flag.RETRY_LIMIT_EXCEEDED)  # budget or maxRetries spent
            if self.cluster.on_retry_overflow is not None:
                self.cluster.on_retry_overflow()
            return False
        self._retry_slot = True
        self.retried = True
        return True

    def _still_active(self, result: AttemptResult) -> int:
        """1 when the failed try answered with a body still to come: its stream is still open
        in Envoy when the retry is decided, so the retry budget counts it as active."""
        if result.status is None or self.cluster.limits.thresholds.budget_percent is None:
            return 0
        return 1 if body_follows(self.plan.method, result.status, result.headers) else 0

    def clamp_wait(self, seconds: float) -> float:
        left = self.deadline.remaining()
        return seconds if left is None else min(seconds, left)

    def _release_retry_slot(self) -> None:
        if self._retry_slot:
            self.cluster.limits.release_retry()
            self._retry_slot = False

    def _timed_out(self) -> LocalReply:
        self._release_retry_slot()
        return outcome.timeout()

    # -- the final answer ---------------------------------------------------------------

    def final_reply(self, result: AttemptResult) -> LocalReply | None:
        """`local_answer` for the request's last try, worded as Envoy words it after a retry."""
        reply = local_answer(result)
        if reply is not None and self.retried:
            return outcome.after_retry(reply)
        return reply

    def service_time(self, result: AttemptResult) -> float | None:
        """Envoy's `x-envoy-upstream-service-time` for the request, in milliseconds: from the
        router having the request to the response headers of its final try, `result` (tries
        and back-offs before it included, as Envoy's router measures from the request's end
        once, not per try). None without an upstream response — a local answer (UO, UH, UF,
        UT, ...) has none — or when not measured (`began` unset)."""
        began, answered = self.began, result.answered
        if began is None or answered is None:
            return None
        return (answered - began) * 1000.0

    def response_flags(self, result: AttemptResult) -> list[str]:
        flags = list(self.flags)
        reply = local_answer(result)
        if reply is not None and reply.flag is not None:
            flags.append(reply.flag)
        return ordered(flags)


def local_answer(result: AttemptResult) -> LocalReply | None:
    """What Envoy answers for an attempt that got no response (503 UF, 504 UT, 503 UC, 503
    UR), or meshlib's own answer; None for an upstream response."""
    failure = result.failure
    if result.reply is not None:
        return result.reply
    if failure is None:
        return None
    if failure == CONNECT_FAILURE:
        return outcome.connect_failure(connect_failure_reason(result.error))
    if failure == PER_TRY_TIMEOUT:
        return outcome.timeout()
    if failure == STREAM_RESET:
        return outcome.upstream_reset()
    if failure == REFUSED_STREAM:
        return outcome.upstream_reset("remote refused stream reset")
    # An HTTP/1 connection closed (FIN or RST) before the response headers: Envoy's codec
    # client resets the stream with "connection termination", the well-known 503 UC.
    return outcome.connection_termination()


_REMOTE_FAILURE = "remote connection failure"


def connect_failure_reason(error: BaseException | None) -> str:
    """Envoy's reset reason for a failed connect, with its transport failure reason when the
    error says what the socket reported: "connection timeout" for a connect timeout; "remote
    connection failure, transport failure reason: delayed connect error: Connection refused"
    for a socket error (the errno's text, as Envoy's); else "remote connection failure" (TLS
    and name resolution failures: Envoy's own wording for those cannot be known here)."""
    seen = 0
    while error is not None and seen < 8:  # the cause chain: client error, library, socket
        if isinstance(error, TimeoutError) or "Timeout" in type(error).__name__:
            return "connection timeout"
        if isinstance(error, (ssl.SSLError, ssl.CertificateError, socket.gaierror)):
            break
        if isinstance(error, OSError) and error.errno is not None and error.errno > 0:
            details = os.strerror(error.errno)
            return f"{_REMOTE_FAILURE}, transport failure reason: delayed connect error: {details}"
        error = error.__cause__ or error.__context__
        seen += 1
    return _REMOTE_FAILURE


def body_follows(method: str, status: int, headers: Mapping[str, str] | None) -> bool:
    """Whether a response with this status and these headers (None: not known) has a body
    after its headers (RFC 9112 §6.3): not for HEAD, 1xx, 204, 304 or `Content-Length: 0`."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return False
    if headers is None:
        return True
    length = headers.get("content-length")
    return length is None or "transfer-encoding" in headers or length.strip() != "0"
