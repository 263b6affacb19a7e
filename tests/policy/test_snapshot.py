"""Snapshot: host resolution, route matching, merged traffic policy and endpoints."""

from __future__ import annotations

import textwrap

import pytest

from meshlib.config import MeshConfig
from meshlib.policy.loader import load_text
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot

REVIEWS = "reviews.default.svc.cluster.local"

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.2, labels: {app: reviews, version: v2}, ports: {http: 19084}}
  - {address: 10.0.0.3, labels: {app: reviews, version: v3}, weight: 5}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 10}}
    outlierDetection: {consecutive5xxErrors: 3}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 5}}
  - name: v3
    labels: {version: v3}
"""


def build(yaml_text: str, config: MeshConfig | None = None, *, services: bool = True) -> Snapshot:
    """Load `yaml_text` (plus the reviews service) and compile it."""
    text = (SERVICES + "\n---\n" if services else "") + textwrap.dedent(yaml_text)
    result = load_text(text, "test.yaml")
    assert result.errors == (), [str(e) for e in result.errors]
    return Snapshot.build(result.resources, config or MeshConfig())


def request(authority: str = "reviews", path: str = "/", **kwargs: object) -> RequestAttributes:
    return RequestAttributes(kwargs.pop("method", "GET"), authority, path, **kwargs)  # type: ignore[arg-type]


def vs(http: str, *, namespace: str = "default", host: str = "reviews", extra: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(http).strip(), "  ")
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: r-{abs(hash(http)) % 10000}, namespace: {namespace}}}\n"
        f"spec:\n  hosts: [{host}]\n{extra}  http:\n{body}\n"
    )


@pytest.mark.parametrize(
    "authority",
    [
        "reviews",
        "reviews:9080",
        "reviews.default",
        "reviews.default.svc",
        REVIEWS,
        f"{REVIEWS}:9080",
        "REVIEWS",
    ],
)
def test_short_names_and_ports_resolve_to_the_fqdn(authority: str) -> None:
    """A client in the namespace may use the short forms, with or without a port."""
    snapshot = build(vs("- route: [{destination: {host: reviews, subset: v2}}]"))
    decision = snapshot.route(request(authority))
    assert decision.host == REVIEWS
    assert decision.virtual_service is not None
    assert decision.route is not None and decision.route.destinations[0].subset == "v2"


def test_short_name_from_another_namespace_is_not_this_service() -> None:
    """From namespace `other`, plain `reviews` means reviews.other, not reviews.default."""
    snapshot = build(vs("- route: [{destination: {host: reviews}}]"), MeshConfig(namespace="other"))
    assert snapshot.route(request("reviews")).passthrough
    assert snapshot.route(request("reviews.default")).host == REVIEWS


def test_destination_hosts_expand_with_the_resource_namespace() -> None:
    """A short destination host in a VirtualService of namespace `shop` means *.shop.svc."""
    snapshot = build(
        vs(
            "- route: [{destination: {host: ratings}}]",
            namespace="shop",
            host="reviews.default.svc.cluster.local",
        )
    )
    route = snapshot.route(request()).route
    assert route is not None and route.destinations[0].host == "ratings.shop.svc.cluster.local"


def test_unknown_host_passes_through() -> None:
    """A host no resource mentions goes out untouched (PassthroughCluster)."""
    decision = build("").route(request("example.com:8080"))
    assert decision.passthrough and decision.route is None
    assert (decision.host, decision.port) == ("example.com", 8080)


def test_known_service_without_virtual_service_gets_the_default_route() -> None:
    """A service with no VirtualService is routed to itself with Istio's default retries."""
    decision = build("").route(request())
    assert decision.virtual_service is None and not decision.passthrough
    assert decision.route is not None
    assert [d.host for d in decision.route.destinations] == [REVIEWS]
    assert decision.route.retries is not None and decision.route.retries.is_default


def test_no_matching_route_is_reported_as_such() -> None:
    """With a VirtualService but no matching route, the decision has no route (404 NR)."""
    snapshot = build(
        vs("- match: [{uri: {prefix: /api}}]\n  route: [{destination: {host: reviews}}]")
    )
    decision = snapshot.route(request(path="/other"))
    assert decision.virtual_service == "default/" + decision.virtual_service.split("/")[1]
    assert decision.route is None and not decision.passthrough


