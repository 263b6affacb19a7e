"""Mirrored copies follow the mirror cluster's own policy, as Envoy's shadows do: each goes
through the cluster `outbound|port|subset|host` of the mirror (its balancer skips endpoints
outlier detection ejected, its pool limits drop copies past them, its outlier detection
hears the copies' answers), and is never retried. Real uvicorn upstreams, all three clients.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib.clients.httpx as meshed_httpx
import meshlib.clients.requests as meshed_requests
from meshlib.mesh import Mesh
from tests.e2e.conftest import URL, Caller, MeshFactory, held_mirror, virtual_service
from tests.rawserver import wait_until_sync
from tests.upstream import Behaviour, Upstream, service_entry

SHADOW = "shadow.default.svc.cluster.local"


@pytest.fixture(scope="module")
def shadows() -> Iterator[dict[str, Upstream]]:
    """The mirror service's two endpoints, labelled version=bad and version=good."""
    servers = {v: Upstream(f"shadow-{v}").start() for v in ("bad", "good")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh_shadows(shadows: dict[str, Upstream]) -> None:
    for server in shadows.values():
        server.behaviour = Behaviour()


def mirrored(shadows: dict[str, Upstream], subset_policy: str, route: str = "") -> str:
    """The mirror service and a DestinationRule whose subsets carry `subset_policy` (the
    mirror's cluster is the subset's, so its policy is what copies follow), and a route to
    reviews v1 mirrored to subset `all` (both endpoints) or `good` (`route` may pick another
    mirror and add settings)."""
    policy = textwrap.indent(textwrap.dedent(subset_policy).strip("\n"), " " * 6)
    rule = f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shadow}}
spec:
  host: {SHADOW}
  subsets:
  - name: all
    labels: {{app: shadow}}
    trafficPolicy:
{policy}
  - name: good
    labels: {{version: good}}
    trafficPolicy:
{policy}
  - name: bad
    labels: {{version: bad}}
    trafficPolicy:
{policy}
"""
    route = route or "  mirror: {host: shadow, subset: all}\n"
    service = virtual_service("- route: [{destination: {host: reviews, subset: v1}}]\n" + route)
    return service_entry(SHADOW, 9080, shadows) + "---\n" + rule + "---\n" + service


def copies(shadows: dict[str, Upstream]) -> int:
    return sum(server.behaviour.received for server in shadows.values())


def operational(mesh: Mesh, name: str, subset: str) -> float:
    labels = {"cluster": f"outbound|9080|{subset}|{SHADOW}"}
    return mesh.registry.get_sample_value(name, labels) or 0.0


def copies_in_flight(mesh: Mesh, subset: str) -> int:
    return mesh.cluster((SHADOW, subset, 9080)).limits.active_requests


def source_requests(mesh: Mesh) -> dict[str, float]:
    """istio_requests_total (reporter=source) by destination service name."""
    counted: dict[str, float] = {}
    for metric in mesh.registry.collect():
        for sample in metric.samples:
            if sample.name == "istio_requests_total":
                name = sample.labels["destination_service_name"]
                counted[name] = counted.get(name, 0.0) + sample.value
    return counted


OUTLIER = """
loadBalancer: {simple: ROUND_ROBIN}
outlierDetection: {consecutive5xxErrors: 1, interval: 60s, baseEjectionTime: 60s, maxEjectionPercent: 100}
"""


def test_a_mirror_endpoint_ejected_by_outlier_detection_gets_no_more_copies(
    make_mesh: MeshFactory, shadows: dict[str, Upstream], client_kind: str
) -> None:
    """With consecutive5xxErrors 1 on the mirror's subset, the endpoint that answered a copy
    with 500 is ejected (the copies' answers feed the mirror cluster's outlier detection) and
    later copies all go to the healthy one; copies are in no reporter=source metric, as
    Envoy's shadows (sent by its async client, not through the stats filter) are not."""
    shadows["bad"].behaviour.status = 500
    mesh = make_mesh(mirrored(shadows, OUTLIER))
    caller = Caller(client_kind, mesh)
    for sent in range(1, 9):
        assert caller.one().upstream == "v1"

        def landed(sent: int = sent) -> bool:
            return copies(shadows) == sent

        wait_until_sync(landed, f"copy {sent}")
        if shadows["bad"].behaviour.received:
            wait_until_sync(
                lambda: operational(mesh, "meshlib_outlier_ejections_total", "all") == 1,
                "the 500 endpoint's ejection",
            )
    assert shadows["bad"].behaviour.received == 1
    assert shadows["good"].behaviour.received == 7
    assert source_requests(mesh) == {"reviews": 8.0}


