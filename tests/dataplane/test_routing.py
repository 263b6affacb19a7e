"""RoutePlan decisions without I/O: weights, local answers, rewrites, headers, faults, mirrors."""

from __future__ import annotations

import random
import textwrap
from collections import Counter

import pytest

from meshlib.config import MeshConfig
from meshlib.dataplane.routing import RoutePlan, plan_route
from meshlib.policy.loader import load_text
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
"""


def snapshot_for(http: str) -> Snapshot:
    text = SERVICES + (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        "spec:\n  hosts: [reviews]\n  http:\n"
        + textwrap.indent(textwrap.dedent(http).strip("\n"), "  ")
    )
    result = load_text(text, "routing.yaml")
    assert result.errors == (), [str(e) for e in result.errors]
    return Snapshot.build(result.resources, MeshConfig())


def plan(snapshot: Snapshot, path: str = "/", seed: int = 1, **kwargs: object) -> RoutePlan:
    request = RequestAttributes(
        kwargs.pop("method", "GET"), kwargs.pop("authority", "reviews:9080"), path, **kwargs
    )  # type: ignore[arg-type]
    return plan_route(snapshot, request, random.Random(seed))


def test_weighted_split_over_ten_thousand_requests() -> None:
    """A 90/10 split over 10,000 decisions lands within ±1.5 points (binomial sd is 0.3)."""
    snapshot = snapshot_for(
        """
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 90}
          - {destination: {host: reviews, subset: v2}, weight: 10}
        """
    )
    rng = random.Random(42)
    counts = Counter(
        plan_route(snapshot, RequestAttributes("GET", "reviews"), rng).cluster[1]  # type: ignore[index]
        for _ in range(10_000)
    )
    assert abs(counts["v2"] / 100 - 10) <= 1.5, counts


def test_relative_weights() -> None:
    """Weights 1 and 3 split 25/75 (within ±1.5 points over 10,000)."""
    snapshot = snapshot_for(
        """
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 1}
          - {destination: {host: reviews, subset: v2}, weight: 3}
        """
    )
    rng = random.Random(3)
    v1 = sum(
        plan_route(snapshot, RequestAttributes("GET", "reviews"), rng).cluster[1] == "v1"
        for _ in range(10_000)
    )  # type: ignore[index]
    assert abs(v1 / 100 - 25) <= 1.5


def test_cluster_port_and_retry_defaults() -> None:
    """The plan names the cluster with the service port and carries Istio's default retries."""
    p = plan(snapshot_for("- route: [{destination: {host: reviews, subset: v2}}]"))
    assert p.cluster == ("reviews.default.svc.cluster.local", "v2", 9080)
    assert p.retries is not None and p.retries.attempts == 2 and p.retries.is_default
    assert p.timeout is None and p.reply is None


@pytest.mark.parametrize(
    ("redirect", "request_kwargs", "location", "status"),
    [
        pytest.param(
            "{uri: /new}", {}, "http://reviews:9080/new?a=1", 301, id="uri-keeps-port-and-query"
        ),
        pytest.param(
            "{uri: /new, redirectCode: 308}", {}, "http://reviews:9080/new?a=1", 308, id="code"
        ),
        pytest.param(
            "{authority: other.example, scheme: https}",
            {},
            "https://other.example/old?a=1",
            301,
            id="authority-scheme",
        ),
        pytest.param(
            "{port: 8443, scheme: https}", {}, "https://reviews:8443/old?a=1", 301, id="port"
        ),
        pytest.param(
            "{scheme: https, port: 443}",
            {},
            "https://reviews/old?a=1",
            301,
            id="default-port-dropped",
        ),
        pytest.param(
            "{uri: /x, derivePort: FROM_REQUEST_PORT}",
            {},
            "http://reviews:9080/x?a=1",
            301,
            id="derive",
        ),
        pytest.param(
            "{uri: /x, derivePort: FROM_PROTOCOL_DEFAULT}",
            {},
            "http://reviews:9080/x?a=1",
            301,
            id="protocol-default-keeps-the-request-port",
        ),
        pytest.param(
            "{scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}",
            {"authority": "reviews:80"},
            "https://reviews/old?a=1",
            301,
            id="protocol-default-scheme-change-drops-old-default-port",
        ),
        pytest.param(
            "{uri: '/new?b=2'}", {}, "http://reviews:9080/new?b=2", 301, id="uri-query-replaces"
        ),
        pytest.param("{uri: new}", {}, "http://reviews:9080/new?a=1", 301, id="relative-uri"),
        pytest.param(
            "{scheme: https}",
            {"authority": "reviews:80"},
            "https://reviews/old?a=1",
            301,
            id="scheme-change-drops-old-default-port",
        ),
        pytest.param(
            "{scheme: https}",
            {"authority": "reviews:443", "scheme": "https"},
            "https://reviews/old?a=1",
            301,
            id="same-scheme-default-port",
        ),
        pytest.param(
            "{uri: '', authority: other.example}",
            {},
            "http://other.example/old?a=1",
            301,
            id="empty-uri-is-unset",
        ),
    ],
)
def test_redirects(
    redirect: str, request_kwargs: dict[str, object], location: str, status: int
) -> None:
    """Redirects are answered locally with the Location Envoy builds."""
    p = plan(snapshot_for(f"- redirect: {redirect}"), "/old", query="a=1", **request_kwargs)
    assert p.reply is not None and p.reply.status == status
    assert p.reply.headers["location"] == location


