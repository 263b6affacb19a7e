"""Traffic management end to end: real uvicorn upstreams, all three meshed clients."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.e2e.conftest import Caller, MeshFactory, virtual_service
from tests.upstream import Upstream

SPLIT_90_10 = virtual_service(
    """
    - route:
      - {destination: {host: reviews, subset: v1}, weight: 90}
      - {destination: {host: reviews, subset: v2}, weight: 10}
    """
)


def test_weighted_split(make_mesh: MeshFactory, client_kind: str) -> None:
    """A 90/10 split over 1,000 requests lands within ±3 points (binomial sd is 0.95)."""
    results = Caller(client_kind, make_mesh(SPLIT_90_10)).many(1000)
    counts = Counter(r.upstream for r in results)
    assert all(r.status == 200 for r in results)
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v2"] / 10 - 10) <= 3, counts


MATCHING = virtual_service(
    """
    - match: [{headers: {end-user: {exact: jason}}}]
      route: [{destination: {host: reviews, subset: v2}}]
    - match: [{uri: {prefix: /api/}, method: {exact: POST}}]
      route: [{destination: {host: reviews, subset: v3}}]
    - match: [{queryParams: {canary: {exact: "1"}}}]
      route: [{destination: {host: reviews, subset: v3}}]
    - route: [{destination: {host: reviews, subset: v1}}]
    """
)


@pytest.mark.parametrize(
    ("path", "kwargs", "expected"),
    [
        pytest.param("/", {"headers": {"end-user": "jason"}}, "v2", id="header"),
        pytest.param("/", {"headers": {"end-user": "alice"}}, "v1", id="other-header"),
        pytest.param("/api/x", {"method": "POST", "content": b"{}"}, "v3", id="uri-and-method"),
        pytest.param("/api/x", {"method": "GET"}, "v1", id="uri-wrong-method"),
        pytest.param("/?canary=1", {}, "v3", id="query"),
        pytest.param("/?canary=2", {}, "v1", id="query-other-value"),
    ],
)
def test_matches(
    make_mesh: MeshFactory, client_kind: str, path: str, kwargs: dict[str, object], expected: str
) -> None:
    """Header, uri, method and query matches pick the routes they describe."""
    result = Caller(client_kind, make_mesh(MATCHING)).one(path, **kwargs)
    assert result.status == 200
    assert result.upstream == expected


def test_consistent_hash_is_sticky(make_mesh: MeshFactory, client_kind: str) -> None:
    """With consistentHash on a header, each user always reaches the same endpoint."""
    mesh = make_mesh(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: sticky}\n"
        "spec:\n  host: reviews\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n"
    )
    caller = Caller(client_kind, mesh)
    seen: dict[str, set[str | None]] = {}
    # 24 users: all on one of the 3 endpoints by chance is 3 * (1/3)^24, about 1e-11 (with
    # 6 users it was 0.4%, and the ring depends on the ports the OS hands out).
    for user in (f"user-{n}" for n in range(24)):
        seen[user] = {r.upstream for r in caller.many(5, headers={"x-user": user})}
    assert all(len(endpoints) == 1 for endpoints in seen.values()), seen
    assert len({next(iter(s)) for s in seen.values()}) > 1  # users spread over endpoints


RETRY_5XX = virtual_service(
    """
    - route: [{destination: {host: reviews}}]
      retries: {attempts: 3, retryOn: 5xx}
    """
)


def test_retries_hide_a_failing_endpoint(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """Every endpoint fails 30% of requests; 5 retries on 5xx give >= 99.5% success over 2,000.

    Without retries 30% would fail; with them a request fails only if six tries in a row
    do (0.3^6 = 0.07%).
    """
    for server in upstreams.values():
        server.behaviour.fail_every = 0.3
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n  retries: {attempts: 5, retryOn: 5xx}\n"
        )
    )
    results = Caller(client_kind, mesh).many(2000, concurrency=32)
    ok = sum(r.status == 200 for r in results)
    assert ok / len(results) >= 0.995, Counter(r.status for r in results)
    received = sum(s.behaviour.received for s in upstreams.values())
    assert received > 2400  # about 2000 / 0.7 tries: the retries really happened


def test_retry_budget_caps_retries(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """When everything fails at once, a retry budget lets only a few retries through (URX)."""
    for server in upstreams.values():
        server.behaviour.fail_every = 1.0
        server.behaviour.delay = 0.2  # all 40 fail together, so their retries compete
    mesh = make_mesh(
        RETRY_5XX, traffic_policy="retryBudget: {percent: {value: 10}, minRetryConcurrency: 1}\n"
    )
    results = Caller(client_kind, mesh).many(40, concurrency=40)
    assert all(r.status == 503 and r.flags == ["URX"] for r in results)
    received = sum(s.behaviour.received for s in upstreams.values())
    assert received < 60, received  # without the budget: 40 x 4 = 160 tries


def test_retries_without_budget_use_every_attempt(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """The same load without a budget makes all 1 + 3 tries per request (the budget test's baseline)."""
    for server in upstreams.values():
        server.behaviour.fail_every = 1.0
        server.behaviour.delay = 0.2
    results = Caller(client_kind, make_mesh(RETRY_5XX)).many(40, concurrency=40)
    assert all(r.status == 503 for r in results)
    assert sum(s.behaviour.received for s in upstreams.values()) == 160


def test_exhausted_retries_return_the_last_response(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """With every try failing, the client gets the upstream's last 503 after 1 + 3 tries, flag URX."""
    for server in upstreams.values():
        server.behaviour.fail_every = 1.0
    result = Caller(client_kind, make_mesh(RETRY_5XX)).one()
    assert result.status == 503
    assert result.upstream in ("v1", "v2", "v3")
    assert sum(s.behaviour.received for s in upstreams.values()) == 4
    assert result.flags == ["URX"]


def test_route_timeout(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """A route timeout of 200ms against a 2s upstream answers 504 UT in well under 2s."""
    import time

    for server in upstreams.values():
        server.behaviour.delay = 2.0
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n  timeout: 200ms\n  retries: {attempts: 0}\n"
        )
    )
    start = time.monotonic()
    result = Caller(client_kind, mesh).one()
    elapsed = time.monotonic() - start
    assert result.status == 504
    assert result.body == "upstream request timeout"
    assert "UT" in result.flags
    assert elapsed < 1.5


def test_per_try_timeout_retries_elsewhere(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """A slow endpoint hits the per-try timeout and the retry goes to a fast one."""
    upstreams["v1"].behaviour.delay = 2.0
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n  retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}\n"
        )
    )
    results = Caller(client_kind, mesh).many(6)
    assert all(r.status == 200 and r.upstream in ("v2", "v3") for r in results), [
        (r.status, r.upstream) for r in results
    ]


