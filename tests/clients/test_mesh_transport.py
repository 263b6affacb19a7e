"""MeshTransport decisions that need no network: the inner transport is an httpx.MockTransport."""

from __future__ import annotations

import random
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot

SERVICE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1}
  - {address: 10.0.0.2}
  - {address: 10.0.0.3}
"""

Handler = Callable[[httpx.Request], httpx.Response]


def client(extra: str, handler: Handler, **kwargs: object) -> httpx.Client:
    result = load_text(SERVICE + "---\n" + textwrap.dedent(extra), "t.yaml")
    result.raise_for_errors()
    config = MeshConfig()
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config), rng=random.Random(1))
    return meshlib.Client(transport=httpx.MockTransport(handler), mesh=mesh, **kwargs)  # type: ignore[arg-type]


def vs(http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
        "spec:\n  hosts: [api.internal]\n  http:\n"
        + textwrap.indent(textwrap.dedent(http).strip(), "  ")
        + "\n"
    )


def _calls(mesh: Mesh, code: str, flags: str) -> float | None:
    labels = {"reporter": "source", "destination_service": "api.internal"}
    samples = [
        s
        for metric in mesh.registry.collect()
        for s in metric.samples
        if s.name == "istio_requests_total"
        and s.labels.items() >= {**labels, "response_code": code, "response_flags": flags}.items()
    ]
    return sum(s.value for s in samples) if samples else None


def test_callers_own_timeout_raises_its_exception() -> None:
    """When the caller's timeout (1 s) is shorter than the route's (10 s), expiry is its
    exception; the call is counted as Envoy logs a request the caller gave up on: 0, DC."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.extensions["timeout"]["read"] == 1.0
        raise httpx.ReadTimeout("slow", request=request)

    with (
        client(
            vs("- route: [{destination: {host: api.internal}}]\n  timeout: 10s"),
            handler,
            timeout=1.0,
        ) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.get("http://api.internal/")
    mesh = c._transport.mesh  # type: ignore[attr-defined]
    assert _calls(mesh, "0", "DC") == 1.0


def test_mesh_per_try_timeout_is_the_mesh_answer() -> None:
    """When the route's per-try timeout is the shorter one, expiry is retried, then 504 UT."""
    calls = Counter[str]()

    def handler(request: httpx.Request) -> httpx.Response:
        calls[request.url.host] += 1
        assert request.extensions["timeout"]["read"] == 0.1
        raise httpx.ReadTimeout("slow", request=request)

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}"
    )
    with client(policy, handler, timeout=5.0) as c:
        response = c.get("http://api.internal/")
    assert response.status_code == 504
    assert response.extensions["response_flags"] == ["UT", "URX"]
    assert sum(calls.values()) == 3 and len(calls) == 3  # three tries, three different hosts


def test_retry_goes_back_to_a_tried_host_when_it_is_the_only_one_left() -> None:
    """With the other endpoints ejected, a retry may reuse the host already tried (as Envoy does)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(503 if len(seen) == 1 else 200)

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 3, retryOn: 5xx}"
    ) + (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        "spec:\n  host: api.internal\n  trafficPolicy:\n"
        "    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 100}\n"
    )
    with client(policy, handler) as c:
        mesh = c._transport._mesh  # type: ignore[attr-defined]
        outlier = mesh.cluster(("api.internal", None, 80)).outlier
        for key in ("10.0.0.2:80", "10.0.0.3:80"):  # eject the other two endpoints
            for _ in range(2):
                outlier.record(key, status=503, total_endpoints=3)
        assert outlier.ejected() == {"10.0.0.2:80", "10.0.0.3:80"}
        response = c.get("http://api.internal/")
    assert response.status_code == 200
    assert seen == ["10.0.0.1", "10.0.0.1"]


def test_consistent_hash_retries_stay_on_the_hashed_host() -> None:
    """Under consistent hashing Istio drops the previous-hosts rule: retries reach the same host."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(503)

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 2, retryOn: 5xx}"
    ) + (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        "spec:\n  host: api.internal\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n"
    )
    with client(policy, handler) as c:
        c.get("http://api.internal/", headers={"x-user": "ann"})
    assert len(seen) == 3 and len(set(seen)) == 1


def test_envoy_ratelimited_is_retriable() -> None:
    """retryOn envoy-ratelimited retries responses carrying x-envoy-ratelimited."""
    answers = iter(
        [httpx.Response(429, headers={"x-envoy-ratelimited": "true"}), httpx.Response(200)]
    )
    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 1, retryOn: envoy-ratelimited}"
    )
    with client(policy, lambda request: next(answers)) as c:
        assert c.get("http://api.internal/").status_code == 200