def test_no_copy_while_every_mirror_endpoint_is_ejected(
    make_mesh: MeshFactory, shadows: dict[str, Upstream], client_kind: str
) -> None:
    """A mirror subset whose only endpoint is ejected gets no copy (Envoy's shadow ends in a
    503 UH nobody sees: no istio metric counts it); the calls themselves are untouched."""
    shadows["bad"].behaviour.status = 500
    route = "  mirror: {host: shadow, subset: bad}\n"
    mesh = make_mesh(mirrored(shadows, OUTLIER, route))
    caller = Caller(client_kind, mesh)
    assert caller.one().upstream == "v1"
    wait_until_sync(
        lambda: operational(mesh, "meshlib_outlier_ejections_total", "bad") == 1,
        "the endpoint's ejection",
    )
    assert [caller.one().status for _ in range(4)] == [200] * 4
    assert shadows["bad"].behaviour.received == 1
    assert source_requests(mesh) == {"reviews": 5.0}


@pytest.mark.parametrize(
    "pool",
    [
        pytest.param("http: {http2MaxRequests: 1}", id="http2MaxRequests"),
        pytest.param(
            "tcp: {maxConnections: 1}\nhttp: {http1MaxPendingRequests: 1}", id="maxConnections"
        ),
    ],
)
def test_a_mirror_cluster_never_gets_more_copies_at_once_than_its_limits(
    make_mesh: MeshFactory, shadows: dict[str, Upstream], client_kind: str, pool: str
) -> None:
    """Six calls at once, each mirrored to a subset whose connection pool allows one request
    at a time: the mirror never has more than one copy at once; copies past the limits
    (beyond the one pending request maxConnections lets wait) are dropped and counted as the
    mirror cluster's overflow, never queued for good."""
    shadows["good"].behaviour.delay = 0.3
    policy = "connectionPool:\n" + textwrap.indent(pool, "  ")
    mesh = make_mesh(mirrored(shadows, policy, "  mirror: {host: shadow, subset: good}\n"))
    results = Caller(client_kind, mesh).many(6, concurrency=6)
    assert [r.upstream for r in results] == ["v1"] * 6

    def overflows() -> float:
        return operational(mesh, "meshlib_upstream_overflow_total", "good")

    wait_until_sync(
        lambda: copies(shadows) + overflows() == 6 and copies_in_flight(mesh, "good") == 0,
        "every copy sent or dropped",
        timeout=10,
    )
    assert shadows["good"].behaviour.peak == 1
    assert overflows() >= 1


def test_a_copy_to_a_failing_mirror_is_never_retried(
    make_mesh: MeshFactory,
    upstreams: dict[str, Upstream],
    shadows: dict[str, Upstream],
    client_kind: str,
) -> None:
    """The route retries 5xx: its calls are retried, their copies (answered 503 by the
    mirror) are not, as Envoy's shadow router has no retry policy."""
    upstreams["v1"].behaviour.status = 503
    shadows["good"].behaviour.status = 503
    route = (
        "  mirror: {host: shadow, subset: good}\n"
        '  retries: {attempts: 2, retryOn: "5xx", perTryTimeout: 5s}\n'
    )
    mesh = make_mesh(mirrored(shadows, "loadBalancer: {simple: ROUND_ROBIN}", route))
    caller = Caller(client_kind, mesh)
    assert [caller.one().status for _ in range(3)] == [503] * 3
    assert upstreams["v1"].behaviour.received == 9  # 1 + 2 retries per call
    wait_until_sync(lambda: copies_in_flight(mesh, "good") == 0, "copies in flight")
    assert shadows["good"].behaviour.received == 3


def test_a_copy_has_the_route_timeout_and_its_timeout_feeds_outlier_detection(
    make_mesh: MeshFactory, shadows: dict[str, Upstream], client_kind: str
) -> None:
    """A copy gets the route's timeout (0.3 s here; the caller allows 30 s), as Envoy's shadow
    does; its timing out is a failure of the mirror endpoint for outlier detection, which
    ejects it (consecutive5xxErrors 1)."""
    shadows["good"].behaviour.delay = 3.0
    route = "  mirror: {host: shadow, subset: good}\n  timeout: 0.3s\n"
    mesh = make_mesh(mirrored(shadows, OUTLIER, route))
    assert Caller(client_kind, mesh).one().upstream == "v1"
    wait_until_sync(
        lambda: operational(mesh, "meshlib_outlier_ejections_total", "good") == 1,
        "the ejection of the endpoint that let the copy time out",
        timeout=2.5,
    )
    assert shadows["good"].behaviour.received == 1