def test_overflow_answers_503_uo(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """Past http2MaxRequests concurrent requests, the rest get 503 UO at once."""
    for server in upstreams.values():
        server.behaviour.delay = 0.5
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews}}]\n"),
        traffic_policy="connectionPool: {http: {http2MaxRequests: 2}}\n",
    )
    results = Caller(client_kind, mesh).many(10, concurrency=10)
    statuses = Counter(r.status for r in results)
    assert statuses[200] == 2, statuses
    assert statuses[503] == 8
    overflowed = [r for r in results if r.status == 503]
    assert all(
        r.flags == ["UO"] and r.headers.get("x-envoy-overloaded") == "true" for r in overflowed
    )
    overflows = mesh.registry.get_sample_value(
        "meshlib_upstream_overflow_total",
        {"cluster": "outbound|9080||reviews.default.svc.cluster.local"},
    )
    assert overflows == 8  # the operational metric counts them too


def test_failing_endpoint_is_ejected_and_readmitted(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """An always-failing endpoint is ejected after 3 consecutive 5xx, stays out for its 2 s
    ejection time, and is readmitted after it: polled, the first request it gets again comes
    no sooner than 2 s after the calls that ejected it began, and not long after."""
    import time

    upstreams["v1"].behaviour.fail_every = 1.0
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews}}]\n  retries: {attempts: 0}\n"),
        traffic_policy=(
            "loadBalancer: {simple: ROUND_ROBIN}\n"
            "outlierDetection: {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 2s, maxEjectionPercent: 100}\n"
        ),
    )
    caller = Caller(client_kind, mesh)
    began = time.monotonic()  # the ejection comes after this
    caller.many(30, concurrency=1)
    assert upstreams["v1"].behaviour.received == 3  # ejected after its third failure
    later = caller.many(30, concurrency=1)
    assert all(r.status == 200 for r in later)
    assert upstreams["v1"].behaviour.received == 3
    upstreams["v1"].behaviour.fail_every = 0.0
    while upstreams["v1"].behaviour.received == 3:  # poll until it is readmitted
        assert time.monotonic() - began < 10, "v1 was never readmitted"
        assert caller.many(1, concurrency=1)[0].status == 200
        time.sleep(0.02)
    readmitted_after = time.monotonic() - began
    assert 2.0 <= readmitted_after < 5.0, readmitted_after


