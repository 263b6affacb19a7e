"""Network failures give Envoy's answers for mesh hosts and the libraries' own errors otherwise."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import requests

import meshlib
from tests.e2e.conftest import URL, Caller, MeshFactory, virtual_service
from tests.rawserver import Peer, ThreadServer
from tests.upstream import Upstream, unanswered_port


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Dead:
    """Stands in for an Upstream whose port refuses connections."""

    def __init__(self) -> None:
        self.port = closed_port()


_RESET = "upstream connect error or disconnect/reset before headers. "
_REFUSED = (
    "reset reason: remote connection failure, transport failure reason:"
    " delayed connect error: Connection refused"
)


@pytest.mark.parametrize("retried", [True, False])
def test_refused_endpoints_give_503_uf(
    make_mesh: MeshFactory, client_kind: str, retried: bool
) -> None:
    """Every endpoint refusing connections: default retries, then 503 "UF,URX" with Envoy's
    body, which says the request was retried (router.cc onUpstreamReset's is_retry_); with
    retries off, 503 "UF" without that part."""
    dead = {"v1": Dead(), "v2": Dead(), "v3": Dead()}
    policy = (
        ""
        if retried
        else virtual_service(
            "- route: [{destination: {host: reviews}}]\n  retries: {attempts: 0}\n"
        )
    )
    mesh = make_mesh(policy, endpoints=dead)  # type: ignore[arg-type]
    result = Caller(client_kind, mesh).one()
    assert result.status == 503
    assert result.flags == (["UF", "URX"] if retried else ["UF"])
    assert result.body == _RESET + ("retried and the latest " if retried else "") + _REFUSED


def test_a_connect_timeout_is_503_uf_connection_timeout(
    make_mesh: MeshFactory, client_kind: str
) -> None:
    """The DestinationRule's connect timeout running out is UF with Envoy's reset reason for
    it, "connection timeout"."""
    with unanswered_port() as port:
        silent = Dead()
        silent.port = port
        mesh = make_mesh(
            virtual_service(
                "- route: [{destination: {host: reviews, subset: v1}}]\n  retries: {attempts: 0}\n"
            ),
            traffic_policy="connectionPool: {tcp: {connectTimeout: 100ms}}",
            endpoints={"v1": silent},  # type: ignore[dict-item]
        )
        result = Caller(client_kind, mesh).one()
    assert (result.status, result.flags) == (503, ["UF"])
    assert result.body == _RESET + "reset reason: connection timeout"


async def _close_unanswered(peer: Peer) -> None:
    """Reads one request, then closes the connection (FIN) without answering."""
    await peer.request()


@pytest.mark.parametrize("retry_on", ["connect-failure", "reset"])
def test_connection_closed_before_the_answer_is_503_uc(
    make_mesh: MeshFactory, client_kind: str, retry_on: str
) -> None:
    """An HTTP/1 connection closed before the response is Envoy's "503 UC" (connection
    termination), not UR, in the answer and the metrics; `reset` retries it,
    `connect-failure` does not."""
    with ThreadServer(_close_unanswered) as server:
        mesh = make_mesh(
            virtual_service(
                "- route: [{destination: {host: reviews, subset: v1}}]\n"
                f"  retries: {{attempts: 1, retryOn: {retry_on}}}\n"
            ),
            endpoints={"v1": server},  # type: ignore[dict-item]
        )
        result = Caller(client_kind, mesh).one()
        tries = len(server.heads)
    retried = retry_on == "reset"
    assert (result.status, result.flags) == (503, ["UC", "URX"] if retried else ["UC"])
    assert result.body.endswith("reset reason: connection termination")
    assert tries == (2 if retried else 1)
    labels = [
        sample.labels["response_flags"]
        for metric in mesh.registry.collect()
        for sample in metric.samples
        if sample.name == "istio_requests_total"
    ]
    assert labels == ["UC,URX" if retried else "UC"]


def test_split_local_origin_resets_after_a_connect_never_eject(
    make_mesh: MeshFactory, client_kind: str
) -> None:
    """splitExternalLocalOriginErrors with consecutiveLocalOriginFailures 2: an endpoint that
    accepts each connection and closes it unanswered is never ejected, as each connection
    made resets the count first (Envoy); every call reaches it and gets 503 UC, not UH."""
    with ThreadServer(_close_unanswered) as server:
        mesh = make_mesh(
            virtual_service(
                "- route: [{destination: {host: reviews, subset: v1}}]\n  retries: {attempts: 0}\n"
            ),
            traffic_policy=(
                "outlierDetection: {splitExternalLocalOriginErrors: true,"
                " consecutiveLocalOriginFailures: 2, baseEjectionTime: 30s}\n"
            ),
            endpoints={"v1": server},  # type: ignore[dict-item]
        )
        results = Caller(client_kind, mesh).many(4)
        assert len(server.heads) == 4
    assert [(r.status, r.flags) for r in results] == [(503, ["UC"])] * 4


def test_connect_failure_is_retried_on_another_endpoint(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """With one endpoint refusing, Istio's default policy retries elsewhere: every request succeeds."""
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews}}]\n"),
        endpoints={"v1": Dead(), "v2": upstreams["v2"]},  # type: ignore[dict-item]
    )
    results = Caller(client_kind, mesh).many(20, concurrency=1)
    assert all(r.status == 200 and r.upstream == "v2" for r in results)