@pytest.mark.parametrize("retry_on", ["5xx", "gateway-error", "retriable-status-codes,503"])
def test_a_ratelimited_answer_is_retried_only_on_envoy_ratelimited(retry_on: str) -> None:
    """A 503 carrying x-envoy-ratelimited is final unless retryOn has envoy-ratelimited, as
    Envoy's wouldRetryFromHeaders decides before any other condition."""
    calls: list[httpx.Request] = []

    def limited(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, headers={"x-envoy-ratelimited": "true"})

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n"
        f"  retries: {{attempts: 2, retryOn: '{retry_on}'}}"
    )
    with client(policy, limited) as c:
        response = c.get("http://api.internal/")
    assert (response.status_code, response.extensions["response_flags"]) == (503, [])
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("code", "retry_on", "sent", "flags", "reason"),
    [
        pytest.param(8, "reset", 2, "UR,URX", "remote reset", id="cancel"),
        pytest.param(8, "refused-stream", 1, "UR", "remote reset", id="cancel-not-refused"),
        pytest.param(7, "refused-stream", 2, "UR,URX", "remote refused stream reset", id="refused"),
    ],
)
def test_an_http2_stream_reset_is_ur(
    code: int, retry_on: str, sent: int, flags: str, reason: str
) -> None:
    """An HTTP/2 stream the upstream resets (RST_STREAM) is Envoy's 503 UR, not UC (a lost
    connection); REFUSED_STREAM is what `refused-stream` retries."""
    import httpcore

    events = pytest.importorskip("h2.events")
    calls: list[httpx.Request] = []

    def reset(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        event = events.StreamReset(stream_id=1, error_code=code, remote_reset=True)
        try:
            raise httpcore.RemoteProtocolError(event)
        except httpcore.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n"
        f"  retries: {{attempts: 1, retryOn: {retry_on}}}"
    )
    with client(policy, reset) as c:
        response = c.get("http://api.internal/")
    assert (response.status_code, response.headers["x-meshlib-response-flags"]) == (503, flags)
    assert response.text.endswith(f"reset reason: {reason}")
    assert len(calls) == sent


def test_mounts_are_meshed() -> None:
    """Transports given as `mounts=` go through the mesh too."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200)

    policy = vs("- route: [{destination: {host: api.internal}}]")
    result = load_text(SERVICE + "---\n" + policy)
    config = MeshConfig()
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
    with meshlib.Client(mesh=mesh, mounts={"http://": httpx.MockTransport(handler)}) as c:
        assert c.get("http://api.internal/").status_code == 200
    assert seen and seen[0].startswith("10.0.0.")


def test_connect_timeout_from_destination_rule() -> None:
    """tcp.connectTimeout becomes the attempt's connect timeout (Istio's default is 10 s)."""
    timeouts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["connect"])
        return httpx.Response(200)

    policy = vs("- route: [{destination: {host: api.internal}}]") + (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        "spec:\n  host: api.internal\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 250ms}}}\n"
    )
    with client(policy, handler, timeout=30.0) as c:
        c.get("http://api.internal/")
    with client(vs("- route: [{destination: {host: api.internal}}]"), handler, timeout=30.0) as c:
        c.get("http://api.internal/")
    assert timeouts == [0.25, 10.0]


@pytest.mark.parametrize("header", ["Set-Cookie", "set-cookie"])
def test_cookies_set_by_a_response_are_kept_and_sent(header: str) -> None:
    """meshlib's clients skip the cookie jar only for responses that set no cookie: cookies
    still arrive in `client.cookies` and go out with the next request, as with httpx."""
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("cookie"))
        if request.url.path == "/login":
            return httpx.Response(200, headers=[(header, "session=abc; Path=/")])
        return httpx.Response(200)

    with client(vs("- route: [{destination: {host: api.internal}}]"), handler) as c:
        c.get("http://api.internal/before")
        c.get("http://api.internal/login")
        c.get("http://api.internal/after")
        assert dict(c.cookies) == {"session": "abc"}
        c.cookies = {"other": "1"}  # replacing the store keeps meshlib's kind
        c.get("http://api.internal/replaced")
        assert type(c.cookies) is type(meshlib.Client().cookies)
    assert sent == [None, None, "session=abc", "other=1"]


def test_route_header_edits_apply_to_propagated_headers() -> None:
    """Headers meshlib propagates for the app count as the app's own: a route's `set` wins
    over them and `remove` drops them, each name sent once (httpx and requests alike)."""
    import requests

    from meshlib.clients.requests import MeshAdapter

    policy = vs(
        """
        - headers:
            request:
              set: {end-user: edge-override}
              remove: [x-user-group]
          route: [{destination: {host: api.internal}}]
        """
    )
    result = load_text(SERVICE + "---\n" + policy, "t.yaml")
    result.raise_for_errors()
    config = MeshConfig(propagate_headers=("end-user", "x-user-group"))
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
    seen: list[list[tuple[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            [(k, v) for k, v in request.headers.multi_items() if k in ("end-user", "x-user-group")]
        )
        return httpx.Response(200)

    class Inner(requests.adapters.HTTPAdapter):
        def send(
            self, request: requests.PreparedRequest, *args: object, **kwargs: object
        ) -> requests.Response:
            seen.append(
                [
                    (k.lower(), v)
                    for k, v in request.headers.items()
                    if k.lower() in ("end-user", "x-user-group")
                ]
            )
            response = requests.Response()
            response.status_code = 200
            return response

    inbound = mesh.propagator.extract({"end-user": ["jason"], "x-user-group": ["beta"]}.get)
    with mesh.propagator.activated(inbound):
        with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
            c.get("http://api.internal/")
        with requests.Session() as s:
            s.mount("http://", MeshAdapter(mesh=mesh, inner=Inner()))
            s.get("http://api.internal/")
    assert seen == [[("end-user", "edge-override")]] * 2


def _budgets(
    http: str, *, inbound: dict[str, list[str]] | None = None, app: dict[str, str] | None = None
) -> list[str | None]:
    """x-envoy-expected-rq-timeout-ms as the upstream saw it, from httpx then requests."""
    import requests

    from meshlib.clients.requests import MeshAdapter

    result = load_text(SERVICE + "---\n" + vs(http), "t.yaml")
    result.raise_for_errors()
    config = MeshConfig()
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-envoy-expected-rq-timeout-ms"))
        return httpx.Response(200)

    class Inner(requests.adapters.HTTPAdapter):
        def send(
            self, request: requests.PreparedRequest, *args: object, **kwargs: object
        ) -> requests.Response:
            seen.append(request.headers.get("x-envoy-expected-rq-timeout-ms"))
            response = requests.Response()
            response.status_code = 200
            return response

    # The clients are made first: only the calls spend the served request's budget.
    with (
        meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c,
        requests.Session() as s,
    ):
        s.mount("http://", MeshAdapter(mesh=mesh, inner=Inner()))
        with mesh.propagator.activated(mesh.propagator.extract((inbound or {}).get)):
            c.get("http://api.internal/", headers=app)
            s.get("http://api.internal/", headers=app)
    return seen


def _ms(values: list[str | None]) -> list[int]:
    assert all(v is not None for v in values), values
    return [int(v) for v in values if v is not None]


def test_the_attempt_budget_is_sent_upstream() -> None:
    """As Envoy's router does, each attempt tells the upstream its time budget in
    x-envoy-expected-rq-timeout-ms: the route timeout, the per-try timeout when smaller, and
    never more than what the served request's caller left."""
    route = "- route: [{destination: {host: api.internal}}]\n  timeout: 0.5s"
    assert all(400 <= ms <= 500 for ms in _ms(_budgets(route)))
    per_try = route + "\n  retries: {attempts: 2, perTryTimeout: 0.2s}"
    assert all(150 <= ms <= 200 for ms in _ms(_budgets(per_try)))
    inbound = {"x-envoy-expected-rq-timeout-ms": ["100"]}
    assert all(50 <= ms <= 100 for ms in _ms(_budgets(route, inbound=inbound)))


