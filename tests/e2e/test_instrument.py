"""instrument(): stock httpx and requests clients become meshed, once, and can be restored."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import requests

import meshlib
from tests.e2e.conftest import URL, MeshFactory, virtual_service
from tests.upstream import Upstream

TO_V2 = virtual_service(
    "- route: [{destination: {host: reviews, subset: v2}}]\n  retries: {attempts: 3, retryOn: 5xx}\n"
)


@pytest.fixture
def instrumented(make_mesh: MeshFactory) -> Iterator[meshlib.Mesh]:
    mesh = make_mesh(TO_V2)
    meshlib.instrument(mesh)
    yield mesh
    meshlib.uninstrument()


def test_stock_clients_are_meshed(instrumented: meshlib.Mesh) -> None:
    """httpx.Client, httpx.AsyncClient and requests.Session created after instrument() are routed."""
    with httpx.Client() as client:
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
    with requests.Session() as session:
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"

    async def run() -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(URL + "/")).headers["x-upstream"]

    assert asyncio.run(run()) == "v2"
    assert requests.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"


def test_clients_created_before_instrument_are_meshed(make_mesh: MeshFactory) -> None:
    """A client made before instrument() is meshed too (the transport methods are wrapped)."""
    client = httpx.Client()
    session = requests.Session()
    meshlib.instrument(make_mesh(TO_V2))
    try:
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"
    finally:
        meshlib.uninstrument()
        client.close()
        session.close()


def test_idempotent_and_never_meshed_twice(
    instrumented: meshlib.Mesh, upstreams: dict[str, Upstream]
) -> None:
    """Calling instrument() again changes nothing; a meshlib client is not meshed a second time."""
    meshlib.instrument(instrumented)
    upstreams["v2"].behaviour.fail_every = 1.0
    with meshlib.Client(mesh=instrumented) as client:
        response = client.get(URL + "/")
    assert response.status_code == 503
    assert upstreams["v2"].behaviour.received == 4  # 1 + 3 retries, not (1 + 3) squared
    attempts = [r["headers"]["x-envoy-attempt-count"] for r in upstreams["v2"].behaviour.requests]
    assert attempts == ["1", "2", "3", "4"]


def test_uninstrument_restores_stock_behaviour(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """After uninstrument() a request to the mesh host is no longer routed (DNS cannot find it)."""
    meshlib.instrument(make_mesh(TO_V2))
    meshlib.uninstrument()
    with httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.get(URL + "/")
    with httpx.Client() as client:  # plain addresses still work
        assert client.get(f"http://{upstreams['v1'].address}/").status_code == 200


def test_instrumenting_another_mesh_applies_to_existing_clients(make_mesh: MeshFactory) -> None:
    """instrument(B) after instrument(A) (with or without uninstrument() between) routes
    existing clients by B's policy, not by the Mesh their first request met."""
    to_v3 = virtual_service("- route: [{destination: {host: reviews, subset: v3}}]\n")
    client = httpx.Client()
    session = requests.Session()
    try:
        meshlib.instrument(make_mesh(TO_V2))
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"
        meshlib.uninstrument()
        meshlib.instrument(make_mesh(to_v3))
        assert client.get(URL + "/").headers["x-upstream"] == "v3"
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v3"
    finally:
        meshlib.uninstrument()
        client.close()
        session.close()