@pytest.mark.parametrize("kind", ["httpx", "requests"])
def test_copies_waiting_on_one_mirror_never_hold_up_another(
    make_mesh: MeshFactory, shadows: dict[str, Upstream], kind: str
) -> None:
    """Eight calls from one sync client mirrored to a slow mirror (1 s per answer) that
    allows one connection, then one call mirrored to another: that copy arrives at once
    (within 0.5 s). The sync clients' copies share four threads: a copy that would wait for the slow mirror's
    connection is dropped, counted as its overflow, instead of holding one of them (Envoy's
    pending queue holds no thread of another mirror's)."""
    shadows["bad"].behaviour.delay = 1.0
    rule = f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shadow}}
spec:
  host: {SHADOW}
  subsets:
  - name: bad
    labels: {{version: bad}}
    trafficPolicy:
      connectionPool: {{tcp: {{maxConnections: 1}}, http: {{http1MaxPendingRequests: 10}}}}
  - name: good
    labels: {{version: good}}
"""
    routes = virtual_service(
        "- match: [{uri: {prefix: /slow}}]\n"
        "  route: [{destination: {host: reviews, subset: v1}}]\n"
        "  mirror: {host: shadow, subset: bad}\n"
        "- route: [{destination: {host: reviews, subset: v1}}]\n"
        "  mirror: {host: shadow, subset: good}\n"
    )
    mesh = make_mesh(service_entry(SHADOW, 9080, shadows) + "---\n" + rule + "---\n" + routes)
    client: Any = (
        meshed_httpx.Client(mesh=mesh, timeout=10)
        if kind == "httpx"
        else meshed_requests.Session(mesh=mesh)
    )
    with client:
        statuses = [client.get(f"{URL}/slow").status_code for _ in range(8)]
        started = time.monotonic()
        statuses.append(client.get(f"{URL}/fast").status_code)
        wait_until_sync(lambda: shadows["good"].behaviour.received == 1, "the other copy")
        assert time.monotonic() - started < 0.8  # the slow mirror takes 1 s
    assert statuses == [200] * 9
    wait_until_sync(lambda: copies_in_flight(mesh, "bad") == 0, "the slow copies", timeout=10)
    assert shadows["bad"].behaviour.received >= 1


@pytest.mark.parametrize("kind", ["httpx", "requests"])
def test_a_copy_still_queued_when_the_client_closes(
    make_mesh: MeshFactory, shadows: dict[str, Upstream], kind: str
) -> None:
    """The sync clients' four mirroring threads are busy with slow copies (1.5 s) when the
    client closes: closing waits for none, and a fifth copy, still queued, goes too when a
    thread frees (through a pool of its own closed after it with httpx, on a connection
    closed after it with requests), not dropped."""
    shadows["good"].behaviour.delay = 1.5
    policy = "loadBalancer: {simple: ROUND_ROBIN}"
    mesh = make_mesh(mirrored(shadows, policy, "  mirror: {host: shadow, subset: good}\n"))
    client: Any = (
        meshed_httpx.Client(mesh=mesh, timeout=10)
        if kind == "httpx"
        else meshed_requests.Session(mesh=mesh)
    )
    with client:
        assert [client.get(f"{URL}/").status_code for _ in range(5)] == [200] * 5
        closing = time.monotonic()
    waited = time.monotonic() - closing
    wait_until_sync(lambda: copies_in_flight(mesh, "good") == 0, "the copies", timeout=10)
    assert waited < 1.0 and shadows["good"].behaviour.received == 5  # the copies take 1.5 s


@pytest.mark.parametrize("kind", ["httpx", "requests"])
def test_closing_right_after_the_call_waits_for_no_copy_and_leaks_none(
    make_mesh: MeshFactory, kind: str
) -> None:
    """`meshlib.Client` and `meshlib.Session` closed right after their call, while the mirror
    holds its copy (which carries the call's `x-request-id`): `close()` returns at once, the
    copy stays in flight past the close, and its connection is closed once the mirror has
    answered (none stays open in a pool nobody closes)."""
    from tests.rawserver import ThreadServer, held_until

    release = asyncio.Event()
    held = ThreadServer(held_until(release))
    with held as shadow:
        mesh = make_mesh(held_mirror(shadow.port))
        mirror = mesh.cluster((SHADOW, None, 9080))
        client: Any = (
            meshed_httpx.Client(mesh=mesh)
            if kind == "httpx"
            else meshed_requests.Session(mesh=mesh)
        )
        try:
            response = client.get(f"{URL}/", timeout=5)
            assert response.status_code == 200
            wait_until_sync(lambda: len(shadow.heads) == 1, "the copy")
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < 2.0  # the copies are held until released
            assert mirror.limits.active_requests == 1  # the copy, still in flight
        finally:
            held.loop.call_soon_threadsafe(release.set)
        wait_until_sync(lambda: mirror.limits.active_requests == 0, "the copy to end")
        rid = response.json()["headers"]["x-request-id"]  # the call's, as reviews saw it
        assert f"\r\nx-request-id: {rid}\r\n".encode() in shadow.heads[0].lower()
        wait_until_sync(lambda: shadow.active == 0, "the copy's connection to close", 2.0)


def test_a_copy_through_the_apps_own_transport_still_goes_after_the_close(
    make_mesh: MeshFactory,
) -> None:
    """A transport of the app's own, which meshlib cannot copy, carries the copies itself:
    closing the client closes it (ending the copies it holds, as it ends anything on it,
    never held against the mirror), and a copy still queued for a thread then goes through
    it after the close, on a connection closed after it (`Connection: close`)."""
    from tests.rawserver import ThreadServer, held_until

    class Own(httpx.HTTPTransport):
        """The app's: not httpx's own class, so meshlib makes no pool like it."""

    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: shadow}\n"
        f"spec:\n  host: {SHADOW}\n  trafficPolicy:\n"
        + textwrap.indent(OUTLIER.strip(), "    ")
        + "\n"
    )
    release = asyncio.Event()
    held = ThreadServer(held_until(release))
    with held as shadow:
        mesh = make_mesh(held_mirror(shadow.port, rule))
        mirror = mesh.cluster((SHADOW, None, 9080))
        client = meshed_httpx.Client(mesh=mesh, transport=Own())
        try:
            assert [client.get(f"{URL}/").status_code for _ in range(5)] == [200] * 5
            wait_until_sync(lambda: len(shadow.heads) == 4, "four copies held")
            assert mirror.limits.active_requests == 5  # and the fifth, queued
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < 2.0  # the copies are held until released
        finally:
            held.loop.call_soon_threadsafe(release.set)
        wait_until_sync(lambda: mirror.limits.active_requests == 0, "the copies to end")
        assert len(shadow.heads) == 5
        assert b"\r\nconnection: close\r\n" in shadow.heads[4].lower()
        wait_until_sync(lambda: shadow.active == 0, "the copies' connections to close", 2.0)
        # the copies the close ended are not the mirror's failures (one would eject it)
        assert operational(mesh, "meshlib_outlier_ejections_total", "") == 0


def test_a_client_used_again_after_close_mirrors_again(
    make_mesh: MeshFactory, shadows: dict[str, Upstream]
) -> None:
    """requests lets a closed Session send again, and a stock httpx transport under
    `instrument()` serves one `with httpx.Client` block after another: closing drops only
    the copies queued before it, and later calls are mirrored as before."""
    import httpx

    import meshlib

    policy = "loadBalancer: {simple: ROUND_ROBIN}"
    mesh = make_mesh(mirrored(shadows, policy, "  mirror: {host: shadow, subset: good}\n"))
    received = shadows["good"].behaviour

    session = meshed_requests.Session(mesh=mesh)
    for expected in (1, 2):
        assert session.get(f"{URL}/").status_code == 200
        wait_until_sync(lambda n=expected: received.received == n, f"copy {expected}")
        session.close()

    meshlib.instrument(mesh)
    try:
        transport = httpx.HTTPTransport()
        for expected in (3, 4):
            with httpx.Client(transport=transport) as client:
                assert client.get(f"{URL}/").status_code == 200
                wait_until_sync(lambda n=expected: received.received == n, f"copy {expected}")
    finally:
        meshlib.uninstrument()