def test_no_timeout_sends_no_budget_and_the_app_header_stays() -> None:
    route = "- route: [{destination: {host: api.internal}}]"
    assert _budgets(route) == [None, None]
    timed = route + "\n  timeout: 0.5s"
    assert _budgets(timed, app={"x-envoy-expected-rq-timeout-ms": "42"}) == ["42", "42"]


def test_calls_that_raise_are_counted_for_requests_too() -> None:
    """requests: the caller's own read timeout counts as 0 DC, a refused connection as 0 UF."""
    import requests

    from meshlib.clients.requests import MeshAdapter

    result = load_text(
        SERVICE
        + "---\n"
        + vs("- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 0}"),
        "t.yaml",
    )
    result.raise_for_errors()
    config = MeshConfig()
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
    errors = iter(
        [requests.ReadTimeout("slow"), requests.ConnectionError("NewConnectionError: refused")]
    )

    class Inner(requests.adapters.HTTPAdapter):
        def send(
            self, request: requests.PreparedRequest, *args: object, **kwargs: object
        ) -> requests.Response:
            raise next(errors)

    with requests.Session() as s:
        s.mount("http://", MeshAdapter(mesh=mesh, inner=Inner()))
        with pytest.raises(requests.ReadTimeout):
            s.get("http://api.internal/", timeout=1.0)
        response = s.get("http://api.internal/", timeout=1.0)
    assert response.status_code == 503  # a refused connection is the mesh's answer, 503 UF
    assert _calls(mesh, "0", "DC") == 1.0
    assert _calls(mesh, "503", "UF") == 1.0


def test_a_cookie_jar_given_to_the_client_is_the_one_used() -> None:
    """As with httpx, `Client(cookies=jar)` keeps using the app's jar (e.g. to save it)."""
    from http.cookiejar import CookieJar

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[("set-cookie", "session=abc; Path=/")])

    jar = CookieJar()
    with client(vs("- route: [{destination: {host: api.internal}}]"), handler, cookies=jar) as c:
        assert c.cookies.jar is jar
        c.get("http://api.internal/login")
    assert [cookie.name for cookie in jar] == ["session"]


@pytest.mark.parametrize("edits", [False, True], ids=["no-edits", "route-edits"])
def test_a_non_ascii_propagated_value_is_sent_as_received(edits: bool) -> None:
    """`end-user: jürgen` arrives as Latin-1 bytes; it goes on as the same bytes, with or
    without route header edits, and never fails the call."""
    http = "- route: [{destination: {host: api.internal}}]"
    if edits:
        http += "\n  headers: {request: {set: {x-env: prod}}, response: {add: {x-served-by: mesh}}}"
    result = load_text(SERVICE + "---\n" + vs(http), "t.yaml")
    result.raise_for_errors()
    config = MeshConfig(propagate_headers=("end-user",))
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.extend(v for k, v in request.headers.raw if k.lower() == b"end-user")
        return httpx.Response(200, headers=[(b"x-caf\xe9", b"\xe9t\xe9")])

    inbound = mesh.propagator.extract({"end-user": [b"j\xfcrgen".decode("latin-1")]}.get)
    with (
        mesh.propagator.activated(inbound),
        meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c,
    ):
        response = c.get("http://api.internal/")
    assert response.status_code == 200
    assert seen == [b"j\xfcrgen"]
    assert dict(response.headers.raw)[b"x-caf\xe9"] == b"\xe9t\xe9"