MATCHES = [
    ("uri: {exact: /a}", {"path": "/a"}, {"path": "/a/"}),
    ("uri: {prefix: /api}", {"path": "/apiv2"}, {"path": "/ap"}),
    ("uri: {regex: '/r/[0-9]+'}", {"path": "/r/12"}, {"path": "/r/12x"}),
    ("uri: {exact: /A}\n    ignoreUriCase: true", {"path": "/a"}, {"path": "/b"}),
    ("uri: {prefix: /API}\n    ignoreUriCase: true", {"path": "/api/x"}, {"path": "/x"}),
    ("uri: {regex: '/A'}\n    ignoreUriCase: true", {"path": "/A"}, {"path": "/a"}),
    ("method: {exact: POST}", {"method": "POST"}, {"method": "GET"}),
    ("scheme: {exact: https}", {"scheme": "https"}, {"scheme": "http"}),
    ("authority: {exact: 'reviews:9080'}", {"authority": "reviews:9080"}, {"authority": "reviews"}),
    (
        "headers: {end-user: {exact: jason}}",
        {"headers": {"end-user": "jason"}},
        {"headers": {"end-user": "Jason"}},
    ),
    ("headers: {x-canary: {}}", {"headers": {"x-canary": ""}}, {"headers": {}}),
    (
        "headers: {cookie: {regex: '.*user=jason.*'}}",
        {"headers": {"cookie": "a=1; user=jason"}},
        {"headers": {}},
    ),
    ("withoutHeaders: {x-debug: {exact: '1'}}", {"headers": {}}, {"headers": {"x-debug": "1"}}),
    ("withoutHeaders: {x-debug: {}}", {"headers": {"x-other": "1"}}, {"headers": {"x-debug": "0"}}),
    ("queryParams: {v: {exact: '2'}}", {"query": "a=1&v=2"}, {"query": "v=3"}),
    ("queryParams: {debug: {exact: ''}}", {"query": "debug"}, {"query": "x=1"}),
    ("queryParams: {id: {regex: '\\d+'}}", {"query": "id=123"}, {"query": "id=a123"}),
    # Envoy matches query values as sent, undecoded: `+` is no space, `%2F` no slash
    ("queryParams: {q: {exact: 'a+b'}}", {"query": "q=a+b"}, {"query": "q=a%2Bb"}),
    ("queryParams: {q: {exact: 'a b'}}", {"query": "q=a b"}, {"query": "q=a+b"}),
    ("queryParams: {t: {exact: 'x%2Fy'}}", {"query": "t=x%2Fy"}, {"query": "t=x/y"}),
    ("queryParams: {'%41': {exact: '1'}}", {"query": "%41=1"}, {"query": "A=1"}),
    # a repeated key: its first value is the one matched
    ("queryParams: {v: {exact: '1'}}", {"query": "v=1&v=2"}, {"query": "v=2&v=1"}),
    ("port: 9080", {"authority": "reviews:9080"}, {"authority": "reviews:80"}),
]


@pytest.mark.parametrize(
    ("match", "hit", "miss"),
    MATCHES,
    ids=[m[0].split(":")[0] + str(i) for i, m in enumerate(MATCHES)],
)
def test_match_fields(match: str, hit: dict[str, object], miss: dict[str, object]) -> None:
    """Each match field accepts the request it describes and rejects the other."""
    snapshot = build(vs(f"- match:\n  - {match}\n  route: [{{destination: {{host: reviews}}}}]"))
    assert snapshot.route(request(**{"authority": "reviews", **hit})).route is not None  # type: ignore[arg-type]
    assert snapshot.route(request(**{"authority": "reviews", **miss})).route is None  # type: ignore[arg-type]


