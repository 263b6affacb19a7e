"""meshlib.Session behaves as a requests.Session would against the mesh host: responses
answer the caller's request (redirects, auth and cookies follow the mesh URL), and the
caller's PreparedRequest is left as it was."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import urllib3
from requests.auth import HTTPDigestAuth

import meshlib
from meshlib.config import MeshConfig
from tests.rawserver import OK, ThreadServer, answering, wait_until_sync
from tests.upstream import AsgiServer, loopback_service, mesh_for

HOST = "reviews.default.svc.cluster.local"
URL = "http://reviews:9080"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/redirect?to=X answers 302 to X; /cookie sets one; /slow answers after a second;
    /digest asks for digest auth;
    /headers echoes the Host headers and x-custom; anything else echoes its path,
    Authorization and x-request-id."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    headers = dict(scope["headers"])
    query = scope["query_string"].decode()
    status, extra = 200, []
    if scope["path"] == "/redirect":
        status, extra = 302, [(b"location", query.removeprefix("to=").encode())]
    elif scope["path"] == "/cookie":
        extra = [(b"set-cookie", b"flavour=oat; Path=/")]
    elif scope["path"] == "/slow":
        await asyncio.sleep(1)
    elif scope["path"] == "/digest" and b"authorization" not in headers:
        status = 401
        challenge = b'Digest realm="mesh", nonce="abc", qop="auth", algorithm=MD5'
        extra = [(b"www-authenticate", challenge)]
    body = repr(
        {
            "path": scope["path"],
            "auth": headers.get(b"authorization", b"").decode()[:6],
            "rid": headers.get(b"x-request-id", b"").decode(),
        }
        if scope["path"] != "/headers"
        else {
            "hosts": [value.decode() for name, value in scope["headers"] if name == b"host"],
            "custom": headers.get(b"x-custom", b"").decode("latin-1"),
            "signed": headers.get(b"x-signed", b"").decode("latin-1"),
            "attempt": headers.get(b"x-attempt", b"").decode("latin-1"),
        }
    ).encode()
    await send({"type": "http.response.start", "status": status, "headers": extra})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def mesh() -> Iterator[meshlib.Mesh]:
    server = AsgiServer(app, "requests-client").start()
    route = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
"""
    mesh = mesh_for(
        MeshConfig(service="productpage"), loopback_service(HOST, server.port) + "---\n" + route
    )
    yield mesh
    mesh.close()
    server.stop()