@pytest.mark.parametrize("make", [meshlib.Client, meshlib.AsyncClient])
def test_parsed_urls_follow_base_url_and_stay_bounded(make: Callable[..., httpx.Client]) -> None:
    """meshlib's clients parse each URL string once, but a changed `base_url` is honoured,
    a bad URL fails every time as in httpx, and the cache never grows past its bound."""
    from meshlib.clients import httpx as meshed

    c = make(base_url="http://a.example/v1/")
    first = c.build_request("GET", "items?x=1")
    assert str(first.url) == "http://a.example/v1/items?x=1"
    assert c.build_request("GET", "items?x=1").url == first.url
    c.base_url = "http://b.example/v2/"
    assert str(c.build_request("GET", "items?x=1").url) == "http://b.example/v2/items?x=1"
    assert str(c.build_request("GET", "http://c.example/").url) == "http://c.example/"
    for _ in range(2):
        with pytest.raises(httpx.InvalidURL):
            c.build_request("GET", "http://example.com:abc/")
    for n in range(meshed._PARSED_URLS * 2):
        assert c.build_request("GET", f"/n/{n}").url.path == f"/v2/n/{n}"
    assert c._parsed is not None and len(c._parsed[1]) <= meshed._PARSED_URLS
    assert c.build_request("GET", httpx.URL("x")).url == httpx.URL("http://b.example/v2/x")


def _redirecting(request: httpx.Request) -> httpx.Response:
    # Streams, as a network transport gives them (content= would be read up front).
    if request.url.path == "/old":
        return httpx.Response(301, headers={"location": "/new"}, stream=httpx.ByteStream(b"moved"))
    return httpx.Response(200, stream=httpx.ByteStream(b"hello"))


@pytest.mark.parametrize("make", [meshlib.Client, meshlib.AsyncClient])
def test_a_read_response_is_freed_without_the_cycle_collector(
    make: Callable[..., httpx.Client],
) -> None:
    """httpx binds each response's stream back to the response (a reference cycle); meshlib's
    clients undo that once the body is read, so a response the app drops — and the responses
    in its redirect history — are freed at once, not at the next cyclic collection. Content,
    `elapsed`, history and closing behave as in httpx; a streamed response keeps its stream."""
    import asyncio
    import gc
    import weakref

    async def fetch(c: httpx.AsyncClient, stream: bool) -> httpx.Response:
        request = c.build_request("GET", "http://api.internal/old")
        return await c.send(request, stream=stream, follow_redirects=True)

    def get(stream: bool = False) -> httpx.Response:
        c = make(transport=httpx.MockTransport(_redirecting), mesh=Mesh(MeshConfig()))
        if isinstance(c, httpx.AsyncClient):
            return asyncio.run(fetch(c, stream))
        return c.send(
            c.build_request("GET", "http://api.internal/old"), stream=stream, follow_redirects=True
        )

    gc.collect()
    gc.disable()
    try:
        response = get()
        assert response.content == b"hello" and response.text == "hello"
        assert response.is_closed and response.elapsed.total_seconds() >= 0
        assert [r.status_code for r in response.history] == [301]
        assert response.history[0].content == b"moved"
        refs = [weakref.ref(response), weakref.ref(response.history[0])]
        del response
        assert [ref() for ref in refs] == [None, None]  # freed by reference counting alone

        streamed = get(stream=True)
        assert not streamed.is_closed
        assert type(streamed.stream).__name__.startswith("Bound")  # httpx's own, untouched
    finally:
        gc.enable()