def test_a_redirect_carries_the_routes_response_header_edits() -> None:
    """Envoy applies a route's `headers.response` to the redirect it answers, as it does to
    a direct response."""
    snapshot = snapshot_for(
        "- headers: {response: {set: {x-r: route}, remove: [x-gone]}}\n  redirect: {uri: /new}"
    )
    p = plan(snapshot, "/old")
    assert p.reply is not None and p.reply.status == 301
    assert p.response_headers.set == {"x-r": "route"}
    assert p.response_headers.remove == ["x-gone"]


def test_direct_response() -> None:
    """directResponse answers with its status and body."""
    p = plan(snapshot_for("- directResponse: {status: 418, body: {string: teapot}}"))
    assert p.reply is not None and (p.reply.status, p.reply.body) == (418, b"teapot")


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        pytest.param(
            "uri: {prefix: /api/v1}", "uri: /v2", "/api/v1/items", "/v2/items", id="prefix"
        ),
        pytest.param("uri: {exact: /a}", "uri: /b", "/a", "/b", id="exact"),
        pytest.param(
            "headers: {x: {exact: '1'}}", "uri: /base", "/items", "/baseitems", id="no-uri-match"
        ),
        pytest.param(
            "uri: {prefix: /api}, ignoreUriCase: true",
            "uri: /new",
            "/API/v1",
            "/new/v1",
            id="prefix-ignore-case",
        ),
        pytest.param(
            "uri: {prefix: /}",
            "uriRegexRewrite: {match: '^/svc/([^/]+)/(.*)$', rewrite: '/\\2/\\1'}",
            "/svc/a/b/c",
            "/b/c/a",
            id="regex",
        ),
        pytest.param(
            "uri: {prefix: /}",
            "uriRegexRewrite: {match: '^/v1/(.*)$', rewrite: '/old\\0'}",
            "/v1/x",
            "/old/v1/x",
            id="regex-whole-match",
        ),
        pytest.param(
            "uri: {prefix: /}",
            "uriRegexRewrite: {match: '^/v1/(.*)$', rewrite: '/\\10/\\\\'}",
            "/v1/x",
            "/x0/\\",
            id="regex-one-digit-groups-and-backslash",
        ),
        pytest.param(
            "uri: {prefix: /}",
            "uriRegexRewrite: {match: '/*$', rewrite: /end}",
            "/a/b/",
            "/a/b/end",  # re.sub would also replace the empty match after "/": /a/b/end/end
            id="regex-no-empty-match-where-the-last-ended",
        ),
    ],
)
def test_uri_rewrites(match: str, rewrite: str, path: str, expected: str) -> None:
    """rewrite.uri replaces what the uri match matched; uriRegexRewrite substitutes."""
    snapshot = snapshot_for(
        f"- match: [{{{match}}}]\n  rewrite: {{{rewrite}}}\n  route: [{{destination: {{host: reviews}}}}]"
    )
    p = plan(snapshot, path, headers={"x": "1"})
    assert p.path == expected
    assert p.original_path == path
    assert p.request_headers.set["x-envoy-original-path"] == path