FAULTS = virtual_service(
    """
    - route: [{destination: {host: reviews}}]
      fault:
        abort: {httpStatus: 418, percentage: {value: 20}}
    """
)


def test_fault_abort_percentage(make_mesh: MeshFactory, client_kind: str) -> None:
    """A 20% abort over 1,000 requests lands within ±4 points (sd 1.3); aborts never reach upstream."""
    results = Caller(client_kind, make_mesh(FAULTS)).many(1000)
    aborted = [r for r in results if r.status == 418]
    assert abs(len(aborted) / 10 - 20) <= 4
    assert all(
        r.body == "fault filter abort" and r.flags == ["FI"] and r.upstream is None for r in aborted
    )


def test_header_edits_in_envoys_order(make_mesh: MeshFactory, client_kind: str) -> None:
    """A route `add` comes after a destination `set` of the same header (one Envoy parser
    overwrites, then appends); empty values are skipped, leaving the app's header alone."""
    mesh = make_mesh(
        virtual_service(
            """
            - headers:
                request: {add: {x-a: route-add, x-c: ""}, set: {x-b: ""}}
                response: {add: {x-r: route-add}}
              route:
              - destination: {host: reviews}
                headers:
                  request: {set: {x-a: dest-set}}
                  response: {set: {x-r: dest-set}}
            """
        )
    )
    result = Caller(client_kind, mesh).one("/", headers={"x-b": "app"})
    assert result.headers["x-r"] == "dest-set, route-add"  # joined, as each client joins them
    seen = result.body["headers"]  # the upstream keeps the last of repeated header lines
    # requests sends a name once, its values joined (a dict of headers); httpx a line each
    assert seen["x-a"] == ("dest-set, route-add" if client_kind == "requests" else "route-add")
    assert seen["x-b"] == "app"
    assert "x-c" not in seen


@pytest.mark.parametrize("grpc", [True, False], ids=["grpc-request", "http-request"])
def test_grpc_fault_abort(make_mesh: MeshFactory, client_kind: str, grpc: bool) -> None:
    """A `grpcStatus` abort is Envoy's local reply, HTTP 200 either way: gRPC-shaped for a
    gRPC request (content-type application/grpc, grpc-status, grpc-message, no body), the
    plain "fault filter abort" body without grpc-status for any other request."""
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n"
            "  fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}\n"
        )
    )
    headers = {"content-type": "application/grpc+proto" if grpc else "application/json"}
    result = Caller(client_kind, mesh).one(
        "/pkg.Svc/Call", method="POST", content=b"\0\0\0\0\0", headers=headers
    )
    assert (result.status, result.flags, result.upstream) == (200, ["FI"], None)
    if grpc:
        assert result.headers["content-type"] == "application/grpc"
        assert result.headers["grpc-status"] == "14"
        assert result.headers["grpc-message"] == "fault filter abort"
        assert result.body == ""
    else:
        assert result.headers["content-type"] == "text/plain"
        assert "grpc-status" not in result.headers
        assert result.body == "fault filter abort"


def test_fault_delay(make_mesh: MeshFactory, client_kind: str) -> None:
    """A 100% 300ms delay delays every request and sets DI."""
    import time

    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n  fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n"
        )
    )
    start = time.monotonic()
    result = Caller(client_kind, mesh).one()
    assert time.monotonic() - start >= 0.3
    assert result.status == 200 and result.flags == ["DI"]