def test_hostile_upstream_numbers_never_fail_the_call() -> None:
    """'²' passes `str.isdigit()` but not `int()`: an upstream's `Content-Length: ²` (or an
    app's `Host: api.internal:²`) is read as no number, never a meshlib traceback."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"content-length", "\u00b2".encode("latin-1"))])

    with client(vs("- route: [{destination: {host: api.internal}}]"), handler) as c:
        assert c.get("http://api.internal/").status_code == 200
        response = c.get("http://api.internal/", headers=[(b"host", b"api.internal:\xb2")])
        assert response.status_code in (200, 404)


def _dr(traffic_policy: str) -> str:
    return (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        f"spec:\n  host: api.internal\n  trafficPolicy:\n    {traffic_policy}\n"
    )


def _mesh_of(policy: str) -> Mesh:
    result = load_text(SERVICE + "---\n" + policy, "t.yaml")
    result.raise_for_errors()
    config = MeshConfig()
    return Mesh(config, policy=Snapshot.build(result.resources, config), rng=random.Random(1))


CLUSTER = ("api.internal", None, 80)


def test_cancelled_calls_give_back_their_circuit_breaker_slots() -> None:
    """Calls cancelled while in flight (asyncio.wait_for, a caller that went away) give back
    their request slot and in-flight count: with http2MaxRequests 2, two cancelled calls once
    left every later call answered 503 UO for good."""
    import asyncio

    mesh = _mesh_of(
        vs("- route: [{destination: {host: api.internal}}]")
        + _dr("connectionPool: {http: {http2MaxRequests: 2}}")
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            await asyncio.sleep(3600)
        return httpx.Response(200)

    async def main() -> None:
        async with meshlib.AsyncClient(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
            for _ in range(3):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(
                            c.get("http://api.internal/slow"), c.get("http://api.internal/slow")
                        ),
                        0.05,
                    )
            assert (await c.get("http://api.internal/")).status_code == 200

    asyncio.run(main())
    cluster = mesh.cluster(CLUSTER)
    assert cluster.limits.active_requests == 0
    assert all(cluster.in_flight.get(f"10.0.0.{i}:80") == 0 for i in (1, 2, 3))


def test_a_transport_that_raises_gives_back_its_slots() -> None:
    """An inner transport raising something that is not a transport error (a bug, Ctrl-C):
    the app gets it, and the slots it held are free again."""
    mesh = _mesh_of(
        vs("- route: [{destination: {host: api.internal}}]")
        + _dr("connectionPool: {http: {http2MaxRequests: 1}}")
    )
    failures = [RuntimeError("bug"), RuntimeError("bug")]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop()
        return httpx.Response(200)

    with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="bug"):
                c.get("http://api.internal/")
        assert c.get("http://api.internal/").status_code == 200
    assert mesh.cluster(CLUSTER).limits.active_requests == 0


def test_the_callers_own_timeouts_do_not_eject_endpoints() -> None:
    """The app's own timeout says nothing about the endpoint (Envoy does not count a caller
    giving up against the upstream): three on each endpoint in turn, with
    consecutive5xxErrors 3, eject nothing (they once ejected all three: 503 UH after)."""
    slow = True

    def handler(request: httpx.Request) -> httpx.Response:
        if slow:
            raise httpx.ReadTimeout("the caller's timeout", request=request)
        return httpx.Response(200)

    mesh = _mesh_of(
        vs("- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 0}")
        + _dr(
            "loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 3,"
            " baseEjectionTime: 60s, maxEjectionPercent: 100}"
        )
    )
    with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler), timeout=1.0) as c:
        for _ in range(9):
            with pytest.raises(httpx.ReadTimeout):
                c.get("http://api.internal/")
        assert mesh.cluster(CLUSTER).outlier.ejected() == frozenset()
        slow = False
        assert c.get("http://api.internal/").status_code == 200


def never_connects(
    seen: list[dict[str, float | None]],
) -> Callable[[httpx.Request], httpx.Response]:
    """A mock upstream that records each try's timeouts and never accepts the connection."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        raise httpx.ConnectTimeout("no SYN-ACK", request=request)

    return handler


def test_connecting_is_bounded_by_the_route_deadline_not_the_tries_time() -> None:
    """Connecting comes before the try's time (Envoy starts the per-try timer once
    connected): with a 100 ms per-try timeout and a 300 ms route timeout the transport gets
    connect and pool timeouts of what is left of the route (not 100 ms, not the caller's
    5 s), and running out of it while connecting is the route's timeout (504 UT, no retry),
    not a connection failure (503 UF). (This test used to expect 100 ms: the per-try time.)"""
    seen: list[dict[str, float | None]] = []

    def connects_too_slowly(request: httpx.Request) -> httpx.Response:
        timeout = request.extensions["timeout"]
        seen.append(timeout)
        time.sleep(timeout["connect"])  # a connect that takes as long as it is allowed
        raise httpx.ConnectTimeout("no SYN-ACK", request=request)

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n"
        "  timeout: 300ms\n  retries: {attempts: 2, perTryTimeout: 100ms, retryOn: connect-failure}"
    )
    with client(policy, connects_too_slowly, timeout=5.0) as c:
        response = c.get("http://api.internal/")
    assert len(seen) == 1
    assert all(0.25 < seen[0][phase] <= 0.3 for phase in ("connect", "pool")), seen
    assert seen[0]["read"] == 0.1
    assert response.status_code == 504
    assert response.extensions["response_flags"] == ["UT"]


def test_waiting_for_the_clients_pool_is_not_the_tries_time() -> None:
    """Waiting for a connection of the client's own pool comes before the try's time: with
    a 100 ms perTryTimeout and no route timeout, the pool wait gets the caller's 5 s, and its
    expiry is the caller's httpx.PoolTimeout, not the mesh's 504."""
    seen: list[dict[str, float | None]] = []

    def pool_full(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        raise httpx.PoolTimeout("pool full", request=request)

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n"
        "  retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}"
    )
    with client(policy, pool_full, timeout=5.0) as c, pytest.raises(httpx.PoolTimeout):
        c.get("http://api.internal/")
    assert [(t["pool"], t["read"]) for t in seen] == [(5.0, 0.1)]


def test_a_request_the_transport_refuses_is_the_apps_error() -> None:
    """An unsupported scheme or a request httpx cannot send is raised as httpx raises it —
    not retried, not answered 503, not held against an endpoint."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url)
        raise httpx.UnsupportedProtocol("no ftp here", request=request)

    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 3, retryOn: reset}"
    )
    with client(policy, handler) as c, pytest.raises(httpx.UnsupportedProtocol):
        c.get("http://api.internal/")
    assert len(calls) == 1


class _RecordingAdapter:
    """A requests adapter stand-in: records what it is asked to send, answers 200."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send(self, request: Any, **kwargs: Any) -> Any:
        import requests

        self.sent.append((request.url, kwargs.get("timeout")))
        response = requests.Response()
        response.status_code, response._content, response.url = 200, b"ok", request.url
        response.request = request
        return response