def requests_counted(mesh: meshlib.Mesh, **labels: str) -> float:
    """istio_requests_total (reporter="source") summed over the series with these labels."""
    return sum(
        sample.value
        for metric in mesh.registry.collect()
        if metric.name == "istio_requests"
        for sample in metric.samples
        if sample.name == "istio_requests_total"
        and sample.labels.get("reporter") == "source"
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def echo(response: requests.Response) -> dict[str, Any]:
    import ast

    result: dict[str, Any] = ast.literal_eval(response.text)
    return result


def test_response_answers_the_callers_url(mesh: meshlib.Mesh) -> None:
    """response.url and response.request are the caller's, not the endpoint's address."""
    with meshlib.Session(mesh=mesh) as session:
        response = session.get(URL + "/plain", timeout=5)
    assert response.url == URL + "/plain"
    assert response.request.url == URL + "/plain"


def test_relative_redirect_stays_in_the_mesh(mesh: meshlib.Mesh) -> None:
    """A relative Location is followed on the mesh host (routed and counted as reviews), and
    a same-host redirect keeps the Authorization header."""
    with meshlib.Session(mesh=mesh) as session:
        response = session.get(
            URL + "/redirect?to=/second", headers={"Authorization": "Bearer T"}, timeout=5
        )
    assert response.status_code == 200
    assert response.url == URL + "/second"
    assert echo(response) | {"rid": ""} == {"path": "/second", "auth": "Bearer", "rid": ""}
    assert requests_counted(mesh, destination_service=HOST, response_code="200") >= 1
    # the redirect did not leave the mesh
    assert requests_counted(mesh, destination_service_name="PassthroughCluster") == 0


def test_digest_auth_behind_a_rewrite(mesh: meshlib.Mesh) -> None:
    """Digest auth resends response.request: that is the caller's request, routed again as
    the caller sent it (through the /api/ rewrite), not the rewritten copy."""
    with meshlib.Session(mesh=mesh) as session:
        response = session.get(URL + "/api/digest", auth=HTTPDigestAuth("u", "p"), timeout=5)
    assert response.status_code == 200
    assert echo(response) | {"rid": ""} == {"path": "/digest", "auth": "Digest", "rid": ""}
    # both the challenge and the answer went through the mesh, none around it
    assert requests_counted(mesh, destination_service=HOST, response_code="401") == 1
    assert requests_counted(mesh, destination_service_name="PassthroughCluster") == 0


def test_cookies_are_scoped_to_the_mesh_host(mesh: meshlib.Mesh) -> None:
    """response.cookies and the session's jar hold the cookie for the host the caller used."""
    with meshlib.Session(mesh=mesh) as session:
        response = session.get(URL + "/cookie", timeout=5)
        assert [c.domain for c in response.cookies] == ["reviews.local"]
        assert [c.domain for c in session.cookies] == ["reviews.local"]


def test_a_prepared_request_sent_twice_gets_two_request_ids(mesh: meshlib.Mesh) -> None:
    """The caller's PreparedRequest is not changed: sending it again is a new request with
    its own x-request-id, as each request through a sidecar gets one."""
    with meshlib.Session(mesh=mesh) as session:
        prepared = session.prepare_request(requests.Request("GET", URL + "/plain"))
        before = dict(prepared.headers)
        responses = [session.send(prepared, timeout=5) for _ in range(2)]
    first, second = (echo(response)["rid"] for response in responses)
    assert dict(prepared.headers) == before
    assert first and second and first != second
    # the id each call went out with, where the app reads it (its request has none)
    assert [response.request_id for response in responses] == [first, second]  # type: ignore[attr-defined]


def test_the_callers_timeout_is_about_the_callers_request(mesh: meshlib.Mesh) -> None:
    """The caller's own read timeout raises as without the mesh, with `exc.request` the
    request the caller sent, not meshlib's copy addressed to the endpoint (resending that would
    skip the mesh)."""
    with meshlib.Session(mesh=mesh) as session:
        prepared = session.prepare_request(requests.Request("GET", URL + "/slow"))
        with pytest.raises(requests.ReadTimeout) as raised:
            session.send(prepared, timeout=0.2)
    assert raised.value.request is prepared
    assert "x-request-id" not in prepared.headers


def test_local_answers_look_like_requests_own(mesh: meshlib.Mesh) -> None:
    """A synthesized answer (here 503 UF: nothing listens on the endpoint) has what requests'
    own adapter gives: urllib3's response as `raw` (readable when streamed), the encoding
    its content type says; and a HEAD gets headers only, as from Envoy."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    policy = loopback_service("dead.default.svc.cluster.local", dead)
    dead_mesh = mesh_for(MeshConfig(service="productpage"), policy)
    try:
        with meshlib.Session(mesh=dead_mesh) as session:
            streamed = session.get("http://dead:9080/", stream=True, timeout=5)
            head = session.head("http://dead:9080/", timeout=5)
    finally:
        dead_mesh.close()
    assert streamed.status_code == 503 and streamed.response_flags[0] == "UF"  # type: ignore[attr-defined]
    assert streamed.raw.status == 503 and streamed.raw.headers["x-meshlib-response-flags"]
    assert streamed.raw.read(decode_content=True).startswith(b"upstream connect error")
    assert streamed.encoding == "ISO-8859-1"
    assert head.status_code == 503 and head.content == b""
    assert len(streamed.request_id) == 36  # type: ignore[attr-defined]  # one made, as Envoy's


def test_bytes_header_values_are_routed(mesh: meshlib.Mesh) -> None:
    """requests takes bytes header names and values (a bytes Host, say): routed as text."""
    with meshlib.Session(mesh=mesh) as session:
        response = session.get(URL + "/plain", headers={"Host": b"reviews:9080"}, timeout=5)
    assert response.status_code == 200
    assert echo(response)["path"] == "/plain"


def test_bytes_header_names_are_routed_and_sent_once(mesh: meshlib.Mesh) -> None:
    """Bytes header names too: the route's Host replaces the app's (one Host goes, not the
    app's bytes one beside it) and the others go on as text."""
    with meshlib.Session(mesh=mesh) as session:
        headers = {b"Host": b"reviews:9080", b"X-Custom": b"caf\xe9"}
        response = session.get(URL + "/headers", headers=headers, timeout=5)  # type: ignore[dict-item]
    assert response.status_code == 200
    seen = echo(response)
    assert seen["hosts"] == ["reviews:9080"]
    assert seen["custom"] == "caf\xe9"  # the same bytes on the wire


def test_headers_an_auth_handler_sets_after_prepare_go_on(mesh: meshlib.Mesh) -> None:
    """An auth handler runs after requests has checked the headers: a bytes name or an int
    value it sets goes on as http.client would send it (in both builds)."""

    class Signing(requests.auth.AuthBase):
        def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
            request.headers[b"X-Signed"] = b"sig"  # type: ignore[index]
            request.headers["X-Attempt"] = 3  # type: ignore[assignment]
            return request

    with meshlib.Session(mesh=mesh) as session:
        response = session.get(URL + "/headers", auth=Signing(), timeout=5)
    assert response.status_code == 200
    seen = echo(response)
    assert (seen["signed"], seen["attempt"], seen["hosts"]) == ("sig", "3", ["reviews:9080"])


def test_a_session_survives_pickling(mesh: meshlib.Mesh) -> None:
    """A meshlib.Session on the default Mesh pickles and works after, as a requests.Session
    does."""
    import pickle

    restored = pickle.loads(pickle.dumps(meshlib.Session()))
    assert isinstance(restored, meshlib.Session)
    adapter = restored.get_adapter("http://reviews:9080/")
    assert isinstance(adapter, meshlib.MeshAdapter)
    adapter._mesh = mesh  # as if it had been made for this Mesh
    assert restored.get(URL + "/plain", timeout=5).status_code == 200
    restored.close()


@contextlib.contextmanager
def editing_responses(mesh: meshlib.Mesh, edit: str) -> Iterator[meshlib.Mesh]:
    """A Mesh routing to the same endpoint as `mesh`, its route editing response headers."""
    policy = f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews}}}}]
    headers: {{response: {edit}}}
