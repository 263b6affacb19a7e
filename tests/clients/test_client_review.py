"""meshlib's outbound clients as an app drives them, at edges a client review found: adapters
an app mounts on a `meshlib.Session`, endpoints with IPv6 addresses, multipart bodies held in memory.

Upstreams are uvicorn servers on 127.0.0.1 (tests/upstream.py); every client, server and mesh
is closed before the test ends.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import requests.auth
from requests.adapters import HTTPAdapter

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from tests.upstream import AsgiServer, Upstream, loopback_service, mesh_for

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


@pytest.fixture
def mesh_with_retries(upstream: Upstream) -> Iterator[Mesh]:
    route = f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
"""
    config = MeshConfig(service="me", namespace="default")
    mesh = mesh_for(config, loopback_service(HOST, upstream.port) + route)
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


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _ipv6_upstream(name: str) -> Upstream:
    upstream = Upstream(name)
    upstream.server.config.host = "::1"
    return upstream


def _ipv6_entry(host: str, port: int) -> str:
    return loopback_service(host, port).replace("address: 127.0.0.1", 'address: "::1"')


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_rewritten_or_mirrored_request_reaches_an_ipv6_endpoint(client: str) -> None:
    """A route that rewrites the path, and a mirror, to endpoints with IPv6 addresses: the
    request goes to `[::1]:port` (httpx splits a `netloc` at its first ':', so the endpoint's
    `[::1]:port` once raised `httpx.InvalidURL` and the copy was lost)."""
    shadow_host = "shadow.default.svc.cluster.local"
    route = f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{uri: {{prefix: /old}}}}]
    rewrite: {{uri: /new}}
    route: [{{destination: {{host: {HOST}}}}}]
    mirror: {{host: {shadow_host}}}
"""
    with _ipv6_upstream("api") as api, _ipv6_upstream("shadow") as shadow:
        policy = _ipv6_entry(HOST, api.port) + "---\n" + _ipv6_entry(shadow_host, shadow.port)
        mesh = mesh_for(MeshConfig(service="me", namespace="default"), policy + route)
        with mesh:
            if client == "sync":
                with meshlib.Client(mesh=mesh, timeout=5) as sync:
                    response = sync.get(f"{URL}/old")
            else:

                async def call() -> httpx.Response:
                    async with meshlib.AsyncClient(mesh=mesh, timeout=5) as aclient:
                        return await aclient.get(f"{URL}/old")

                response = asyncio.run(call())
            assert response.status_code == 200
            assert response.json()["path"] == "/new"
            deadline = time.monotonic() + 5
            while not shadow.behaviour.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [r["path"] for r in shadow.behaviour.requests] == ["/new"]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_multipart_body_held_in_memory_is_retried(
    mesh_with_retries: Mesh, upstream: Upstream, client: str
) -> None:
    """A `files=` upload whose parts are bytes or text is replayed whole on a retry, as a
    bytes body is (httpx renders it anew on each read); one with a file object's part is
    sent once, as the docs say of file-like bodies."""
    upstream.behaviour.fail_every = 0.5
    upstream.behaviour.fail_status = 503
    upstream.behaviour.received = 1  # the first request fails, the second succeeds

    def post(**body: object) -> httpx.Response:
        if client == "sync":
            with meshlib.Client(mesh=mesh_with_retries, timeout=5) as sync:
                return sync.post(f"{URL}/upload", **body)  # type: ignore[arg-type]

        async def call() -> httpx.Response:
            async with meshlib.AsyncClient(mesh=mesh_with_retries, timeout=5) as aclient:
                return await aclient.post(f"{URL}/upload", **body)  # type: ignore[arg-type]

        return asyncio.run(call())

    response = post(data={"k": "v"}, files={"f": ("a.txt", b"hello")})
    assert response.status_code == 200
    bodies = [r["body"] for r in upstream.behaviour.requests]
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    assert "hello" in bodies[1]

    upstream.behaviour.requests.clear()
    upstream.behaviour.received = 1
    response = post(files={"f": ("a.txt", io.BytesIO(b"hello"))})
    assert response.status_code == 503  # not sent again
    assert len(upstream.behaviour.requests) == 1


async def _digest_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 401 with a digest challenge to a request without `Authorization`, else 200."""
    while (await receive()).get("more_body"):
        pass
    authorized = any(name == b"authorization" for name, _ in scope["headers"])
    challenge = b'Digest realm="r", nonce="abc", qop="auth", algorithm=MD5'
    headers = [] if authorized else [(b"www-authenticate", challenge)]
    headers.append((b"content-length", b"2"))
    status = 200 if authorized else 401
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def test_digest_auth_resends_through_an_adapter_mounted_on_a_session() -> None:
    """requests' digest auth sends its second request through `response.connection`: with an
    app's adapter mounted on a `meshlib.Session`, that is the meshed adapter, so the resend is
    routed too (through the bare adapter it would go to the Service name unrouted)."""
    server = AsgiServer(_digest_app).start()
    try:
        config = MeshConfig(service="me", namespace="default")
        mesh = mesh_for(config, loopback_service(HOST, server.port))
        with mesh, meshlib.Session(mesh=mesh) as session:
            session.mount("http://", HTTPAdapter())
            auth = requests.auth.HTTPDigestAuth("user", "pass")
            response = session.get(f"{URL}/digest", auth=auth, timeout=5)
            assert response.status_code == 200
            assert [r.status_code for r in response.history] == [401]
            assert response.connection is session.get_adapter(URL)
    finally:
        server.stop()