def test_requests_routes_a_url_with_credentials_and_bounds_connecting() -> None:
    """requests keeps `user:password@` in the URL: the mesh still routes the host (it once
    passed it through), and connecting gets no more than what is left of the route's
    timeout (not the try's time, which starts once connected, as Envoy's per-try timer)."""
    import requests

    from meshlib.clients.requests import MeshAdapter

    mesh = _mesh_of(
        vs(
            "- route: [{destination: {host: api.internal}}]\n  timeout: 300ms\n"
            "  retries: {attempts: 1, perTryTimeout: 100ms}"
        )
    )
    inner = _RecordingAdapter()
    with requests.Session() as session:
        session.mount("http://", MeshAdapter(mesh=mesh, inner=inner))  # type: ignore[arg-type]
        response = session.get("http://user:secret@api.internal/x", timeout=5.0)
    assert response.status_code == 200
    ((url, timeout),) = inner.sent
    assert url.startswith("http://10.0.0.") and url.endswith(":80/x")  # routed to an endpoint
    connect, read = timeout
    assert 0.25 < connect <= 0.3 and read == 0.1


@pytest.mark.parametrize("make", [meshlib.Client, meshlib.AsyncClient])
def test_proxies_are_meshed_and_taken_from_the_environment_as_httpx_does(
    make: Callable[..., httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx sends through a proxy transport of its own (`proxy=`, or HTTP_PROXY & co. from
    the environment): meshlib's clients mesh it too — a `proxy=` once made every request skip
    the mesh — and honour the environment's proxies and NO_PROXY as stock httpx does."""
    from meshlib.clients import httpx as meshed

    def transports(c: httpx.Client) -> dict[str, object]:
        return {p.pattern: t for p, t in c._mounts.items()}

    explicit = make(proxy="http://127.0.0.1:3128")
    assert all(getattr(t, meshed._MESHED, False) for t in transports(explicit).values())
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    stock = httpx.Client() if make is meshlib.Client else httpx.AsyncClient()
    from_env = make()
    assert transports(from_env).keys() == transports(stock).keys() == {"http://", "all://localhost"}
    assert transports(from_env)["all://localhost"] is None  # NO_PROXY: the default transport
    assert getattr(transports(from_env)["http://"], meshed._MESHED, False)
    assert getattr(from_env._transport, meshed._MESHED, False)
    assert make(trust_env=False)._mounts == {}


@pytest.mark.filterwarnings("ignore:`cert=...` is deprecated:DeprecationWarning")
def test_async_client_certificates_use_httpx_transport() -> None:
    """meshlib's HTTP/1.1 transport takes no client certificate: with `cert=` the async client sends
    through httpx's own (a missing file fails as in httpx, instead of being ignored)."""
    with pytest.raises(FileNotFoundError):
        meshlib.AsyncClient(cert="/nonexistent/client.pem")
    with pytest.raises(FileNotFoundError):
        httpx.AsyncClient(cert="/nonexistent/client.pem")


SHADOW = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow}
spec:
  hosts: [shadow.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.9.0.1}]
"""


def test_a_mirror_to_a_one_port_service_uses_that_port() -> None:
    """A mirror without a port goes to the mirror service's only port, as a route destination
    does, even when the request went to another port (it was silently dropped)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    mesh = _mesh_of(
        SHADOW
        + "---\n"
        + vs("- route: [{destination: {host: api.internal}}]\n  mirror: {host: shadow.internal}")
    )
    with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
        assert c.get("http://api.internal/x").status_code == 200
    assert sorted(seen)[-1] == "http://10.9.0.1:8080/x"  # closing waited for the copy
    assert len(seen) == 2


def test_max_requests_per_connection_above_one_closes_every_nth_per_endpoint() -> None:
    """With N > 1 meshlib counts requests per endpoint (it cannot see the client's
    connections): every Nth request to an endpoint says `Connection: close`."""
    closing: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        closing.append((request.url.host, request.headers.get("connection")))
        return httpx.Response(200)

    mesh = _mesh_of(
        vs("- route: [{destination: {host: api.internal}}]")
        + _dr(
            "loadBalancer: {simple: ROUND_ROBIN}\n"
            "    connectionPool: {http: {maxRequestsPerConnection: 2}}"
        )
    )
    with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
        for _ in range(6):
            c.get("http://api.internal/")
    per_host: dict[str, list[str | None]] = {}
    for host, connection in closing:
        per_host.setdefault(host, []).append(connection)
    assert sorted(per_host) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert all(values == ["keep-alive", "close"] for values in per_host.values()), per_host