def test_match_blocks_or_and_fields_and() -> None:
    """Blocks are ORed; the fields inside a block are ANDed."""
    snapshot = build(
        vs(
            """
            - match:
              - {uri: {prefix: /a}, method: {exact: GET}}
              - {headers: {x: {exact: '1'}}}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    assert snapshot.route(request(path="/a")).route is not None
    assert snapshot.route(request(path="/a", method="POST")).route is None
    assert snapshot.route(request(path="/b", method="POST", headers={"x": "1"})).route is not None


def test_first_matching_route_wins() -> None:
    """Routes are tried in order."""
    snapshot = build(
        vs(
            """
            - match: [{uri: {prefix: /}}]
              route: [{destination: {host: reviews, subset: v1}}]
            - match: [{uri: {prefix: /special}}]
              route: [{destination: {host: reviews, subset: v2}}]
            """
        )
    )
    route = snapshot.route(request(path="/special")).route
    assert route is not None and route.index == 0


def test_source_labels_and_namespace_are_decided_for_this_workload() -> None:
    """sourceLabels/sourceNamespace select the rules that apply to the calling workload."""
    text = vs(
        """
        - match: [{sourceLabels: {app: productpage}, sourceNamespace: default}]
          route: [{destination: {host: reviews, subset: v2}}]
        - route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    productpage = build(text, MeshConfig(service="productpage"))
    other = build(text, MeshConfig(service="frontend"))
    other_ns = build(text, MeshConfig(service="productpage", namespace="shop"))
    assert productpage.route(request()).route.destinations[0].subset == "v2"  # type: ignore[union-attr]
    assert other.route(request()).route.destinations[0].subset == "v1"  # type: ignore[union-attr]
    assert other_ns.route(request("reviews.default")).route.destinations[0].subset == "v1"  # type: ignore[union-attr]


def test_match_gateways_without_mesh_drop_the_block() -> None:
    """A match block bound to gateways only does not apply to a sidecar."""
    snapshot = build(
        vs(
            """
            - match: [{gateways: [my-gateway], uri: {prefix: /}}]
              route: [{destination: {host: reviews, subset: v2}}]
            - route: [{destination: {host: reviews, subset: v1}}]
            """
        )
    )
    assert snapshot.route(request()).route.destinations[0].subset == "v1"  # type: ignore[union-attr]


def test_relative_weights_and_zero_weight() -> None:
    """Weights are relative (1:3 is 25/75); a zero-weight destination is dropped."""
    snapshot = build(
        vs(
            """
            - route:
              - {destination: {host: reviews, subset: v1}, weight: 1}
              - {destination: {host: reviews, subset: v2}, weight: 3}
              - {destination: {host: reviews, subset: v3}, weight: 0}
            """
        )
    )
    route = snapshot.route(request()).route
    assert route is not None
    assert [(d.subset, d.weight) for d in route.destinations] == [("v1", 1), ("v2", 3)]
    assert route.total_weight == 4


def test_retry_defaults_and_disable() -> None:
    """No retries -> Istio's default; attempts 0 -> none; attempts without retryOn -> default conditions."""
    snapshot = build(
        vs(
            """
            - match: [{uri: {prefix: /none}}]
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /off}}]
              retries: {attempts: 0}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /three}}]
              retries: {attempts: 3, perTryTimeout: 2s}
              route: [{destination: {host: reviews}}]
            - retries: {attempts: 1, retryOn: '5xx,503'}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    default = snapshot.route(request(path="/none")).route.retries  # type: ignore[union-attr]
    assert default is not None and default.attempts == 2 and default.is_default
    assert default.retry_on >= {"connect-failure", "refused-stream", "unavailable", "cancelled"}
    assert snapshot.route(request(path="/off")).route.retries is None  # type: ignore[union-attr]
    three = snapshot.route(request(path="/three")).route.retries  # type: ignore[union-attr]
    assert three is not None and three.attempts == 3 and three.per_try_timeout == 2.0
    assert "connect-failure" in three.retry_on
    codes = snapshot.route(request(path="/x")).route.retries  # type: ignore[union-attr]
    assert codes is not None and codes.retriable_status_codes == {503}
    assert "retriable-status-codes" in codes.retry_on and "5xx" in codes.retry_on


def test_mirror_percentages() -> None:
    """mirror defaults to 100%, mirrorPercentage 0 turns it off, mirrors carry their own."""
    snapshot = build(
        vs(
            """
            - match: [{uri: {prefix: /a}}]
              route: [{destination: {host: reviews}}]
              mirror: {host: reviews, subset: v3}
            - match: [{uri: {prefix: /b}}]
              route: [{destination: {host: reviews}}]
              mirror: {host: reviews}
              mirrorPercentage: {value: 0}
            - route: [{destination: {host: reviews}}]
              mirrors:
              - {destination: {host: reviews, subset: v2}, percentage: {value: 25}}
              - {destination: {host: reviews, subset: v3}}
            """
        )
    )
    a = snapshot.route(request(path="/a")).route
    assert a is not None and [(m.subset, m.fraction) for m in a.mirrors] == [("v3", 1.0)]
    assert snapshot.route(request(path="/b")).route.mirrors == ()  # type: ignore[union-attr]
    c = snapshot.route(request(path="/c")).route
    assert c is not None and [(m.subset, m.fraction) for m in c.mirrors] == [
        ("v2", 0.25),
        ("v3", 1.0),
    ]


def test_subset_policy_replaces_whole_blocks() -> None:
    """A subset's connectionPool replaces the parent's block; other blocks are inherited."""
    snapshot = build("")
    v1 = snapshot.traffic_policy(REVIEWS, "v1", 9080)
    v2 = snapshot.traffic_policy(REVIEWS, "v2", 9080)
    assert v1.connection_pool is not None and v1.connection_pool.tcp is not None
    assert v2.connection_pool is not None and v2.connection_pool.tcp is None  # replaced, not merged
    assert v2.connection_pool.http is not None and v2.connection_pool.http.http2_max_requests == 5
    assert v2.outlier_detection == v1.outlier_detection  # inherited
    assert v2.load_balancer is not None and v2.load_balancer.algorithm == "ROUND_ROBIN"


def test_port_level_settings_replace_the_policy_for_that_port() -> None:
    """For the listed port, the port-level entry is the whole policy; unset blocks are unset."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api}
        spec:
          host: api.example.com
          trafficPolicy:
            loadBalancer: {simple: RANDOM}
            outlierDetection: {consecutive5xxErrors: 7}
            portLevelSettings:
            - port: {number: 443}
              tls: {mode: SIMPLE}
        """,
        services=False,
    )
    p443 = snapshot.traffic_policy("api.example.com", None, 443)
    p80 = snapshot.traffic_policy("api.example.com", None, 80)
    assert p443.tls is not None and p443.load_balancer is None and p443.outlier_detection is None
    assert p80.load_balancer is not None and p80.load_balancer.algorithm == "RANDOM"


def test_a_subset_port_level_entry_keeps_the_retry_budget() -> None:
    """A subset's port-level entry replaces the four port blocks; the retryBudget, which a
    port-level entry cannot hold, stays the subset's or else the parent's (pilot's merge)."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api}
        spec:
          host: api.example.com
          trafficPolicy:
            retryBudget: {percent: {value: 5}, minRetryConcurrency: 1}
            loadBalancer: {simple: ROUND_ROBIN}
            outlierDetection: {consecutive5xxErrors: 7}
          subsets:
          - name: v1
            trafficPolicy:
              outlierDetection: {consecutive5xxErrors: 3}
              portLevelSettings:
              - port: {number: 443}
                loadBalancer: {simple: RANDOM}
          - name: v2
            trafficPolicy:
              retryBudget: {percent: {value: 50}}
              portLevelSettings:
              - port: {number: 443}
                loadBalancer: {simple: RANDOM}
        """,
        services=False,
    )
    v1 = snapshot.traffic_policy("api.example.com", "v1", 443)
    assert v1.load_balancer is not None and v1.load_balancer.algorithm == "RANDOM"
    assert v1.outlier_detection is None  # port level: unset blocks are unset
    assert v1.retry_budget is not None and v1.retry_budget.percent is not None
    assert v1.retry_budget.percent.value == 5
    v2 = snapshot.traffic_policy("api.example.com", "v2", 443)
    assert v2.retry_budget is not None and v2.retry_budget.percent is not None
    assert v2.retry_budget.percent.value == 50
    v1_80 = snapshot.traffic_policy("api.example.com", "v1", 80)  # no port entry: blocks merge
    assert v1_80.load_balancer is not None and v1_80.load_balancer.algorithm == "ROUND_ROBIN"
    assert v1_80.outlier_detection is not None
    assert v1_80.outlier_detection.consecutive_5xx_errors == 3


def test_default_load_balancer_is_least_request() -> None:
    """With no DestinationRule the algorithm is LEAST_REQUEST (Istio >= 1.14); LEAST_CONN is its alias."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api}
        spec: {host: api.example.com, trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}}
        """,
        services=False,
    )
    policy = snapshot.traffic_policy("api.example.com", None, None)
    assert policy.load_balancer is not None and policy.load_balancer.algorithm == "LEAST_REQUEST"
    assert snapshot.traffic_policy("other.example.com", None, None).load_balancer is None


def test_destination_rule_precedence_client_namespace_first() -> None:
    """A DestinationRule in the client's namespace wins over one in the service's namespace."""
    text = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: from-service-ns, namespace: default}
    spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: from-client-ns, namespace: shop}
    spec: {host: reviews.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
    """
    shop = build(text, MeshConfig(namespace="shop"), services=False)
    other = build(text, MeshConfig(namespace="web"), services=False)
    assert shop.traffic_policy(REVIEWS, None, None).load_balancer.algorithm == "ROUND_ROBIN"  # type: ignore[union-attr]
    assert other.traffic_policy(REVIEWS, None, None).load_balancer.algorithm == "RANDOM"  # type: ignore[union-attr]


BACKEND = "reviews.backend.svc.cluster.local"


def _backend_rule(name: str, namespace: str, host: str, simple: str, export_to: str = "[]") -> str:
    return f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  host: '{host}'
  exportTo: {export_to}
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
"""


_BACKEND_SERVICE = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{BACKEND}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 10.0.0.1}}]
"""


@pytest.mark.parametrize(
    ("rules", "client", "expected"),
    [
        pytest.param(
            [
                ("exact", "backend", BACKEND, "RANDOM"),
                ("wild", "web", "*.backend.svc.cluster.local", "ROUND_ROBIN"),
            ],
            "web",
            "web/wild",
            id="client-namespace-wildcard-before-service-namespace",
        ),
        pytest.param(
            [
                ("wild", "web", "*.cluster.local", "RANDOM"),
                ("exact", "web", BACKEND, "ROUND_ROBIN"),
            ],
            "web",
            "web/exact",
            id="exact-host-before-wildcard",
        ),
        pytest.param(
            [("elsewhere", "other", BACKEND, "RANDOM")], "web", None, id="unrelated-namespace"
        ),
        pytest.param(
            [("mesh", "istio-system", BACKEND, "RANDOM")], "web", "istio-system/mesh", id="root"
        ),
        pytest.param(
            [
                ("mesh", "istio-system", BACKEND, "RANDOM"),
                ("svc", "backend", BACKEND, "ROUND_ROBIN"),
            ],
            "web",
            "backend/svc",
            id="service-namespace-before-root",
        ),
        pytest.param(
            [("svc", "backend", BACKEND, "RANDOM", "['.']")],
            "web",
            None,
            id="private-to-service-ns",
        ),
        pytest.param(
            [("svc", "backend", BACKEND, "RANDOM", "[web]")],
            "web",
            "backend/svc",
            id="exported-by-name",
        ),
        pytest.param(
            [("svc", "backend", BACKEND, "RANDOM", "[web]")], "shop", None, id="exported-elsewhere"
        ),
        pytest.param(
            [("mine", "web", BACKEND, "RANDOM", "['.']")],
            "web",
            "web/mine",
            id="private-in-client-ns",
        ),
        pytest.param(
            [("mesh", "istio-system", BACKEND, "RANDOM", "['.']")],
            "web",
            None,
            id="root-private-not-for-others",
        ),
    ],
)
def test_destination_rule_lookup_follows_pilot(
    rules: list[tuple[str, ...]], client: str, expected: str | None
) -> None:
    """Which DestinationRule applies: the client namespace's (exact host, then wildcard), then
    one the service's namespace exports to the client, then the root namespace's; none else."""
    text = _BACKEND_SERVICE + "".join(_backend_rule(*rule) for rule in rules)
    policy = build(text, MeshConfig(namespace=client), services=False).destination_policy(BACKEND)
    assert (policy.rules[0] if policy else None) == expected


def test_destination_rules_for_one_host_merge() -> None:
    """Two rules for one host: subsets concatenate and the older trafficPolicy wins."""
    text = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: a, creationTimestamp: '2024-01-01T00:00:00Z'}
    spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}}, subsets: [{name: v1, labels: {version: v1}}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: b, creationTimestamp: '2023-01-01T00:00:00Z'}
    spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}, subsets: [{name: v2, labels: {version: v2}}]}
    """
    snapshot = build(text, services=False)
    policy = snapshot.destination_policy(REVIEWS)
    assert policy is not None and set(policy.subsets) == {"v1", "v2"}
    assert policy.rules == ("default/b", "default/a")
    assert snapshot.traffic_policy(REVIEWS, None, None).load_balancer.algorithm == "ROUND_ROBIN"  # type: ignore[union-attr]


def test_endpoints_per_subset_and_port() -> None:
    """Subsets select endpoints by label; ports come from the endpoint's port map or the service."""
    snapshot = build("")
    assert [str(e) for e in snapshot.endpoints(REVIEWS, None, 9080)] == [
        "10.0.0.1:9080",
        "10.0.0.2:19084",
        "10.0.0.3:9080",
    ]
    assert [str(e) for e in snapshot.endpoints(REVIEWS, "v2", 9080)] == ["10.0.0.2:19084"]
    assert snapshot.endpoints(REVIEWS, "v3", None)[0].weight == 5
    assert snapshot.endpoints(REVIEWS, "v9", 9080) == ()
    assert snapshot.endpoints(REVIEWS, None, 1234) == ()


