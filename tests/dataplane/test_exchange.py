"""One try's timeouts, as the adapters hand them to their transports."""

from __future__ import annotations

import time

import pytest

from meshlib.dataplane.exchange import Attempt, body_follows
from meshlib.dataplane.limits import Ticket
from meshlib.dataplane.retry import PER_TRY_TIMEOUT
from meshlib.policy.snapshot import Endpoint


def attempt(deadline: float | None, timeout: float | None = 0.5) -> Attempt:
    endpoint, ticket = Endpoint("127.0.0.1", 9080), Ticket(None, granted=True)
    return Attempt(1, endpoint, timeout, False, False, ticket, deadline=deadline)


def test_a_deadline_passed_before_connecting_is_no_zero_timeout() -> None:
    """The route deadline can pass between a try's start and its send: connecting still
    gets a timeout above 0 (urllib3 refuses 0, and a non-blocking connect does not wait:
    a 503 UF against a sound endpoint), and its expiry reads as the deadline's, 504 UT."""
    try_ = attempt(deadline=time.monotonic() - 0.01)
    connect, read, mesh_owned = try_.timeouts(None, None)
    assert connect is not None and connect > 0
    assert (read, mesh_owned) == (0.5, True)
    assert try_.connect_timed_out(None) == PER_TRY_TIMEOUT
    # The try's time, clamped by a deadline that ran out as it started, is 0: no read
    # timeout of 0 either, and it is still the mesh's (504 UT when it expires).
    connect, read, mesh_owned = attempt(deadline=time.monotonic(), timeout=0.0).timeouts(None, 5)
    assert read is not None and read > 0 and mesh_owned


def test_connecting_is_bounded_by_what_is_left_of_the_deadline() -> None:
    """Connecting gets the connect timeout, or what is left of the route deadline, or the
    caller's connect timeout, whichever is least; the try's own time starts after it."""
    now = time.monotonic()
    assert attempt(deadline=None, timeout=0.2).timeouts(None, None)[0] == 10.0
    connect = attempt(deadline=now + 0.3, timeout=0.2).timeouts(None, None)[0]
    assert connect is not None and 0.25 < connect <= 0.3
    assert attempt(deadline=now + 5, timeout=0.2).timeouts(0.1, None)[0] == 0.1


@pytest.mark.parametrize(
    ("method", "status", "headers", "follows"),
    [
        ("GET", 503, {"content-length": "11"}, True),
        ("GET", 503, {"content-length": "0"}, False),
        ("GET", 503, {"content-length": " 0 "}, False),
        ("GET", 503, {"transfer-encoding": "chunked"}, True),
        ("GET", 503, {}, True),  # read until the connection closes
        ("GET", 503, None, True),
        ("HEAD", 503, {"content-length": "11"}, False),
        ("GET", 204, {}, False),
        ("GET", 304, {"content-length": "11"}, False),
    ],
)
def test_body_follows_the_headers(
    method: str, status: int, headers: dict[str, str] | None, follows: bool
) -> None:
    assert body_follows(method, status, headers) is follows


BUDGET_POLICY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api.internal
  trafficPolicy:
    retryBudget: {percent: {value: 50}, minRetryConcurrency: 1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.internal]
  http:
  - route: [{destination: {host: api.internal}}]
    retries: {attempts: 2, retryOn: 5xx}