@pytest.mark.parametrize(
    ("match", "rewrite", "path"),
    [
        pytest.param("uri: {prefix: /api/}", "uri: /v2/", "/v2/x", id="rewritten"),
        pytest.param("uri: {prefix: /api}", "uri: /api", "/api/x", id="unchanged"),
        pytest.param(
            "uri: {prefix: /}",
            "uriRegexRewrite: {match: '^/none$', rewrite: /x}",
            "/api/x",
            id="regex-unchanged",
        ),
    ],
)
def test_the_original_path_is_the_whole_path_whenever_a_rewrite_is_configured(
    match: str, rewrite: str, path: str
) -> None:
    """Envoy copies all of `:path`, query included, into `x-envoy-original-path` when the
    route has a prefix or regex rewrite, even one that leaves the path as it was."""
    snapshot = snapshot_for(
        f"- match: [{{{match}}}]\n  rewrite: {{{rewrite}}}\n  route: [{{destination: {{host: reviews}}}}]"
    )
    p = plan(snapshot, "/api/x", query="a=1")
    assert (p.path, p.query) == (path, "a=1")
    assert p.request_headers.set["x-envoy-original-path"] == "/api/x?a=1"


@pytest.mark.parametrize("match", ["uri: {prefix: /api}", "uri: {exact: /api/x}"])
def test_an_empty_rewrite_uri_keeps_the_path(match: str) -> None:
    """`rewrite.uri: ""` is unset, as in Istio: only the authority is rewritten."""
    snapshot = snapshot_for(
        f"- match: [{{{match}}}]\n  rewrite: {{uri: '', authority: reviews.internal}}\n"
        "  route: [{destination: {host: reviews}}]"
    )
    p = plan(snapshot, "/api/x")
    assert (p.path, p.original_path, p.authority) == ("/api/x", None, "reviews.internal")
    assert "x-envoy-original-path" not in p.request_headers.set


MULTI_PORT = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 8080, name: http-alt, protocol: HTTP}
  endpoints: [{address: 10.0.0.1}]