def test_workload_entries_selected_by_service_entry() -> None:
    """A ServiceEntry workloadSelector picks WorkloadEntries in its namespace by labels."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: vm}
        spec:
          hosts: [vm.example.internal]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 8080, name: http}]
          workloadSelector: {labels: {app: vm}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: vm-1}
        spec: {address: 10.1.1.1, labels: {app: vm}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: vm-other-ns, namespace: elsewhere}
        spec: {address: 10.1.1.2, labels: {app: vm}}
        """,
        services=False,
    )
    assert [str(e) for e in snapshot.endpoints("vm.example.internal", None, 8080)] == [
        "10.1.1.1:8080"
    ]


def test_delegate_routes_narrow_the_root_match() -> None:
    """A delegate VirtualService's routes apply only where the root route matches."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: root}
        spec:
          hosts: [reviews]
          http:
          - match: [{uri: {prefix: /reviews}}]
            delegate: {name: child}
          - route: [{destination: {host: reviews, subset: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: child}
        spec:
          http:
          - match: [{headers: {end-user: {exact: jason}}}]
            route: [{destination: {host: reviews, subset: v2}}]
          - route: [{destination: {host: reviews, subset: v3}}]
        """
    )
    jason = snapshot.route(request(path="/reviews/1", headers={"end-user": "jason"})).route
    anyone = snapshot.route(request(path="/reviews/1")).route
    outside = snapshot.route(request(path="/other", headers={"end-user": "jason"})).route
    assert jason is not None and jason.destinations[0].subset == "v2"
    assert jason.virtual_service == "default/child"
    assert anyone is not None and anyone.destinations[0].subset == "v3"
    assert outside is not None and outside.destinations[0].subset == "v1"