def test_a_fault_delay_past_the_callers_read_timeout_raises_it(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """A 3 s fault delay and the caller's 200 ms read timeout: the caller's own ReadTimeout
    after 200 ms, as behind a sidecar the app's read times out while the sidecar holds the
    request (Istio's bookinfo delay task); the request never reaches the upstream. It is
    counted as Envoy logs it: code 0, flags `DI,DC` (DI set as the delay started)."""
    import asyncio
    import time

    import httpx
    import requests

    import meshlib.clients.httpx as meshed_httpx
    import meshlib.clients.requests as meshed_requests
    from tests.e2e.conftest import URL

    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]\n  fault: {delay: {fixedDelay: 3s, percentage: {value: 100}}}\n"
        )
    )
    timeout = httpx.Timeout(5, read=0.2)
    started = time.monotonic()
    if client_kind == "requests":
        with meshed_requests.Session(mesh=mesh) as session, pytest.raises(requests.ReadTimeout):
            session.get(URL + "/", timeout=(5, 0.2))
    elif client_kind == "httpx":
        with (
            meshed_httpx.Client(mesh=mesh, timeout=timeout) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.get(URL + "/")
    else:

        async def call() -> None:
            async with meshed_httpx.AsyncClient(mesh=mesh, timeout=timeout) as client:
                await client.get(URL + "/")

        with pytest.raises(httpx.ReadTimeout):
            asyncio.run(call())
    assert 0.2 <= time.monotonic() - started < 1.0
    assert sum(u.behaviour.received for u in upstreams.values()) == 0
    counted = [
        (sample.labels["response_code"], sample.labels["response_flags"], sample.value)
        for metric in mesh.registry.collect()
        for sample in metric.samples
        if sample.name == "istio_requests_total"
    ]
    assert counted == [("0", "DI,DC", 1.0)]


def test_mirroring(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """Every request to v1 is copied to v3 with the original Host; v3's answer is discarded.
    The copies carry what the original carries: the served request's trace context and
    propagated headers, the request id, this workload's identity."""
    import time

    from meshlib.telemetry import peer

    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews, subset: v1}}]\n  mirror: {host: reviews, subset: v3}\n"
        )
    )
    trace = "0af7651916cd43dd8448eb211c80319c"
    served = {"traceparent": [f"00-{trace}-b7ad6b7169203331-01"], "x-request-id": ["rid-1"]}
    with mesh.propagator.activated(mesh.propagator.extract(served.get)):
        results = Caller(client_kind, mesh).many(20)
    assert all(r.upstream == "v1" for r in results)
    deadline = time.monotonic() + 5
    while len(upstreams["v3"].behaviour.requests) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)  # mirrors are fire-and-forget: poll until they are recorded
    assert upstreams["v3"].behaviour.received == 20
    copies = [r["headers"] for r in upstreams["v3"].behaviour.requests]
    assert {h["host"] for h in copies} == {"reviews:9080"}
    assert {h["x-request-id"] for h in copies} == {"rid-1"}
    assert {h["traceparent"].split("-")[1] for h in copies} == {trace}
    assert all(h.get(peer.HEADER) for h in copies)