def test_passthrough_errors_are_the_libraries_own(make_mesh: MeshFactory) -> None:
    """Hosts outside the mesh fail as stock httpx and requests fail: their own exceptions."""
    mesh = make_mesh()
    url = f"http://127.0.0.1:{closed_port()}/"
    with meshlib.Client(mesh=mesh) as client:
        with pytest.raises(httpx.ConnectError):
            client.get(url)
        with pytest.raises(httpx.ConnectError):
            client.get("http://no-such-host.invalid/")
        with pytest.raises(httpx.UnsupportedProtocol):
            client.get("ftp://example.com/")
    with meshlib.Session(mesh=mesh) as session:
        with pytest.raises(requests.ConnectionError):
            session.get(url, timeout=5)
        with pytest.raises(requests.exceptions.InvalidSchema):
            session.get("ftp://example.com/")


def test_non_replayable_body_is_not_retried(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """A streaming request body cannot be sent twice: no retry, the 503 comes back as is."""
    for server in upstreams.values():
        server.behaviour.fail_every = 1.0
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n  retries: {attempts: 3, retryOn: 5xx}\n"
        )
    )

    def body() -> object:
        yield b"part-1,"
        yield b"part-2"

    with meshlib.Client(mesh=mesh) as client:
        response = client.post(URL + "/upload", content=body())
    assert response.status_code == 503
    assert sum(s.behaviour.received for s in upstreams.values()) == 1
    sent = next(r for s in upstreams.values() for r in s.behaviour.requests)
    assert sent["body"] == "part-1,part-2"


def test_replayable_body_is_sent_again_on_retry(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """A bytes body is replayed whole on each retry."""
    upstreams["v1"].behaviour.fail_every = 1.0
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews, subset: v1}}]\n  retries: {attempts: 2, retryOn: 5xx}\n"
        )
    )
    with meshlib.Client(mesh=mesh) as client:
        response = client.post(URL + "/upload", content=b"payload")
    assert response.status_code == 503
    assert [r["body"] for r in upstreams["v1"].behaviour.requests] == ["payload"] * 3