DELEGATING_ROOT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: [reviews]
  http:
  - name: api
    match: [{uri: {prefix: /api/v2}, headers: {tenant: {exact: a}}}]
    delegate: {name: child}
  - directResponse: {status: 418}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: child}
spec:
  http:
  - name: inner
    match: [%s]
    directResponse: {status: 200}
"""


@pytest.mark.parametrize(
    ("child_match", "path", "status"),
    [
        pytest.param("{uri: {prefix: /api/v2/users}}", "/api/v2/users/1", 200, id="longer-prefix"),
        pytest.param("{uri: {exact: /api/v2/x}}", "/api/v2/x", 200, id="exact-in-prefix"),
        pytest.param("{headers: {tenant: {exact: a}}}", "/api/v2/x", 200, id="same-header"),
        pytest.param("{uri: {prefix: /api}}", "/api/v2/x", 418, id="shorter-prefix"),
        pytest.param("{uri: {regex: '/api/v2/.*'}}", "/api/v2/x", 418, id="regex"),
        pytest.param("{headers: {tenant: {prefix: a}}}", "/api/v2/x", 418, id="prefix-in-exact"),
        pytest.param("{uri: {prefix: /api/v2}, ignoreUriCase: true}", "/api/v2/x", 418, id="case"),
    ],
)
def test_delegate_route_outside_the_root_match_is_dropped(
    child_match: str, path: str, status: int
) -> None:
    """A delegate route whose match does not lie within the root route's is dropped, as
    pilot's stringMatchConflict drops it: requests fall through to the root's next route."""
    snapshot = build(DELEGATING_ROOT % child_match)
    route = snapshot.route(request(path=path, headers={"tenant": "a"})).route
    assert route is not None and route.direct_response is not None
    assert route.direct_response.status == status


def test_delegate_route_takes_pilots_merged_names() -> None:
    """A merged delegate route and its match block are named `root-child`, as pilot names them."""
    snapshot = build(DELEGATING_ROOT % "{name: m, uri: {prefix: /api/v2/users}}")
    decision = snapshot.route(request(path="/api/v2/users", headers={"tenant": "a"}))
    assert decision.route is not None and decision.route.name == "api-inner"
    assert decision.matched is not None and decision.matched.name == "m"


def test_delegate_routes_inherit_mirror_fields_one_by_one() -> None:
    """As pilot's mergeHTTPRoute: a delegate route with its own `mirror` keeps the root's
    `mirrorPercentage`; one with no mirror takes the root's mirror and percentage."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: root}
        spec:
          hosts: [reviews]
          http:
          - delegate: {name: child}
            mirror: {host: reviews, subset: v2}
            mirrorPercentage: {value: 10}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: child}
        spec:
          http:
          - match: [{uri: {prefix: /own}}]
            route: [{destination: {host: reviews}}]
            mirror: {host: reviews, subset: v3}
          - route: [{destination: {host: reviews}}]
        """
    )
    mirrors = {
        path: [(m.subset, m.fraction) for m in snapshot.route(request(path=path)).route.mirrors]  # type: ignore[union-attr]
        for path in ("/own", "/other")
    }
    assert mirrors == {"/own": [("v3", 0.1)], "/other": [("v2", 0.1)]}


def test_export_to_dot_hides_from_other_namespaces() -> None:
    """exportTo: ['.'] keeps a VirtualService to its own namespace."""
    text = vs("- route: [{destination: {host: reviews, subset: v2}}]", extra="  exportTo: ['.']\n")
    assert build(text).route(request()).virtual_service is not None
    assert (
        build(text, MeshConfig(namespace="shop")).route(request("reviews.default")).virtual_service
        is None
    )


def test_wildcard_virtual_service_host() -> None:
    """A `*.example.com` VirtualService serves its subdomains; exact hosts win over it."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: wild}
        spec:
          hosts: ['*.example.com']
          http: [{route: [{destination: {host: a.example.com}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: exact}
        spec:
          hosts: [b.example.com]
          http: [{route: [{destination: {host: b.example.com}}]}]
        """,
        services=False,
    )
    assert snapshot.route(request("x.y.example.com")).virtual_service == "default/wild"
    assert snapshot.route(request("b.example.com")).virtual_service == "default/exact"
    assert snapshot.route(request("example.org")).passthrough


def test_oldest_virtual_service_wins_a_host() -> None:
    """Two VirtualServices for one host: the older one is served."""
    text = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: newer, creationTimestamp: '2025-01-01T00:00:00Z'}
    spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v2}}]}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: older, creationTimestamp: '2020-01-01T00:00:00Z'}
    spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}
    """
    assert build(text).route(request()).virtual_service == "default/older"


def _reviews_vs(name: str, namespace: str, created: str, export_to: str, subset: str) -> str:
    return f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}, creationTimestamp: '{created}'}}