def test_use_source_ip_sends_each_instance_to_one_endpoint() -> None:
    """`consistentHash.useSourceIp`: a sidecar sees its app's connections come from the
    pod's IP, so all calls from one instance go to one endpoint; instances spread out."""
    policy = vs("- route: [{destination: {host: api.internal}}]") + _dr(
        "loadBalancer: {consistentHash: {useSourceIp: true}}"
    )
    result = load_text(SERVICE + "---\n" + policy, "t.yaml")
    result.raise_for_errors()
    chosen: dict[str, set[str]] = {}
    for n in range(24):
        config = MeshConfig(instance_ip=f"10.8.0.{n + 1}")
        mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
        hosts: set[str] = set()

        def handler(request: httpx.Request) -> httpx.Response:
            hosts.add(request.url.host)  # noqa: B023 (used within this iteration)
            return httpx.Response(200)

        with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
            for _ in range(10):
                c.get("http://api.internal/")
        chosen[config.instance_ip or ""] = hosts
    assert all(len(hosts) == 1 for hosts in chosen.values())  # sticky per instance
    assert len(set().union(*chosen.values())) > 1  # 24 instances on 3 endpoints: ~1e-11 to fail


def test_a_content_length_of_thousands_of_digits_is_no_number() -> None:
    """Python's `int` refuses strings of more than 4,300 digits: an upstream's absurd
    Content-Length is counted as no size, never a meshlib traceback."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"content-length", b"9" * 4400)])

    with client(vs("- route: [{destination: {host: api.internal}}]"), handler) as c:
        assert c.get("http://api.internal/").status_code == 200


def test_callers_own_connect_timeout_is_its_own_error_httpx() -> None:
    """httpx: the caller's connect timeout, when it is the shortest bound on connecting, is
    the caller's: the transport gets it, and its expiry raises httpx.ConnectTimeout, not
    retried (as without the mesh), though the route retries connect failures."""
    seen: list[dict[str, float | None]] = []
    handler = never_connects(seen)
    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n"
        "  retries: {attempts: 2, retryOn: connect-failure}"
    )
    timeout = httpx.Timeout(5.0, connect=0.2)
    with client(policy, handler, timeout=timeout) as c, pytest.raises(httpx.ConnectTimeout):
        c.get("http://api.internal/")
    assert [(t["connect"], t["read"]) for t in seen] == [(0.2, 5.0)]


def test_callers_own_connect_timeout_is_its_own_error_requests() -> None:
    """requests: `timeout=(connect, read)` keeps its meaning — connecting gets the caller's
    connect value (not one capped by the read value), and its expiry raises requests'
    ConnectTimeout unretried; the DestinationRule's connect timeout, when shorter, stays the
    mesh's (503 UF, retried on connect-failure)."""
    import requests

    from meshlib.clients.requests import MeshAdapter

    class Unreachable(_RecordingAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            self.sent.append((request.url, kwargs.get("timeout")))
            raise requests.ConnectTimeout("no SYN-ACK")

    route = "- route: [{destination: {host: api.internal}}]\n  retries: {attempts: 2, retryOn: connect-failure}"
    rule = (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        "spec:\n  host: api.internal\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 100ms}}}\n"
    )
    for policy, timeout, expect_raise, tries in (
        (vs(route), (3.0, 0.5), True, [(3.0, 0.5)]),
        (vs(route), (0.5, 3.0), True, [(0.5, 3.0)]),
        (vs(route) + rule, (3.0, 5.0), False, [(0.1, 5.0)] * 3),
    ):
        inner = Unreachable()
        with requests.Session() as session:
            session.mount("http://", MeshAdapter(mesh=_mesh_of(policy), inner=inner))  # type: ignore[arg-type]
            if expect_raise:
                with pytest.raises(requests.ConnectTimeout):
                    session.get("http://api.internal/", timeout=timeout)
            else:
                response = session.get("http://api.internal/", timeout=timeout)
                assert response.status_code == 503
                assert response.response_flags == ["UF", "URX"]  # type: ignore[attr-defined]
        assert [t for _, t in inner.sent] == tries


def test_a_local_answer_to_head_has_no_body() -> None:
    """A synthesized answer (here a fault abort) to a HEAD carries headers only, as Envoy's."""
    policy = vs(
        "- route: [{destination: {host: api.internal}}]\n"
        "  fault: {abort: {httpStatus: 503, percentage: {value: 100}}}"
    )
    with client(policy, lambda request: httpx.Response(200)) as c:
        head = c.head("http://api.internal/")
        get = c.get("http://api.internal/")
    assert head.status_code == get.status_code == 503
    assert head.content == b"" and get.content == b"fault filter abort"


def test_mirrored_copies_pending_are_bounded() -> None:
    """Copies to a mirror that never answers do not pile up: past MAX_MIRRORS_PENDING
    pending, new ones are dropped; once the pending ones end, copies are sent again."""
    import threading

    from meshlib.clients._common import MAX_MIRRORS_PENDING, MirrorTracker

    hold = threading.Event()
    tracker = MirrorTracker()
    try:
        sent = [tracker.submit(hold.wait, 10) for _ in range(MAX_MIRRORS_PENDING + 20)]
        assert sent == [True] * MAX_MIRRORS_PENDING + [False] * 20
    finally:
        hold.set()
    tracker.wait(10)
    assert tracker.submit(lambda: None)
    tracker.wait(10)


def test_a_mirrored_copy_never_waits_for_good() -> None:
    """With `timeout=None`, the caller's request may wait as long as it takes, but its
    mirrored copy gets 10 s in every phase: copies to a mirror that never answers cannot fill
    the slots for mirrored copies."""
    import threading

    copies: list[dict[str, float | None]] = []
    mirrored = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if "x-envoy-attempt-count" not in request.headers:  # the mirrored copy
            copies.append(request.extensions["timeout"])
            mirrored.set()
        return httpx.Response(200)

    policy = vs("- route: [{destination: {host: api.internal}}]\n  mirror: {host: api.internal}")
    with client(policy, handler, timeout=None) as c:
        c.get("http://api.internal/m")
        assert mirrored.wait(5)
    assert copies == [dict.fromkeys(("connect", "read", "write", "pool"), 10.0)]


WEB = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 8080, name: http-alt, protocol: HTTP}
  endpoints:
  - {address: 10.7.0.1, ports: {http: 8000, http-alt: 8001}}