"""


@pytest.mark.parametrize(
    ("authority", "scheme", "port"),
    [
        pytest.param("web", "http", 80, id="http-default"),
        pytest.param("web", "https", 443, id="https-default"),
        pytest.param("web:80", "http", 80, id="explicit-80"),
        pytest.param("web:8080", "http", 8080, id="explicit-8080"),
    ],
)
def test_a_url_without_a_port_uses_the_schemes_default_port(
    authority: str, scheme: str, port: int
) -> None:
    """`http://web/` is port 80 and `https://web/` port 443, as an explicit port would be,
    so a service with several ports is reached (it was 503 NC)."""
    result = load_text(MULTI_PORT, "ports.yaml")
    snapshot = Snapshot.build(result.resources, MeshConfig())
    p = plan(snapshot, authority=authority, scheme=scheme)
    assert p.reply is None
    assert p.cluster == ("web.default.svc.cluster.local", None, port)


def test_authority_rewrite_and_header_edits() -> None:
    """rewrite.authority sets the Host; route ops come before destination ops, and every
    remove before any set or add (Envoy's order): a destination's remove of `x-r` takes out
    the upstream's `x-r`, not the route's."""
    snapshot = snapshot_for(
        """
        - rewrite: {authority: reviews.internal}
          headers:
            request: {set: {x-a: route}, add: {x-b: one}, remove: [x-c]}
            response: {set: {x-r: route}}
          route:
          - destination: {host: reviews}
            headers:
              request: {set: {x-a: destination}}
              response: {remove: [x-r]}
        """
    )
    p = plan(snapshot)
    assert p.authority == "reviews.internal"
    assert p.request_headers.set == {"x-a": "destination"}
    assert p.request_headers.add == [("x-b", "one")]
    assert p.request_headers.remove == ["x-c"]
    assert p.response_headers.set == {"x-r": "route"} and p.response_headers.remove == []


def test_one_parser_sets_every_header_before_it_adds_any() -> None:
    """One destination: pilot puts route and destination ops in one Envoy parser, which
    overwrites (every set) before it appends (every add), so a route `add` follows a
    destination `set` of the same header instead of being replaced by it."""
    snapshot = snapshot_for(
        """
        - headers: {request: {add: {x-a: route-add}}}
          route:
          - destination: {host: reviews}
            headers: {request: {set: {x-a: dest-set}}}
        """
    )
    p = plan(snapshot)
    assert p.request_headers.set == {"x-a": "dest-set"}
    assert p.request_headers.add == [("x-a", "route-add")]


def test_an_operation_with_an_empty_value_is_skipped() -> None:
    """Envoy skips a header whose value is empty (Istio never sets keep_empty_value): an
    empty `set` leaves the app's header alone, an empty `add` sends nothing, an empty
    `host` rewrites no authority."""
    snapshot = snapshot_for(
        """
        - headers:
            request: {set: {x-b: "", host: ""}, add: {x-c: ""}}
            response: {set: {x-r: ""}}
          route: [{destination: {host: reviews}}]
        """
    )
    p = plan(snapshot)
    assert not p.request_headers and not p.response_headers
    assert p.authority == "reviews:9080"


def test_a_weight_0_destination_still_makes_the_route_weighted() -> None:
    """Two destinations, one of weight 0: pilot still emits weighted clusters (it counts the
    configured destinations), so the destination's edits run first and the route's win."""
    snapshot = snapshot_for(
        """
        - headers: {request: {set: {x-h: route}}, response: {set: {x-r: route}}}
          route:
          - destination: {host: reviews, subset: v1}
            weight: 100
            headers: {request: {set: {x-h: dest}}, response: {set: {x-r: dest}}}
          - {destination: {host: reviews, subset: v2}, weight: 0}
        """
    )
    p = plan(snapshot)
    assert p.cluster == ("reviews.default.svc.cluster.local", "v1", 9080)
    assert p.request_headers.set == {"x-h": "route"}
    assert p.response_headers.set == {"x-r": "route"}


def test_faults_are_decided_independently_at_their_percentages() -> None:
    """Delay 30% and abort 20% are each decided per request, independently (±1.5 points over 10,000)."""
    snapshot = snapshot_for(
        """
        - route: [{destination: {host: reviews}}]
          fault:
            delay: {fixedDelay: 1s, percentage: {value: 30}}
            abort: {httpStatus: 503, percentage: {value: 20}}
        """
    )
    rng = random.Random(9)
    plans = [plan_route(snapshot, RequestAttributes("GET", "reviews"), rng) for _ in range(10_000)]
    delayed = sum(p.fault_delay == 1.0 for p in plans)
    aborted = sum(p.fault_abort is not None for p in plans)
    both = sum(p.fault_delay is not None and p.fault_abort is not None for p in plans)
    assert abs(delayed / 100 - 30) <= 1.5
    assert abs(aborted / 100 - 20) <= 1.5
    assert abs(both / 100 - 6) <= 1.5  # independent: 0.3 x 0.2
    abort = next(p.fault_abort for p in plans if p.fault_abort is not None)
    assert abort is not None and (abort.status, abort.body, abort.flag) == (
        503,
        b"fault filter abort",
        "FI",
    )


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc-web", False),  # Envoy: not gRPC
        ("text/plain", False),
    ],
)
def test_a_grpc_abort_is_grpc_shaped_only_for_grpc_requests(content_type: str, grpc: bool) -> None:
    """Envoy's gRPC abort is HTTP 200; its local reply carries grpc-status only when the
    request's content-type is `application/grpc` or `application/grpc+...`."""
    snapshot = snapshot_for(
        "- route: [{destination: {host: reviews}}]\n"
        "  fault: {abort: {grpcStatus: NOT_FOUND, percentage: {value: 100}}}"
    )
    abort = plan(snapshot, headers={"content-type": content_type}).fault_abort
    assert abort is not None and abort.status == 200
    if grpc:
        assert (abort.body, abort.content_type) == (b"", "application/grpc")
        assert dict(abort.headers) == {"grpc-status": "5", "grpc-message": "fault filter abort"}
    else:
        assert (abort.body, abort.content_type) == (b"fault filter abort", "text/plain")
        assert not abort.headers


def test_fault_without_percentage_never_fires() -> None:
    """A fault without percentage faults no request (the proto's and pilot's default)."""
    snapshot = snapshot_for(
        "- route: [{destination: {host: reviews}}]\n  fault: {abort: {httpStatus: 500}}"
    )
    assert all(plan(snapshot, seed=s).fault_abort is None for s in range(200))


def test_mirror_percentage() -> None:
    """A 25% mirror copies about a quarter of requests (±1.5 points over 10,000)."""
    snapshot = snapshot_for(
        "- route: [{destination: {host: reviews, subset: v1}}]\n  mirror: {host: reviews, subset: v2}\n  mirrorPercentage: {value: 25}"
    )
    rng = random.Random(5)
    mirrored = sum(
        bool(plan_route(snapshot, RequestAttributes("GET", "reviews"), rng).mirrors)
        for _ in range(10_000)
    )
    assert abs(mirrored / 100 - 25) <= 1.5


@pytest.mark.parametrize(
    ("http", "path", "status", "flag"),
    [
        pytest.param(
            "- match: [{uri: {prefix: /a}}]\n  route: [{destination: {host: reviews}}]",
            "/b",
            404,
            "NR",
            id="no-route",
        ),
        pytest.param(
            "- route: [{destination: {host: reviews, subset: v9}}]",
            "/",
            503,
            "NC",
            id="missing-subset",
        ),
        pytest.param(
            "- route: [{destination: {host: ratings}}]", "/", 503, "NC", id="unknown-host"
        ),
    ],
)
def test_local_answers(http: str, path: str, status: int, flag: str) -> None:
    """What Envoy would answer itself: 404 NR without a route, 503 NC without a cluster."""
    p = plan(snapshot_for(http), path)
    assert p.reply is not None and (p.reply.status, p.reply.flag) == (status, flag)


def test_unknown_host_passes_through() -> None:
    """A host the mesh does not know is passed through untouched."""
    p = plan(snapshot_for("- route: [{destination: {host: reviews}}]"), authority="example.com")
    assert p.passthrough and p.reply is None and p.cluster is None


def test_plans_without_edits_share_an_empty_set_that_stays_empty() -> None:
    """Most plans edit no header and share `NO_EDITS`; plans with edits get their own."""
    from meshlib.dataplane.routing import NO_EDITS

    snapshot = snapshot_for(
        """
        - match: [{uri: {prefix: /edit}}]
          rewrite: {uri: /e}
          headers: {request: {set: {x-a: "1"}}, response: {add: {x-r: "2"}}}
          route: [{destination: {host: reviews}}]
        - route: [{destination: {host: reviews}}]
        """
    )
    plain = plan(snapshot, "/")
    edited = plan(snapshot, "/edit/1")
    again = plan(snapshot, "/")
    assert plain.request_headers is NO_EDITS and plain.response_headers is NO_EDITS
    assert edited.request_headers.set == {"x-a": "1", "x-envoy-original-path": "/edit/1"}
    assert edited.response_headers.add == [("x-r", "2")]
    assert not NO_EDITS and not again.request_headers and not again.response_headers


def test_a_cluster_never_goes_back_to_an_older_snapshot() -> None:
    """A request that read the Snapshot just before a reload may hand the old one to the
    cluster after a newer one has refreshed it: the cluster keeps the newer endpoints."""
    from meshlib.dataplane.cluster import ClusterState

    old = snapshot_for("- route: [{destination: {host: reviews}}]")
    text = SERVICES.replace("10.0.0.1", "10.0.0.9")
    result = load_text(text, "t.yaml")
    result.raise_for_errors()
    new = Snapshot.build(result.resources, MeshConfig())
    assert new.generation > old.generation
    key = ("reviews.default.svc.cluster.local", None, 9080)
    cluster = ClusterState(key, old, random.Random(1))
    cluster.refresh(new)
    after_reload = cluster.endpoints
    cluster.refresh(old)
    assert cluster.endpoints == after_reload
    assert cluster.generation == new.generation