spec:
  hosts: [{REVIEWS}]
  exportTo: {export_to}
  http: [{{route: [{{destination: {{host: {REVIEWS}, subset: {subset}}}}}]}}]
"""


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        pytest.param(
            ("public-old", "other", "2020-01-01T00:00:00Z", "['*']", "v1"),
            ("mine", "default", "2025-01-01T00:00:00Z", "['.']", "v2"),
            "default/mine",
            id="private-before-public",
        ),
        pytest.param(
            ("public-old", "other", "2020-01-01T00:00:00Z", "[]", "v1"),
            ("to-me", "shop", "2025-01-01T00:00:00Z", "[default]", "v2"),
            "shop/to-me",
            id="exported-by-name-before-public",
        ),
        pytest.param(
            ("to-me", "shop", "2020-01-01T00:00:00Z", "[default]", "v1"),
            ("mine", "default", "2025-01-01T00:00:00Z", "[default]", "v2"),
            "default/mine",
            id="private-before-exported",
        ),
        pytest.param(
            ("old", "other", "2020-01-01T00:00:00Z", "['*']", "v1"),
            ("new", "default", "2025-01-01T00:00:00Z", "['*']", "v2"),
            "other/old",
            id="public-oldest-first",
        ),
    ],
)
def test_virtual_service_precedence_follows_pilot(
    first: tuple[str, ...], second: tuple[str, ...], winner: str
) -> None:
    """Of several VirtualServices for a host, the client namespace's private ones come first,
    then those exported to it by name, then public ones; the oldest first in each group."""
    snapshot = build(_reviews_vs(*first) + _reviews_vs(*second))
    assert snapshot.route(request()).virtual_service == winner


def test_virtual_service_with_a_delegate_comes_after_one_without() -> None:
    """pilot lists VirtualServices with a delegate route after the others, whatever their age."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: root, creationTimestamp: '2020-01-01T00:00:00Z'}
        spec:
          hosts: [reviews]
          http: [{delegate: {name: child}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: child}
        spec:
          http: [{route: [{destination: {host: reviews, subset: v1}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: plain, creationTimestamp: '2025-01-01T00:00:00Z'}
        spec:
          hosts: [reviews]
          http: [{route: [{destination: {host: reviews, subset: v2}}]}]
        """
    )
    assert snapshot.route(request()).virtual_service == "default/plain"


def _partner_se(name: str, namespace: str, created: str, export_to: str, address: str) -> str:
    return f"""
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}, creationTimestamp: '{created}'}}
spec:
  hosts: [api.partner.com]
  exportTo: {export_to}
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {address}}}]
"""


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        pytest.param(
            ("shared", "egress", "2024-01-01T00:00:00Z", "[]", "10.0.0.1"),
            ("mine", "default", "2024-06-01T00:00:00Z", "['.']", "10.0.0.2"),
            "ServiceEntry default/mine",
            id="private-before-public",
        ),
        pytest.param(
            ("shared", "egress", "2024-01-01T00:00:00Z", "['*']", "10.0.0.1"),
            ("to-me", "shop", "2024-06-01T00:00:00Z", "[default]", "10.0.0.2"),
            "ServiceEntry shop/to-me",
            id="exported-by-name-before-public",
        ),
        pytest.param(
            ("to-me", "shop", "2024-01-01T00:00:00Z", "[default]", "10.0.0.1"),
            ("mine", "default", "2024-06-01T00:00:00Z", "[default]", "10.0.0.2"),
            "ServiceEntry default/mine",
            id="private-before-exported",
        ),
        pytest.param(
            ("old", "egress", "2024-01-01T00:00:00Z", "[]", "10.0.0.1"),
            ("new", "default", "2024-06-01T00:00:00Z", "[]", "10.0.0.2"),
            "ServiceEntry egress/old",
            id="public-oldest-first",
        ),
    ],
)
def test_service_entry_precedence_follows_pilot(
    first: tuple[str, ...], second: tuple[str, ...], winner: str
) -> None:
    """Of several ServiceEntries for a host, the first in pilot's servicesExportedToNamespace
    wins: those private to the client namespace, then those exported to it by name, then
    public ones; the oldest first in each group."""
    snapshot = build(_partner_se(*first) + _partner_se(*second), services=False)
    service = snapshot.service("api.partner.com")
    assert service is not None and service.source == winner
    address = (first if winner.endswith(f"/{first[0]}") else second)[4]
    assert [str(e) for e in snapshot.endpoints("api.partner.com", None, 80)] == [f"{address}:80"]


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        pytest.param("'2024-01-01T09:00:00Z'", "2024-01-01T10:00:00Z", id="quoted-and-plain"),
        pytest.param("'2024-01-01T10:00:00+02:00'", "'2024-01-01T09:00:00Z'", id="offsets"),
        pytest.param("'2024-01-01T09:00:00.5Z'", "'2024-01-01T09:00:01Z'", id="fractions"),
    ],
)
def test_oldest_is_decided_by_time_not_text(older: str, newer: str) -> None:
    """creationTimestamp is compared as a time: quoted or plain YAML, any offset, with or
    without fractions of a second (the newer one is listed first, so text order or file
    order alone would pick it)."""
    text = f"""
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: newer, creationTimestamp: {newer}}}
    spec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews, subset: v2}}}}]}}]}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: older, creationTimestamp: {older}}}
    spec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews, subset: v1}}}}]}}]}}
    """
    assert build(text).route(request()).virtual_service == "default/older"


@pytest.mark.parametrize("value", ["2024-01-01", "'2024-01-01T09:00:00'", "yesterday", "5"])
def test_a_creation_timestamp_that_is_not_a_time_is_an_error(value: str) -> None:
    text = textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: r, creationTimestamp: {value}}}
        spec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews}}}}]}}]}}
        """
    )
    (error,) = load_text(text, "mesh.yaml").errors
    assert (error.field, error.line) == ("metadata.creationTimestamp", 3)
    assert "RFC 3339" in error.message