def test_no_mirror_for_a_request_answered_before_an_upstream(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """A request answered locally before it has an upstream (503 UH: subset v1 has no
    endpoint) is not mirrored, as Envoy starts its shadows only then; one that reached an
    upstream is mirrored even when the upstream fails."""
    import time

    upstreams["v2"].behaviour.status = 500
    mesh = make_mesh(
        virtual_service(
            "- match: [{uri: {prefix: /none}}]\n"
            "  route: [{destination: {host: reviews, subset: v1}}]\n"
            "  mirror: {host: reviews, subset: v3}\n"
            "- route: [{destination: {host: reviews, subset: v2}}]\n"
            "  mirror: {host: reviews, subset: v3}\n"
        ),
        endpoints={"v2": upstreams["v2"], "v3": upstreams["v3"]},
    )
    caller = Caller(client_kind, mesh)
    assert [(r.status, r.flags) for r in caller.many(3, "/none")] == [(503, ["UH"])] * 3
    assert [r.status for r in caller.many(3, "/failed")] == [500] * 3
    copies = upstreams["v3"].behaviour
    deadline = time.monotonic() + 5
    while len(copies.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # mirrors are fire-and-forget: poll until they are recorded
    assert [r["path"] for r in copies.requests] == ["/failed"] * 3


def test_redirect(make_mesh: MeshFactory, client_kind: str) -> None:
    """A redirect route answers locally with the Location Envoy would send, and with the
    route's response header edits, as Envoy applies them to redirects too."""
    mesh = make_mesh(
        virtual_service(
            "- match: [{uri: {prefix: /old}}]\n  redirect: {uri: /new, redirectCode: 302}\n"
            "  headers: {response: {set: {x-route: y}}}\n"
        )
    )
    kwargs = {"allow_redirects": False} if client_kind == "requests" else {}
    result = Caller(client_kind, mesh).one("/old?x=1", **kwargs)
    assert result.status == 302
    assert result.headers["location"] == "http://reviews:9080/new?x=1"
    assert result.headers["x-route"] == "y"


def test_header_edits_and_rewrite(make_mesh: MeshFactory, client_kind: str) -> None:
    """Route header set/add/remove and a uri rewrite reach the upstream; response edits the app."""
    mesh = make_mesh(
        virtual_service(
            """
            - match: [{uri: {prefix: /v1/}}]
              rewrite: {uri: /}
              headers:
                request: {set: {x-env: prod}, add: {x-tag: a}, remove: [x-secret]}
                response: {set: {x-served-by: mesh}, remove: [x-upstream]}
              route: [{destination: {host: reviews, subset: v2}}]
            """
        )
    )
    result = Caller(client_kind, mesh).one("/v1/items", headers={"x-secret": "s", "x-tag": "z"})
    seen = result.body
    assert seen["path"] == "/items"
    assert seen["headers"]["x-env"] == "prod"
    assert "x-secret" not in seen["headers"]
    assert seen["headers"]["x-envoy-original-path"] == "/v1/items"
    assert result.headers["x-served-by"] == "mesh"
    assert "x-upstream" not in result.headers


def test_no_route_and_unknown_subset(make_mesh: MeshFactory, client_kind: str) -> None:
    """No matching route is 404 NR; a route to an undefined subset is 503 NC."""
    mesh = make_mesh(
        virtual_service(
            "- match: [{uri: {prefix: /a}}]\n  route: [{destination: {host: reviews}}]\n"
            "- match: [{uri: {prefix: /b}}]\n  route: [{destination: {host: reviews, subset: v9}}]\n"
        )
    )
    caller = Caller(client_kind, mesh)
    nr = caller.one("/zzz")
    assert (
        nr.status == 404 and nr.flags == ["NR"] and nr.headers["x-meshlib-response-flags"] == "NR"
    )
    nc = caller.one("/b")
    assert nc.status == 503 and nc.flags == ["NC"]


def test_passthrough_for_unknown_hosts(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """A host the mesh does not know is reached directly, untouched."""
    import httpx
    import requests

    mesh = make_mesh()
    url = f"http://{upstreams['v2'].address}/plain"
    if client_kind == "requests":
        from meshlib.clients.requests import Session

        with Session(mesh=mesh) as session:
            response: requests.Response | httpx.Response = session.get(url, timeout=5)
    else:
        from meshlib.clients.httpx import Client

        with Client(mesh=mesh) as client:
            response = client.get(url)
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "v2"


@pytest.mark.parametrize("per_connection", [1, None], ids=["max-1", "unlimited"])
def test_max_requests_per_connection(
    make_mesh: MeshFactory,
    upstreams: dict[str, Upstream],
    client_kind: str,
    per_connection: int | None,
) -> None:
    """`maxRequestsPerConnection: 1` makes each request use a connection of its own (the
    request says `Connection: close`); without it the client keeps its connections alive."""
    pool = (
        f"connectionPool: {{http: {{maxRequestsPerConnection: {per_connection}}}}}\n"
        if per_connection
        else ""
    )
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews, subset: v1}}]\n"),
        traffic_policy=pool,
    )
    results = Caller(client_kind, mesh).many(6, concurrency=1)
    assert all(r.status == 200 for r in results)
    ports = {r["client_port"] for r in upstreams["v1"].behaviour.requests}
    closing = {r["headers"].get("connection") for r in upstreams["v1"].behaviour.requests}
    if per_connection:
        assert len(ports) == 6 and closing == {"close"}
    else:
        assert len(ports) == 1 and "close" not in closing


def test_generated_hash_cookie_makes_a_client_sticky(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], client_kind: str
) -> None:
    """`consistentHash.httpCookie` with a ttl: the first response sets the cookie (Envoy's
    form), the client's cookie jar sends it back, and every later request of that client goes
    to the same endpoint; other clients get cookies of their own and spread out."""
    mesh = make_mesh(
        virtual_service("- route: [{destination: {host: reviews}}]\n"),
        traffic_policy=(
            "loadBalancer: {consistentHash: {httpCookie: {name: stick, path: /, ttl: 60s}}}\n"
        ),
    )
    first_hops = set()
    for _ in range(12):  # 12 clients, 3 endpoints: all on one by chance ~1e-5
        results = Caller(client_kind, mesh).many(8, concurrency=1)  # one after another
        assert all(r.status == 200 for r in results)
        set_cookie = results[0].headers.get("set-cookie", "")
        assert set_cookie.startswith('stick="') and "Max-Age=60; Path=/; HttpOnly" in set_cookie
        assert all("stick=" not in r.headers.get("set-cookie", "") for r in results[1:])
        assert len({r.upstream for r in results}) == 1, [r.upstream for r in results]
        first_hops.add(results[0].upstream)
    assert len(first_hops) > 1