def test_an_adapter_pickled_without_owns_inner_still_sends(mesh: Mesh) -> None:
    """A `MeshAdapter` pickled by a meshlib before `_owns_inner` (its state lacks it) sends and
    closes after unpickling."""
    from meshlib.clients.requests import MeshAdapter

    state = MeshAdapter().__getstate__()  # type: ignore[no-untyped-call]
    del state["_owns_inner"]
    adapter = MeshAdapter.__new__(MeshAdapter)
    adapter.__setstate__(state)
    adapter._mesh = mesh
    with requests.Session() as session:
        session.mount("http://", adapter)
        assert session.get(f"{URL}/", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("make", "where"),
    [
        (lambda mesh: meshlib.Client(mesh=mesh), "meshlib.Client"),
        (lambda mesh: meshlib.AsyncClient(mesh=mesh), "meshlib.AsyncClient"),
        (lambda mesh: meshlib.Session(mesh=mesh), "meshlib.Session"),
        (lambda mesh: meshlib.MeshTransport(mesh=mesh), "meshlib.MeshTransport"),
        (lambda mesh: meshlib.AsyncMeshTransport(mesh=mesh), "meshlib.AsyncMeshTransport"),
        (lambda mesh: meshlib.MeshAdapter(mesh=mesh), "meshlib.MeshAdapter"),
        (lambda mesh: meshlib.instrument(mesh), "meshlib.instrument"),
        (lambda mesh: meshlib.configure(mesh=mesh), "meshlib.configure"),
    ],
)
def test_a_policy_path_given_as_the_mesh_is_refused_where_it_is_given(
    make: Any, where: str
) -> None:
    """`mesh="mesh.yaml"` (a policy path where a Mesh is due) is a TypeError that says where
    the path goes, at once, not an AttributeError ("'str' object has no attribute 'plan'")
    from the first call, or from every call of every client under `instrument()` (or of every
    client using the default Mesh, which `configure(mesh=...)` replaced with the string)."""
    from meshlib import mesh as mesh_module

    before = mesh_module.made_default_mesh()
    with pytest.raises(TypeError) as raised:
        make("mesh.yaml")
    assert mesh_module.made_default_mesh() is before
    if where == "meshlib.configure" and not (mesh_module.__file__ or "").endswith(".py"):
        # Compiled, `configure` checks its annotation first, with mypyc's own message.
        assert "Mesh" in str(raised.value)
        return
    assert str(raised.value) == (
        f"{where}: mesh= takes a meshlib.Mesh, not str 'mesh.yaml'; a policy path goes to"
        " meshlib.configure(policy=...) or Mesh(config, policy=...)"
    )
    assert not meshlib.is_instrumented()


def test_configure_refuses_a_mesh_with_settings_it_would_ignore() -> None:
    """`configure(mesh=m, service=..., policy=...)` would serve `m` as it was built, the
    settings dropped without a word: a TypeError says to give them to one or the other, and
    the default Mesh stays as it was."""
    from meshlib import mesh as mesh_module

    built = meshlib.Mesh(meshlib.MeshConfig(service="reviews", metrics_port=None), watch=False)
    before = mesh_module.made_default_mesh()
    try:
        for extra in ({"service": "ratings"}, {"policy": "mesh.yaml"}):
            with pytest.raises(TypeError, match="mesh= is a Mesh already built"):
                meshlib.configure(mesh=built, **extra)
            assert mesh_module.made_default_mesh() is before
    finally:
        built.close()
