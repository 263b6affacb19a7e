"""Property: whatever YAML arrives, loading yields a Snapshot or a PolicyError, nothing else."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlib.config import MeshConfig
from meshlib.errors import PolicyError
from meshlib.policy.analysis import analyze
from meshlib.policy.loader import load_text
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot
from tests.conftest import BOOKINFO

SEEDS: list[dict[str, Any]] = [
    doc
    for path in sorted(BOOKINFO.rglob("*.yaml"))
    for doc in yaml.safe_load_all(Path(path).read_text())
    if isinstance(doc, dict)
]
SEEDS += list(
    yaml.safe_load_all(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything, namespace: shop}
spec:
  hosts: [reviews, '*.example.com']
  http:
  - name: canary
    match:
    - uri: {prefix: /api}
      ignoreUriCase: true
      headers: {end-user: {exact: jason}, x-b: {regex: 'a.*'}}
      queryParams: {v: {exact: '2'}}
      withoutHeaders: {x-debug: {}}
      sourceLabels: {app: productpage}
      port: 9080
    route:
    - {destination: {host: reviews, subset: v1, port: {number: 9080}}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10, headers: {request: {set: {x-a: b}}}}
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: '5xx,reset,503'}
    fault: {delay: {fixedDelay: 1s, percentage: {value: 10}}, abort: {httpStatus: 503, percentage: {value: 5}}}
    mirrors: [{destination: {host: ratings}, percentage: {value: 50}}]
    headers: {request: {add: {x-c: d}, remove: [x-e]}, response: {set: {x-f: g}}}
    corsPolicy: {allowOrigins: [{exact: 'https://a.example'}], allowMethods: [GET], maxAge: 24h}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {prefix: /down}}]
    directResponse: {status: 503, body: {string: down}}
  - route: [{destination: {host: reviews}}]
    rewrite: {uriRegexRewrite: {match: '^/x/(.*)', rewrite: '/\\1'}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 0s}, ringHash: {minimumRingSize: 1024}}}
    connectionPool: {tcp: {maxConnections: 100, connectTimeout: 1s}, http: {http1MaxPendingRequests: 10, maxRetries: 3}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings: [{port: {number: 9080}, loadBalancer: {simple: RANDOM}}]
    retryBudget: {percent: {value: 20}, minRetryConcurrency: 3}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {connectionPool: {http: {http2MaxRequests: 5}}}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/productpage]}}]
    to: [{operation: {methods: [GET], paths: ['/reviews/*']}}]
    when: [{key: 'request.headers[x-token]', values: [abc]}]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {selector: {matchLabels: {app: reviews}}, mtls: {mode: STRICT}, portLevelMtls: {9080: {mode: PERMISSIVE}}}
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{randomSamplingPercentage: 10, customTags: {team: {literal: {value: web}}}}]
  accessLogging: [{providers: [{name: envoy}]}]
  metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, tagOverrides: {x: {value: '1'}}}]}]
"""
    )
)

WEIRD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["", "*", "1s", "0s", "-1s", "1.5ms", "abc", "(", "v1", "reviews", "::1", "1e400", "~", "."]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just([None]),
    st.just({"": None}),
)

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def load_or_raise(text: str) -> Snapshot:
    """What serving code does: load, refuse on errors, compile, and exercise the result."""
    result = load_text(text, "fuzz.yaml")
    analyze(result.resources)
    result.raise_for_errors()
    snapshot = Snapshot.build(result.resources, MeshConfig(service="productpage", namespace="shop"))
    for host in (*snapshot.hosts, "reviews", "a.example.com"):
        decision = snapshot.route(
            RequestAttributes("GET", host, "/api/x", query="v=2", headers={"end-user": "jason"})
        )
        if decision.route is not None:
            for dest in decision.route.destinations:
                snapshot.endpoints(dest.host, dest.subset, dest.port)
                snapshot.traffic_policy(dest.host, dest.subset, dest.port)
    return snapshot


def outcome(text: str) -> None:
    try:
        assert isinstance(load_or_raise(text), Snapshot)
    except PolicyError as error:
        assert error.diagnostics and all(d.severity == "error" for d in error.diagnostics)
        assert str(error)


def test_seeds_are_valid() -> None:
    """The mutation seeds themselves load cleanly (so mutations start from valid policy)."""
    text = yaml.safe_dump_all(SEEDS)
    assert load_or_raise(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    """Arbitrary text, mostly not YAML at all, gives a Snapshot or a PolicyError."""
    outcome(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(JSONISH, min_size=1, max_size=3))
def test_arbitrary_yaml_documents(documents: list[Any]) -> None:
    """Arbitrary YAML documents give a Snapshot or a PolicyError."""
    outcome(yaml.safe_dump_all(documents))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*prefix, index))
    return out


@st.composite
def mutated_resource(draw: st.DrawFn) -> Any:
    resource = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p in _paths(resource) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = resource
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add-key", "duplicate"]))
        last = path[-1]
        if action == "replace":
            parent[last] = copy.deepcopy(draw(WEIRD_VALUES))
        elif action == "delete":
            del parent[last]
        elif action == "add-key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = copy.deepcopy(draw(WEIRD_VALUES))
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
    return resource


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_resource(), min_size=1, max_size=3))
def test_mutated_valid_resources(resources: list[Any]) -> None:
    """Random mutations of valid resources give a Snapshot or a PolicyError."""
    outcome(yaml.safe_dump_all(resources, allow_unicode=True))