"""


@pytest.mark.parametrize(
    ("url", "upstream"),
    [
        pytest.param("http://web.internal/x", "http://10.7.0.1:8000/x", id="no-port"),
        pytest.param("http://web.internal:80/x", "http://10.7.0.1:8000/x", id="port-80"),
        pytest.param("http://web.internal:8080/x", "http://10.7.0.1:8001/x", id="port-8080"),
    ],
)
def test_a_url_without_a_port_reaches_port_80_of_a_multi_port_service(
    url: str, upstream: str
) -> None:
    """httpx drops the default port from a URL; meshlib still routes it to service port 80
    (it answered 503 NC for a service with several ports)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    with meshlib.Client(mesh=_mesh_of(WEB), transport=httpx.MockTransport(handler)) as c:
        assert c.get(url).status_code == 200
    assert seen == [upstream]


HEADER_ORDER = [
    pytest.param("{add: {x: a}}", "{set: {x: b}}", ["b"], id="destination-set-replaces-route-add"),
    pytest.param("{add: {x: a}}", "{add: {x: b}}", ["in", "a", "b"], id="adds-in-order"),
    pytest.param("{set: {x: a}}", "{remove: [x]}", ["a"], id="removes-go-first"),
    pytest.param("{set: {x: a}, remove: [x]}", "{}", ["a"], id="same-route-set-and-remove"),
    pytest.param("{add: {x: a}, remove: [x]}", "{}", ["a"], id="same-route-add-and-remove"),
]


@pytest.mark.parametrize(("route_ops", "dest_ops", "sent"), HEADER_ORDER)
def test_header_operations_apply_in_envoys_order(
    route_ops: str, dest_ops: str, sent: list[str]
) -> None:
    """With one destination, pilot puts route then destination operations in one Envoy
    parser: every remove first, then route set, route add, destination set, destination add."""
    seen: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get_list("x"))
        return httpx.Response(200)

    route = (
        f"- headers: {{request: {route_ops}}}\n"
        f"  route: [{{destination: {{host: api.internal}}, headers: {{request: {dest_ops}}}}}]"
    )
    with client(vs(route), handler) as c:
        assert c.get("http://api.internal/", headers={"x": "in"}).status_code == 200
    assert seen == [sent]


def test_with_several_destinations_route_header_operations_come_last() -> None:
    """Each of several destinations is an Envoy weighted cluster, whose header parser runs
    before the route's: the route's `set` wins over the destination's, and its remove takes
    out what the destination added."""
    seen: list[tuple[list[str], list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers.get_list("x-tier"), request.headers.get_list("x-d")))
        return httpx.Response(200)

    dest = "headers: {request: {set: {x-tier: destination}, add: {x-d: '1'}}}"
    policy = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        "spec: {host: api.internal, subsets: [{name: a}, {name: b}]}\n---\n"
    ) + vs(
        f"""
        - headers: {{request: {{set: {{x-tier: route}}, remove: [x-d]}}}}
          route:
          - {{destination: {{host: api.internal, subset: a}}, weight: 50, {dest}}}
          - {{destination: {{host: api.internal, subset: b}}, weight: 50, {dest}}}
        """
    )
    with client(policy, handler) as c:
        for _ in range(4):
            assert c.get("http://api.internal/").status_code == 200
    assert seen == [(["route"], [])] * 4


@pytest.mark.parametrize(
    ("timeout", "mirrored"),
    [
        pytest.param(None, (10.0, 10.0), id="none"),
        pytest.param((2, None), (2, 10.0), id="no-read"),
        pytest.param((None, 3), (10.0, 3), id="no-connect"),
        pytest.param(4, (4, 4), id="both"),
    ],
)
def test_a_mirrored_copy_never_waits_for_good_requests(
    timeout: Any, mirrored: tuple[float, float]
) -> None:
    """requests: a mirrored copy takes the caller's connect and read timeouts, and 10 s for
    each the caller left unset — `(2, None)` once sent the copy with no read timeout, holding
    a mirroring thread for good when the mirror never answers."""
    import threading

    import requests

    from meshlib.clients.requests import MeshAdapter

    copies: list[Any] = []
    done = threading.Event()

    class Recording(_RecordingAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            if "x-envoy-attempt-count" not in request.headers:  # the mirrored copy
                copies.append(kwargs.get("timeout"))
                done.set()
            return super().send(request, **kwargs)

    policy = vs("- route: [{destination: {host: api.internal}}]\n  mirror: {host: api.internal}")
    with requests.Session() as session:
        session.mount("http://", MeshAdapter(mesh=_mesh_of(policy), inner=Recording()))  # type: ignore[arg-type]
        assert session.get("http://api.internal/m", timeout=timeout).status_code == 200
        assert done.wait(5)
    assert copies == [mirrored]