"""
    port = mesh.snapshot.endpoints(HOST, None, 9080)[0].port
    editing = mesh_for(
        MeshConfig(service="productpage"), loopback_service(HOST, port) + "---\n" + policy
    )
    try:
        yield editing
    finally:
        editing.close()


def test_a_cookie_the_route_removes_is_not_stored(mesh: meshlib.Mesh) -> None:
    """A VirtualService removing Set-Cookie from responses: the app behind a sidecar never
    sees the cookie, so neither the response's nor the session's jar keeps it."""
    with (
        editing_responses(mesh, "{remove: [set-cookie]}") as stripping,
        meshlib.Session(mesh=stripping) as session,
    ):
        response = session.get(URL + "/cookie", timeout=5)
        assert "set-cookie" not in response.headers
        assert list(response.cookies) == [] and list(session.cookies) == []


def test_a_cookie_the_route_adds_is_stored_beside_the_upstreams(mesh: meshlib.Mesh) -> None:
    """A VirtualService adding a Set-Cookie: the upstream's cookie and the added one are both
    stored, as the app behind a sidecar gets both."""
    with (
        editing_responses(mesh, '{add: {set-cookie: "topping=jam; Path=/"}}') as adding,
        meshlib.Session(mesh=adding) as session,
    ):
        response = session.get(URL + "/cookie", timeout=5)
        assert sorted(c.name for c in response.cookies) == ["flavour", "topping"]
        assert sorted(c.name for c in session.cookies) == ["flavour", "topping"]


@pytest.mark.parametrize(
    "timeout",
    [
        pytest.param(urllib3.Timeout(total=5), id="total"),
        pytest.param(urllib3.Timeout(connect=2, total=5), id="connect-and-total"),
        pytest.param(urllib3.Timeout(connect=2, read=3, total=5), id="all-three"),
        pytest.param(urllib3.Timeout(), id="socket-default"),
    ],
)
def test_a_urllib3_timeout_is_taken_as_requests_takes_it(
    mesh: meshlib.Mesh, timeout: urllib3.Timeout
) -> None:
    """requests takes urllib3's `Timeout` as `timeout`, `total` included: so does the mesh
    (it once failed on a `total`, whose read timeout urllib3 computes only once connected)."""
    with meshlib.Session(mesh=mesh) as session:
        assert session.get(URL + "/x", timeout=timeout).status_code == 200


@pytest.mark.parametrize("timeout", [[1, 2], (1, 2, 3), "5", True, 0, (1, -1)], ids=repr)
def test_a_timeout_requests_refuses_is_refused(mesh: meshlib.Mesh, timeout: Any) -> None:
    """What requests' own adapter refuses as a timeout (a list, a triple, text, a bool, zero or
    less) the mesh refuses too, with the same ValueError, before anything is sent or counted."""
    with requests.Session() as stock, pytest.raises(ValueError) as stock_error:
        stock.get("http://127.0.0.1:9/", timeout=timeout)
    before = requests_counted(mesh)
    with meshlib.Session(mesh=mesh) as session, pytest.raises(ValueError) as error:
        session.get(URL + "/x", timeout=timeout)
    assert str(error.value) == str(stock_error.value)
    assert requests_counted(mesh) == before


def test_mirrored_copies_keep_their_connection() -> None:
    """Each mirrored copy's answer is read and dropped, so its connection is used again: six
    calls one after another send their copies over one connection (two at worst, should a
    copy start before the last one's answer is read), not a new connection each."""
    route = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    mirror: {host: shadow}
"""
    with ThreadServer(answering(OK)) as api, ThreadServer(answering(OK)) as shadow:
        policy = (
            loopback_service(HOST, api.port)
            + "---\n"
            + loopback_service("shadow.default.svc.cluster.local", shadow.port)
            + "---\n"
            + route
        )
        mesh = mesh_for(MeshConfig(service="productpage"), policy)
        with meshlib.Session(mesh=mesh) as session:
            for sent in range(1, 7):
                assert session.get(URL + "/x", timeout=5).status_code == 200
                wait_until_sync(lambda n=sent: len(shadow.heads) == n, "the copy")
        mesh.close()
        assert (api.connections, len(shadow.heads)) == (1, 6)
        assert shadow.connections <= 2