def test_duplicate_definition_replaces_earlier() -> None:
    """The same kind/namespace/name twice: the later definition is served, as kubectl apply does."""
    text = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v2}}]}]}
    """
    assert build(text).route(request()).route.destinations[0].subset == "v2"  # type: ignore[union-attr]


def test_dns_service_entry_without_endpoints_targets_the_host() -> None:
    """resolution DNS with no endpoints sends traffic to the host name itself."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext}
        spec:
          hosts: [api.example.com]
          resolution: DNS
          ports: [{number: 443, name: https, protocol: HTTPS}]
        """,
        services=False,
    )
    assert [str(e) for e in snapshot.endpoints("api.example.com", None, 443)] == [
        "api.example.com:443"
    ]
    assert [str(e) for e in snapshot.endpoints("api.example.com", None, None)] == [
        "api.example.com:443"
    ]


def test_a_wildcard_service_entrys_destination_rule_applies_to_the_hosts_it_covers() -> None:
    """With no VirtualService, a host under a wildcard ServiceEntry takes the rules for the
    wildcard: pilot looks them up for the service's hostname, `*.example.com`, so a rule
    naming `api.example.com` itself, which no service has, does not apply."""
    snapshot = build(
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext}
        spec:
          hosts: ["*.example.com"]
          ports: [{number: 80, name: http, protocol: HTTP}]
          resolution: STATIC
          endpoints: [{address: 10.0.0.7, labels: {version: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: exact}
        spec:
          host: api.example.com
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ext}
        spec:
          host: "*.example.com"
          trafficPolicy:
            loadBalancer: {simple: ROUND_ROBIN}
            connectionPool: {http: {http1MaxPendingRequests: 1}}
          subsets: [{name: v1, labels: {version: v1}}]
        """,
        services=False,
    )
    decision = snapshot.route(request("api.example.com"))
    assert decision.route is not None and not decision.passthrough
    host = decision.route.destinations[0].host
    assert host == "api.example.com"  # the cluster stays the request's host (docs/policy.md)
    policy = snapshot.traffic_policy(host, None, 80)
    assert policy.load_balancer is not None and policy.load_balancer.simple == "ROUND_ROBIN"
    assert policy.connection_pool is not None and policy.connection_pool.http is not None
    assert policy.connection_pool.http.http1_max_pending_requests == 1
    assert snapshot.has_subset(host, "v1")
    assert [str(e) for e in snapshot.endpoints(host, "v1", 80)] == ["10.0.0.7:80"]
    # A host no entry covers gets nothing from the wildcard rule.
    assert snapshot.traffic_policy("api.example.org", None, 80).load_balancer is None


