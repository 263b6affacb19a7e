"""The async clients under trio: the mesh's own waits (route timeouts, fault delays, retry
back-off, waiting under maxConnections) and its background work (mirrored copies) run on trio
when the caller does, against real upstreams. meshlib's HTTP/1.1 pool is asyncio's: under trio
`meshlib.AsyncClient` is served by httpx's own transport."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

import meshlib
from meshlib.config import MeshConfig
from tests.upstream import Upstream, loopback_service, mesh_for

trio = pytest.importorskip("trio")

HOST = "reviews.default.svc.cluster.local"
MIRROR = "shadow.default.svc.cluster.local"


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    with Upstream("reviews") as reviews, Upstream("shadow") as shadow:
        yield reviews, shadow


def mesh(
    reviews: Upstream, shadow: Upstream, http: str, pool: str = "http: {maxRetries: 100}"
) -> meshlib.Mesh:
    policy = (
        loopback_service(HOST, reviews.port)
        + "---\n"
        + loopback_service(MIRROR, shadow.port)
        + f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
{http}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  trafficPolicy: {{connectionPool: {{{pool}}}}}
"""
    )
    return mesh_for(MeshConfig(service="productpage", metrics_port=None), policy)


def flags(response: httpx.Response) -> list[str]:
    return list(response.extensions.get("response_flags", []))


def test_plain_calls_and_retries_run_under_trio(upstreams: tuple[Upstream, Upstream]) -> None:
    """meshlib.AsyncClient's default transport serves a trio caller (through httpx's), and a
    retried call backs off on trio: one failure, then the answer."""
    reviews, shadow = upstreams
    reviews.behaviour.fail_every = 0.5  # every second request fails: the first one, here
    reviews.behaviour.received = 1
    the_mesh = mesh(
        reviews,
        shadow,
        "  - retries: {attempts: 2, retryOn: 5xx}\n    route: [{destination: {host: reviews}}]",
    )

    async def main() -> httpx.Response:
        async with meshlib.AsyncClient(mesh=the_mesh) as client:
            return await client.get("http://reviews:9080/a")

    response = trio.run(main)
    assert response.status_code == 200
    assert response.json()["headers"]["x-envoy-attempt-count"] == "2"
    assert reviews.behaviour.received == 3


def test_a_route_timeout_answers_504_under_trio(upstreams: tuple[Upstream, Upstream]) -> None:
    """A route's timeout cuts a slow answer short on trio: 504 with flag UT, on time."""
    reviews, shadow = upstreams
    reviews.behaviour.delay = 2.0
    the_mesh = mesh(
        reviews, shadow, "  - timeout: 0.2s\n    route: [{destination: {host: reviews}}]"
    )

    async def main() -> tuple[httpx.Response, float]:
        async with meshlib.AsyncClient(mesh=the_mesh) as client:
            start = time.monotonic()
            response = await client.get("http://reviews:9080/slow")
            return response, time.monotonic() - start

    response, took = trio.run(main)
    assert (response.status_code, flags(response)) == (504, ["UT"])
    assert 0.2 <= took < 1.5


def test_a_fault_delay_waits_on_trio(upstreams: tuple[Upstream, Upstream]) -> None:
    """An injected delay sleeps on trio, then the call goes through (flag DI)."""
    reviews, shadow = upstreams
    the_mesh = mesh(
        reviews,
        shadow,
        "  - fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}\n"
        "    route: [{destination: {host: reviews}}]",
    )

    async def main() -> tuple[httpx.Response, float]:
        async with meshlib.AsyncClient(mesh=the_mesh) as client:
            start = time.monotonic()
            response = await client.get("http://reviews:9080/")
            return response, time.monotonic() - start

    response, took = trio.run(main)
    assert (response.status_code, flags(response)) == (200, ["DI"])
    assert took >= 0.3


def test_requests_wait_for_a_connection_under_trio(upstreams: tuple[Upstream, Upstream]) -> None:
    """With maxConnections 1, concurrent trio tasks wait their turn: all answered, one at a
    time at the upstream."""
    reviews, shadow = upstreams
    reviews.behaviour.delay = 0.1
    the_mesh = mesh(
        reviews,
        shadow,
        "  - route: [{destination: {host: reviews}}]",
        pool="tcp: {maxConnections: 1}",
    )
    statuses: list[int] = []

    async def main() -> None:
        async with meshlib.AsyncClient(mesh=the_mesh) as client:

            async def one() -> None:
                statuses.append((await client.get("http://reviews:9080/")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)

    trio.run(main)
    assert statuses == [200] * 4
    assert reviews.behaviour.peak == 1


def test_mirrored_copies_are_sent_under_trio(upstreams: tuple[Upstream, Upstream]) -> None:
    """A mirrored copy goes out in the background on trio; closing the client gives copies
    in flight their grace period."""
    reviews, shadow = upstreams
    the_mesh = mesh(
        reviews,
        shadow,
        "  - route: [{destination: {host: reviews}}]\n"
        f"    mirror: {{host: {MIRROR}}}\n"
        "    mirrorPercentage: {value: 100}",
    )

    async def main() -> int:
        async with meshlib.AsyncClient(mesh=the_mesh) as client:
            return (await client.get("http://reviews:9080/copied")).status_code

    assert trio.run(main) == 200
    assert [r["path"] for r in shadow.behaviour.requests] == ["/copied"]
    assert shadow.behaviour.requests[0]["headers"]["host"] == "reviews:9080"  # as Istio 1.28+


def test_a_stock_httpx_client_with_the_mesh_transport_under_trio(
    upstreams: tuple[Upstream, Upstream],
) -> None:
    """A stock httpx.AsyncClient given meshlib's transport over httpx's own keeps that pool
    on trio, and the mesh's waits run on trio too: a fault delay, then a route timeout."""
    reviews, shadow = upstreams
    reviews.behaviour.delay = 2.0
    the_mesh = mesh(
        reviews,
        shadow,
        "  - fault: {delay: {fixedDelay: 0.1s, percentage: {value: 100}}}\n"
        "    timeout: 0.3s\n"
        "    route: [{destination: {host: reviews}}]",
    )

    async def main() -> httpx.Response:
        transport = meshlib.AsyncMeshTransport(httpx.AsyncHTTPTransport(), mesh=the_mesh)
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.get("http://reviews:9080/")

    response = trio.run(main)
    assert (response.status_code, flags(response)) == (504, ["UT", "DI"])  # Envoy's order
