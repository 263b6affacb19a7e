"""`tcp.maxConnections` end to end: requests beyond it wait for a connection, as in Envoy's
pending queue, for all three meshed clients; the wait ends at the route deadline (504 UT)
or at the caller's own pool timeout (its client's error)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import requests

import meshlib.clients.httpx as meshed_httpx
import meshlib.clients.requests as meshed_requests
from tests.e2e.conftest import URL, Caller, MeshFactory, virtual_service
from tests.upstream import Upstream

TO_V1 = "- route: [{destination: {host: reviews, subset: v1}}]\n  retries: {attempts: 0}\n"


def test_requests_beyond_max_connections_wait_for_one(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """maxConnections 2, 8 concurrent requests to a 150 ms endpoint: every request is answered
    200 (none refused), and the endpoint never handles more than 2 at once."""
    v1 = upstreams["v1"].behaviour
    v1.delay = 0.15
    mesh = make_mesh(
        virtual_service(TO_V1), traffic_policy="connectionPool: {tcp: {maxConnections: 2}}\n"
    )
    started = time.monotonic()
    results = Caller(client_kind, mesh).many(8, concurrency=8)
    elapsed = time.monotonic() - started
    assert Counter(r.status for r in results) == {200: 8}
    assert all(r.flags == [] for r in results)
    assert v1.peak == 2  # two at a time: the limit held, and requests did run concurrently
    assert elapsed >= 4 * 0.15  # 8 requests, 2 at a time
    cluster = mesh.cluster(("reviews.default.svc.cluster.local", "v1", 9080))
    assert cluster.limits.active_requests == 0 and cluster.limits.pending_requests == 0


def test_waiting_ends_at_the_route_deadline(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """maxConnections 1 and a 1 s endpoint: while one request holds the connection, one
    whose route allows 300 ms waits for it until its deadline, is answered 504 UT then, and
    is never sent (the first one is answered as usual)."""
    v1 = upstreams["v1"].behaviour
    v1.delay = 1.0
    mesh = make_mesh(
        virtual_service(
            "- match: [{headers: {x-wait: {exact: short}}}]\n  timeout: 300ms\n"
            + TO_V1.replace("- route", "  route", 1)
            + TO_V1
            + "  timeout: 1500ms\n"
        ),
        traffic_policy="connectionPool: {tcp: {maxConnections: 1}}\n",
    )
    caller = Caller(client_kind, mesh)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(caller.one)
        while v1.active == 0:  # poll: the first holds the only connection
            time.sleep(0.005)
        started = time.monotonic()
        waited = caller.one(headers={"x-wait": "short"})
        elapsed = time.monotonic() - started
        assert first.result().status == 200
    assert (waited.status, waited.flags) == (504, ["UT"])
    assert elapsed < 0.9  # its own deadline, not the connection's release
    assert v1.received == 1  # the request that waited out its deadline never went out


def test_httpx_pool_timeout_bounds_the_wait(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """With httpx's pool timeout shorter than the wait, the waiting request raises
    httpx.PoolTimeout, as httpx does when its own pool is full — sync and async."""
    upstreams["v1"].behaviour.delay = 0.6
    mesh = make_mesh(
        virtual_service(TO_V1), traffic_policy="connectionPool: {tcp: {maxConnections: 1}}\n"
    )
    timeout = httpx.Timeout(10.0, pool=0.1)
    with meshed_httpx.Client(mesh=mesh, timeout=timeout) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.get, URL + "/")
        while upstreams["v1"].behaviour.active == 0:  # poll: the first is being served
            time.sleep(0.005)
        with pytest.raises(httpx.PoolTimeout, match="maxConnections"):
            client.get(URL + "/")
        assert first.result().status_code == 200

    async def main() -> list[object]:
        async with meshed_httpx.AsyncClient(mesh=mesh, timeout=timeout) as client:
            return await asyncio.gather(
                client.get(URL + "/"), client.get(URL + "/"), return_exceptions=True
            )

    outcomes = asyncio.run(main())
    assert sorted(type(o).__name__ for o in outcomes) == ["PoolTimeout", "Response"]
    assert upstreams["v1"].behaviour.received == 2  # the timed-out requests were never sent


def test_requests_connect_timeout_bounds_the_wait(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """requests has no pool timeout: the caller's connect timeout bounds the wait, and running
    out of it raises requests' ConnectTimeout."""
    upstreams["v1"].behaviour.delay = 0.6
    mesh = make_mesh(
        virtual_service(TO_V1), traffic_policy="connectionPool: {tcp: {maxConnections: 1}}\n"
    )
    with meshed_requests.Session(mesh=mesh) as session, ThreadPoolExecutor(1) as pool:
        first = pool.submit(session.get, URL + "/", timeout=10)
        while upstreams["v1"].behaviour.active == 0:
            time.sleep(0.005)
        with pytest.raises(requests.ConnectTimeout, match="maxConnections"):
            session.get(URL + "/", timeout=(0.1, 10))
        assert first.result().status_code == 200
    assert upstreams["v1"].behaviour.received == 1
    gave_up = [
        sample.labels["response_flags"]
        for metric in mesh.registry.collect()
        for sample in metric.samples
        if sample.name == "istio_requests_total" and sample.labels["response_code"] == "0"
    ]
    assert gave_up == ["DC"]  # the caller gave up waiting; nothing was sent
