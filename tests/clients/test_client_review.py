"""meshlib's outbound clients as an app drives them, at edges a client review found: adapters
an app mounts on a `meshlib.Session`.

Upstreams are uvicorn servers on 127.0.0.1 (tests/upstream.py); every client, server and mesh
is closed before the test ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from tests.upstream import Upstream, loopback_service, mesh_for

HOST = "api.default.svc.cluster.local"
URL = f"http://{HOST}:9080"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream("api") as up:
        yield up


@pytest.fixture
def mesh(upstream: Upstream) -> Iterator[Mesh]:
    mesh = mesh_for(
        MeshConfig(service="me", namespace="default"), loopback_service(HOST, upstream.port)
    )
    yield mesh
    mesh.close()


def test_an_adapter_mounted_on_a_session_stays_meshed(mesh: Mesh, upstream: Upstream) -> None:
    """`session.mount("http://", HTTPAdapter(pool_maxsize=50))` — how requests apps size their
    pools — keeps the session meshed (as `meshlib.Client` wraps httpx's `mounts=`): the
    request is routed, sent through the app's adapter, and the adapter is closed with the
    session."""
    closed: list[bool] = []

    class Counting(HTTPAdapter):
        sent = 0

        def send(self, *args: object, **kwargs: object) -> requests.Response:  # type: ignore[override]
            Counting.sent += 1
            return super().send(*args, **kwargs)  # type: ignore[arg-type]

        def close(self) -> None:
            closed.append(True)
            super().close()

    with meshlib.Session(mesh=mesh) as session:
        session.mount("http://", Counting(pool_maxsize=50))
        session.mount(f"{URL}/only", HTTPAdapter())
        response = session.get(f"{URL}/a", timeout=5)
        assert response.status_code == 200
        assert response.json()["headers"]["x-envoy-attempt-count"] == "1"
        assert session.get(f"{URL}/only/b", timeout=5).status_code == 200
    assert Counting.sent == 1
    assert closed == [True]