def test_non_replayable_body_is_retried_after_a_failed_connect(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """A failed connect sent nothing, so even a streaming body is retried (Istio's default
    retryOn has connect-failure): with one endpoint refusing connections, every upload
    reaches the live one whole."""
    import asyncio
    import socket
    from types import SimpleNamespace

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = SimpleNamespace(port=sock.getsockname()[1])  # nothing listens there
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews}}]\n"),
        endpoints={"v1": refused, "v2": upstreams["v2"]},  # type: ignore[dict-item]
    )

    def body() -> Iterator[bytes]:
        yield b"part-1,"
        yield b"part-2"

    async def abody() -> AsyncIterator[bytes]:
        yield b"part-1,"
        yield b"part-2"

    statuses = []
    for _ in range(6):  # the balancer picks the refusing endpoint first about half the time
        if client_kind == "httpx":
            with meshlib.Client(mesh=mesh) as client:
                statuses.append(client.post(URL + "/upload", content=body()).status_code)
        elif client_kind == "requests":
            with meshlib.Session(mesh=mesh) as session:
                statuses.append(session.post(URL + "/upload", data=body(), timeout=5).status_code)
        else:

            async def post() -> int:
                async with meshlib.AsyncClient(mesh=mesh) as client:
                    return (await client.post(URL + "/upload", content=abody())).status_code

            statuses.append(asyncio.run(post()))
    assert statuses == [200] * 6
    received = upstreams["v2"].behaviour.requests
    assert [r["body"] for r in received] == ["part-1,part-2"] * 6
    # some arrived as a retry: their first try went to the refusing endpoint
    assert "2" in {r["headers"]["x-envoy-attempt-count"] for r in received}
    failed = sum(
        sample.value
        for metric in mesh.registry.collect()
        for sample in metric.samples
        if sample.name == "istio_requests_total" and sample.labels["response_flags"] != "-"
    )
    assert failed == 0


def test_closing_the_client_under_a_call_is_the_apps_doing(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """`aclose()` while a call is in flight: the call raises the client's error, as stock httpx
    does — not retried (retryOn reset) and not held against the endpoint (ejected after one
    failure otherwise)."""
    import asyncio

    upstreams["v1"].behaviour.delay = 0.5
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews, subset: v1}}]\n"
            "  retries: {attempts: 3, retryOn: reset}\n"
        ),
        traffic_policy="outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 30s}\n",
    )

    async def main() -> int:
        client = meshlib.AsyncClient(mesh=mesh)
        call = asyncio.create_task(client.get(URL + "/"))
        while upstreams["v1"].behaviour.active == 0:  # poll: the call reached the upstream
            await asyncio.sleep(0.005)
        await client.aclose()
        with pytest.raises(httpx.TransportError):
            await call
        upstreams["v1"].behaviour.delay = 0.0
        async with meshlib.AsyncClient(mesh=mesh) as other:
            return (await other.get(URL + "/")).status_code

    assert asyncio.run(main()) == 200  # v1 was not ejected
    assert upstreams["v1"].behaviour.received == 2  # the closed call was sent once


def test_http2_only_asks_for_httpx_transport() -> None:
    """`AsyncClient(http2=True, http1=False)` (HTTP/2 with prior knowledge) keeps httpx's own
    transport, which speaks it; by default the transport is meshlib's HTTP/1.1 one."""
    from meshlib.clients._http1 import Http1Transport

    default = meshlib.AsyncClient()
    h2_only = meshlib.AsyncClient(http2=True, http1=False)
    assert isinstance(default._transport._inner, Http1Transport)  # type: ignore[attr-defined]
    inner = h2_only._transport._inner  # type: ignore[attr-defined]
    assert isinstance(inner, httpx.AsyncHTTPTransport)
    assert (inner._pool._http1, inner._pool._http2) == (False, True)


def test_a_transport_shared_by_two_clients_still_retries_after_one_closes(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """One MeshTransport given to two stock httpx clients: after the first closes, the
    second's calls still retry a refused connection on the live endpoint (only calls in
    flight during a close are the closing app's doing)."""
    import socket
    from types import SimpleNamespace

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = SimpleNamespace(port=sock.getsockname()[1])
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews}}]\n"),
        endpoints={"v1": refused, "v2": upstreams["v2"]},  # type: ignore[dict-item]
    )
    transport = meshlib.MeshTransport(mesh=mesh)
    first, second = httpx.Client(transport=transport), httpx.Client(transport=transport)
    first.close()
    with second:
        statuses = [second.get(URL + "/").status_code for _ in range(6)]
    assert statuses == [200] * 6