def test_snapshot_generations_increase() -> None:
    """Each build gets a larger generation number."""
    first, second = build(""), build("")
    assert second.generation > first.generation


EXPORTED_DELEGATE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /api}}]
    delegate: {name: child, namespace: team}
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: child, namespace: team}
spec:
  %s
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
"""


@pytest.mark.parametrize(
    ("export_to", "subset"),
    [
        pytest.param("", "v2", id="unset-is-public"),
        pytest.param("exportTo: ['*']", "v2", id="public"),
        pytest.param("exportTo: [default]", "v2", id="to-the-roots-namespace"),
        pytest.param("exportTo: ['.']", "v1", id="private-to-its-own"),
        pytest.param("exportTo: [elsewhere]", "v1", id="to-another-namespace"),
    ],
)
def test_a_delegate_serves_only_roots_it_is_exported_to(export_to: str, subset: str) -> None:
    """As pilot's mergeVirtualServicesIfNeeded: a delegate whose exportTo leaves out the
    root's namespace is not used; that one root route is dropped and requests fall through
    to the root's next route."""
    snapshot = build(EXPORTED_DELEGATE % export_to)
    route = snapshot.route(request(path="/api/x")).route
    assert route is not None and route.destinations[0].subset == subset


def test_analysis_reports_a_delegate_not_exported_to_the_root() -> None:
    from meshlib.policy.analysis import analyze

    result = load_text(textwrap.dedent(EXPORTED_DELEGATE % "exportTo: ['.']"), "vs.yaml")
    findings = [str(d) for d in analyze(result.resources)]
    assert any(
        "spec.http[0].delegate" in f and "team/child is not exported to namespace default" in f
        for f in findings
    ), findings
    exported = load_text(textwrap.dedent(EXPORTED_DELEGATE % ""), "vs.yaml")
    assert not any("delegate" in str(d) for d in analyze(exported.resources))


@pytest.mark.parametrize("order", [("all-com", "example"), ("example", "all-com")])
def test_analysis_finds_a_subset_in_the_most_specific_wildcard_rule(
    order: tuple[str, str],
) -> None:
    """`check` takes the rule the Snapshot takes, the most specific wildcard, whatever the
    file order."""
    from meshlib.policy.analysis import analyze

    rules = {
        "all-com": 'host: "*.com"\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}',
        "example": 'host: "*.example.com"\n  subsets: [{name: v1, labels: {version: v1}}]',
    }
    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  http: [{route: [{destination: {host: api.example.com, subset: v1}}]}]
"""
    for name in order:
        text += "---\nkind: DestinationRule\napiVersion: networking.istio.io/v1\n"
        text += f"metadata: {{name: {name}}}\nspec:\n  {rules[name]}\n"
    result = load_text(text, "mesh.yaml")
    assert result.errors == (), [str(e) for e in result.errors]
    assert Snapshot.build(result.resources, MeshConfig()).has_subset("api.example.com", "v1")
    assert [str(d) for d in analyze(result.resources)] == []