"""


@pytest.mark.parametrize(
    ("content_length", "others"), [("11", 2), ("0", 3)], ids=["body-to-come", "ended"]
)
def test_would_retry_foretells_should_retry(content_length: str, others: int) -> None:
    """`would_retry`, asked within the try (its request slot still held), says what
    `should_retry` decides after `finish_attempt` gave the slot back. Budget 50%, minimum 1,
    one retry in progress: with a body to come the try counts once (2 others + it: 1 retry
    allowed, spent), not twice; ended by its headers it does not count (3 others: 1)."""
    from meshlib.config import MeshConfig
    from meshlib.dataplane.retry import AttemptResult
    from meshlib.policy.matching import RequestAttributes
    from tests.upstream import mesh_for

    mesh = mesh_for(MeshConfig(), BUDGET_POLICY)
    try:
        plan = mesh.plan(RequestAttributes("GET", "api.internal"))
        exchange = mesh.exchange(plan, replayable=True)
        limits = exchange.cluster.limits
        held = [limits.try_acquire_request() for _ in range(others)]
        assert all(held) and limits.try_acquire_retry() == (True, None)
        attempt = exchange.start_attempt()
        assert isinstance(attempt, Attempt)
        result = AttemptResult(status=503, headers={"content-length": content_length})
        foretold = exchange.would_retry(result)
        decided = exchange.should_retry(exchange.finish_attempt(attempt, result))
        assert foretold is decided is False
    finally:
        mesh.close()


ACCESS_LOG = """
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}], match: {mode: CLIENT}}]
"""


@pytest.mark.parametrize("logged", [True, False], ids=["access-log-on", "off"])
def test_service_time_runs_from_the_exchange_to_the_final_headers(logged: bool) -> None:
    """`service_time` is Envoy's x-envoy-upstream-service-time: from the Exchange (where the
    router has the request) to the headers of the try given, earlier tries included; None for
    a try without a response (a local answer), and never measured (no clock read) unless
    the access log logs outbound calls."""
    from meshlib.config import MeshConfig
    from meshlib.dataplane import outcome
    from meshlib.dataplane.retry import AttemptResult
    from meshlib.policy.matching import RequestAttributes
    from tests.upstream import mesh_for

    mesh = mesh_for(MeshConfig(), BUDGET_POLICY + (ACCESS_LOG if logged else ""))
    try:
        before = time.perf_counter()
        exchange = mesh.exchange(
            mesh.plan(RequestAttributes("GET", "api.internal")), replayable=True
        )
        if not logged:
            assert exchange.began is None
            assert exchange.service_time(AttemptResult(status=200, answered=before)) is None
            return
        assert exchange.began is not None and before <= exchange.began <= time.perf_counter()
        answered = exchange.began + 0.25
        assert exchange.service_time(AttemptResult(status=503, answered=answered)) == pytest.approx(
            250
        )
        assert exchange.service_time(AttemptResult(reply=outcome.overflow())) is None
        assert exchange.service_time(AttemptResult(failure=PER_TRY_TIMEOUT)) is None
    finally:
        mesh.close()


OUTLIER_POLICY = BUDGET_POLICY.replace(
    "retryBudget: {percent: {value: 50}, minRetryConcurrency: 1}",
    "outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 10s,"
    " maxEjectionPercent: 100}",
).replace("retries: {attempts: 2, retryOn: 5xx}", "retries: {attempts: 0}")


def test_an_endpoint_back_from_ejection_takes_every_try() -> None:
    """Once the interval sweep returns an ejected endpoint, every new try may choose it at
    once, several in flight together (Envoy gives no single trial request); before that,
    with it the only endpoint, a try gets 503 UH."""
    from meshlib.config import MeshConfig
    from meshlib.dataplane.outcome import LocalReply
    from meshlib.dataplane.outlier import OutlierDetector
    from meshlib.dataplane.retry import AttemptResult
    from meshlib.policy.matching import RequestAttributes
    from tests.upstream import mesh_for

    now = [1000.0]
    mesh = mesh_for(MeshConfig(), OUTLIER_POLICY)
    try:
        plan = mesh.plan(RequestAttributes("GET", "api.internal"))
        cluster = mesh.exchange(plan, replayable=True).cluster
        cluster.outlier = OutlierDetector(cluster.policy.outlier_detection, clock=lambda: now[0])
        exchange = mesh.exchange(plan, replayable=True)
        attempt = exchange.start_attempt()
        assert isinstance(attempt, Attempt)
        exchange.finish_attempt(attempt, AttemptResult(status=503))  # ejected for 10 s
        now[0] += 9.5
        refused = mesh.exchange(plan, replayable=True).start_attempt()
        assert isinstance(refused, LocalReply) and refused.flag == "UH"
        now[0] += 0.5  # the sweep at 1010 returns it
        tries = [mesh.exchange(plan, replayable=True) for _ in range(3)]
        started = [(e, e.start_attempt()) for e in tries]
        assert all(isinstance(a, Attempt) for _, a in started)
        assert {a.endpoint.key for _, a in started if isinstance(a, Attempt)} == {"10.0.0.1:80"}
        for e, a in started:
            assert isinstance(a, Attempt)
            e.finish_attempt(a, AttemptResult(status=200))
        assert cluster.outlier.ejected() == frozenset()
    finally:
        mesh.close()


SWAP_POLICY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}, {address: 10.0.0.2}, {address: 10.0.0.3}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api.internal
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 34}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.internal]
  http: [{route: [{destination: {host: api.internal}}], retries: {attempts: 0}}]
"""


def test_a_try_to_an_endpoint_a_reload_removed_ejects_nobody() -> None:
    """A try in flight to an endpoint that a reload then removes fails afterwards: Envoy
    ignores results for a host no longer in the cluster, so the departed endpoint is not
    ejected and uses up none of maxEjectionPercent; a live endpoint that fails still goes."""
    from meshlib.config import MeshConfig
    from meshlib.dataplane.retry import AttemptResult
    from meshlib.policy.loader import load_text
    from meshlib.policy.matching import RequestAttributes
    from meshlib.policy.snapshot import Snapshot
    from tests.upstream import mesh_for

    config = MeshConfig()
    mesh = mesh_for(config, SWAP_POLICY)
    try:
        request = RequestAttributes("GET", "api.internal")
        started = []
        for _ in range(50):
            exchange = mesh.exchange(mesh.plan(request), replayable=True)
            attempt = exchange.start_attempt()
            assert isinstance(attempt, Attempt)
            started.append((exchange, attempt))
            if attempt.endpoint.key == "10.0.0.1:80":
                break
        departing, in_flight = started.pop()
        assert in_flight.endpoint.key == "10.0.0.1:80"
        for exchange, attempt in started:
            exchange.finish_attempt(attempt, AttemptResult(status=200))
        swapped = load_text(SWAP_POLICY.replace("10.0.0.1", "10.0.0.4"))
        swapped.raise_for_errors()
        mesh.source.publish(Snapshot.build(swapped.resources, config))
        cluster = mesh.exchange(mesh.plan(request), replayable=True).cluster  # takes the swap
        assert [e.key for e in cluster.endpoints] == ["10.0.0.4:80", "10.0.0.2:80", "10.0.0.3:80"]
        departing.finish_attempt(in_flight, AttemptResult(status=503))
        assert cluster.outlier.ejected() == frozenset()
        cluster.outlier.record("10.0.0.2:80", status=503, total_endpoints=3)
        assert cluster.outlier.ejected() == {"10.0.0.2:80"}
    finally:
        mesh.close()
