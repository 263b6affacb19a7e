"""Validation that agrees with istiod's webhook (pkg/config/validation): cases where meshlib
once disagreed with it, each with the severity Istio gives (error, warning, or nothing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshlib.config import MeshConfig
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.routes import RetryPolicy
from meshlib.policy.snapshot import Snapshot
from tests.dataplane.test_routing import plan, snapshot_for
from tests.policy.test_validation import (
    check_error,
    check_valid,
    dr,
    dump,
    load,
    resource,
    se,
    single_error,
    vs_http,
    vs_route,
)

# --------------------------------------------------------------------------------------
# Hosts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        pytest.param(resource("DestinationRule", "host: 10.0.0.1"), "spec.host", 6, id="dr"),
        pytest.param(
            se("hosts: [10.0.0.1]\nports: [{number: 80, name: http}]"), "spec.hosts[0]", 6, id="se"
        ),
        pytest.param(
            vs_http("- route: [{destination: {host: 10.0.0.1}}]"),
            "spec.http[0].route[0].destination.host",
            8,
            id="destination",
        ),
        pytest.param(resource("DestinationRule", "host: '::1'"), "spec.host", 6, id="dr-ipv6"),
    ],
)
def test_an_ip_address_is_not_a_host_outside_virtual_service_hosts(
    text: str, field: str, line: int
) -> None:
    """Istio's validateWildcardDomain refuses an IP (an all-numeric top-level label), and only
    VirtualService hosts fall back to accepting one."""
    check_error(text, field, line, "an IP address is not allowed here")


@pytest.mark.parametrize(
    ("name", "valid"),
    [("a" * 63 + ".b" * 96, True), ("a" * 63 + ".b" * 96 + ".", False)],
    ids=["255", "256-with-trailing-dot"],
)
def test_the_255_character_limit_on_hosts_counts_a_trailing_dot(name: str, valid: bool) -> None:
    """Istio's CheckDNS1123Preconditions measures the name as written, trailing dot included,
    as gateway names are measured."""
    text = resource("DestinationRule", f"host: {name}")
    if valid:
        check_valid(text)
    else:
        check_error(text, "spec.host", 6, "invalid host")


def test_a_virtual_service_host_may_be_an_ip_address() -> None:
    """VirtualService hosts accept IP addresses, as Istio's ValidateVirtualService does."""
    check_valid(vs_http("- route: [{destination: {host: r}}]", hosts="[10.0.0.1, '::1']"))


@pytest.mark.parametrize(
    ("hosts", "errors"),
    [
        pytest.param("['*.example.com', a.example.com]", 1, id="wildcard-covers-name"),
        pytest.param("[a.example.com, '*.example.com']", 1, id="name-then-wildcard"),
        pytest.param("['*.example.com', '*.com']", 1, id="wildcard-covers-wildcard"),
        pytest.param("[a, a]", 1, id="literal"),
        pytest.param("['*.a.com', b.com, '*.b.com']", 0, id="disjoint"),
        pytest.param("['*.com', a.com, b.com]", 2, id="one-error-a-pair"),
    ],
)
def test_overlapping_virtual_service_hosts_are_duplicates(hosts: str, errors: int) -> None:
    """Hosts of one VirtualService that one wildcard covers are duplicates, one error a
    pair, as Istio's host.Name.Matches finds them."""
    result = load(vs_http("- route: [{destination: {host: r}}]", hosts=hosts))
    assert len(result.errors) == errors, dump(result)
    assert all("duplicate hosts" in d.message for d in result.errors)


# --------------------------------------------------------------------------------------
# Delegate VirtualServices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        pytest.param("gateways: [mesh]\n", "spec.gateways", id="gateways"),
        pytest.param("tcp: [{route: [{destination: {host: r}}]}]\n", "spec.tcp", id="tcp"),
        pytest.param(
            "tls: [{match: [{sniHosts: [r]}], route: [{destination: {host: r}}]}]\n",
            "spec.tls",
            id="tls",
        ),
    ],
)
def test_a_delegate_virtual_service_cannot_set_gateways_tcp_or_tls(extra: str, field: str) -> None:
    """A VirtualService without hosts is a delegate: Istio rejects gateways, tcp and tls
    routes on it (they would be meaningless under a root's http route)."""
    text = resource("VirtualService", f"{extra}http: [{{route: [{{destination: {{host: r}}}}]}}]")
    check_error(text, field, 6, "a delegate VirtualService (no hosts) cannot set it")


# --------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------

FAULTS = """
- route: [{destination: {host: r}}]
  fault:
    delay: {percentage: {value: 100}}
    abort: {percentage: {value: 100}}
"""


def test_a_fault_without_fixed_delay_or_error_type_loads_with_warnings() -> None:
    """Istio accepts a delay without fixedDelay and only warns about an abort without
    httpStatus/grpcStatus; pilot leaves both out of the route, so meshlib warns that they do
    nothing."""
    result = load(vs_http(FAULTS))
    assert result.errors == (), dump(result)
    assert [(d.field, d.line) for d in result.warnings] == [
        ("spec.http[0].fault.delay", 10),
        ("spec.http[0].fault.abort", 11),
    ]
    assert "does nothing" in result.warnings[0].message
    assert "httpStatus or grpcStatus" in result.warnings[1].message


def test_a_fault_without_fixed_delay_or_error_type_neither_delays_nor_aborts() -> None:
    """At runtime such a delay and abort are no fault at all, as Envoy's route has none."""
    snapshot = snapshot_for(FAULTS.replace("host: r", "host: reviews"))
    decided = plan(snapshot)
    assert (decided.fault_delay, decided.fault_abort) == (None, None)


# --------------------------------------------------------------------------------------
# Mirroring
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        pytest.param(
            "mirrorPercentage: {value: 5}", "spec.http[0].mirrorPercentage", id="percentage"
        ),
        pytest.param("mirrorPercent: 5", "spec.http[0].mirrorPercent", id="percent"),
        pytest.param(
            "mirrors: [{destination: {host: r}}]\n  mirrorPercentage: {value: 5}",
            "spec.http[0].mirrorPercentage",
            id="with-mirrors",
        ),
    ],
)
def test_a_mirror_percentage_without_mirror_loads_with_a_warning(extra: str, field: str) -> None:
    """Istio accepts mirrorPercentage without `mirror` (it then mirrors nothing): a warning,
    where meshlib once refused the resource."""
    result = load(vs_http(f"- route: [{{destination: {{host: r}}}}]\n  {extra}"))
    assert result.errors == (), dump(result)
    assert len(result.resources) == 1
    assert field in [d.field for d in result.warnings if "without mirror" in d.message]


def test_mirror_percent_is_deprecated() -> None:
    """`mirrorPercent` loads with Istio's deprecation warning naming mirrorPercentage."""
    result = load(
        vs_http("- route: [{destination: {host: r}}]\n  mirror: {host: r}\n  mirrorPercent: 5")
    )
    assert result.errors == (), dump(result)
    assert [(d.field, d.line, d.message) for d in result.warnings] == [
        (
            "spec.http[0].mirrorPercent",
            10,
            'using deprecated setting "mirrorPercent", use "mirrorPercentage" instead',
        )
    ]


# --------------------------------------------------------------------------------------
# DestinationRule
# --------------------------------------------------------------------------------------


def test_a_duplicate_port_level_port_is_a_warning() -> None:
    """Istio accepts two port-level settings for one port (pilot applies the first): a
    warning, where meshlib once refused the DestinationRule."""
    text = dr(
        """
        portLevelSettings:
        - {port: {number: 8080}, tls: {mode: DISABLE}}
        - {port: {number: 8080}, tls: {mode: SIMPLE}}
        """
    )
    result = load(text)
    assert result.errors == (), dump(result)
    assert [(d.field, d.line) for d in result.warnings] == [
        ("spec.trafficPolicy.portLevelSettings[1].port", 10)
    ]
    assert "duplicate port 8080: only the first entry" in result.warnings[0].message


def test_a_port_level_setting_without_a_policy_block_is_an_error() -> None:
    """Istio: "port traffic policy must have at least one field"."""
    check_error(
        dr("portLevelSettings: [{port: {number: 8080}}]"),
        "spec.trafficPolicy.portLevelSettings[0]",
        8,
        "a port-level setting needs loadBalancer, connectionPool, outlierDetection or tls",
    )


@pytest.mark.parametrize(
    ("size", "valid"),
    [(1, True), (2, True), (3, True), (4, False), (9, False), (65537, True), (5000011, False)],
)
def test_maglev_table_size_is_prime_as_envoy_counts_primes(size: int, valid: bool) -> None:
    """Istio checks tableSize with Envoy's isPrime, which takes 1 (and 2, 3) as prime."""
    result = load(
        dr(
            f"loadBalancer: {{consistentHash: {{useSourceIp: true, maglev: {{tableSize: {size}}}}}}}"
        )
    )
    assert (result.errors == ()) is valid, dump(result)


def test_top_level_minimum_ring_size_is_deprecated() -> None:
    """consistentHash.minimumRingSize loads with Istio's deprecation warning."""
    result = load(dr("loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 64}}"))
    assert result.errors == (), dump(result)
    assert [(d.field, d.line) for d in result.warnings] == [
        ("spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize", 8)
    ]
    assert "deprecated, use ringHash.minimumRingSize" in result.warnings[0].message


# --------------------------------------------------------------------------------------
# Integer fields: the range of their protobuf type
# --------------------------------------------------------------------------------------

INT32_MAX, UINT32_MAX = 2**31 - 1, 2**32 - 1


@pytest.mark.parametrize(
    ("make", "field", "largest", "kind"),
    [
        pytest.param(
            lambda n: dr(f"connectionPool: {{tcp: {{maxConnections: {n}}}}}"),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            INT32_MAX,
            "int32",
            id="maxConnections",
        ),
        pytest.param(
            lambda n: dr(f"connectionPool: {{http: {{maxRequestsPerConnection: {n}}}}}"),
            "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
            INT32_MAX,
            "int32",
            id="maxRequestsPerConnection",
        ),
        pytest.param(
            lambda n: dr(f"connectionPool: {{tcp: {{tcpKeepalive: {{probes: {n}}}}}}}"),
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.probes",
            UINT32_MAX,
            "uint32",
            id="probes",
        ),
        pytest.param(
            lambda n: dr(f"outlierDetection: {{consecutive5xxErrors: {n}}}"),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            UINT32_MAX,
            "uint32",
            id="consecutive5xxErrors",
        ),
        pytest.param(
            lambda n: vs_http(
                f"- route: [{{destination: {{host: r}}}}]\n  retries: {{attempts: {n}}}"
            ),
            "spec.http[0].retries.attempts",
            INT32_MAX,
            "int32",
            id="attempts",
        ),
        pytest.param(
            lambda n: vs_http(f"- route: [{{destination: {{host: r}}, weight: {n}}}]"),
            "spec.http[0].route[0].weight",
            INT32_MAX,
            "int32",
            id="weight",
        ),
        pytest.param(
            lambda n: resource("WorkloadEntry", f"address: 10.0.0.1\nweight: {n}"),
            "spec.weight",
            UINT32_MAX,
            "uint32",
            id="endpoint-weight",
        ),
    ],
)
def test_integers_are_checked_against_their_protobuf_type(
    make: Callable[[int], str], field: str, largest: int, kind: str
) -> None:
    """Istio decodes a resource into protobuf, which refuses an integer beyond its field's
    type (`maxConnections: 99999999999` in an int32): an error at the field's line."""
    check_valid(make(largest))
    error = check_error(make(largest + 1), field, _line_of(make(largest + 1), field), "must be <=")
    assert error.message == f"must be <= {largest} (the {kind} range)"


def test_the_deprecated_minimum_ring_size_is_a_uint64() -> None:
    """consistentHash.minimumRingSize has no bound but its type's: 2**64 does not fit."""
    field = "loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: %d}}"
    assert load(dr(field % (2**64 - 1))).errors == ()
    error = single_error(load(dr(field % 2**64)))
    assert error.field == "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize"
    assert error.message == f"must be <= {2**64 - 1} (the uint64 range)"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        pytest.param(99, "must be >= 100 (an HTTP status code)", id="99"),
        pytest.param(600, "must be <= 599 (an HTTP status code)", id="600"),
        pytest.param(-1, "must be >= 100 (an HTTP status code)", id="negative"),
        pytest.param(2**32, "must be <= 599 (an HTTP status code)", id="beyond-uint32"),
    ],
)
def test_outlier_detection_http_error_codes_are_http_status_codes(code: int, message: str) -> None:
    """Istio's CRD bounds each outlierDetectionHttpErrorCodes item to 100-599 (the API server
    refuses any other on apply): an error naming the item, at its line."""
    check_valid(dr("outlierDetection:\n  outlierDetectionHttpErrorCodes: [100, 429, 599]"))
    text = dr(f"outlierDetection:\n  outlierDetectionHttpErrorCodes:\n  - 503\n  - {code}")
    error = check_error(
        text,
        "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes[1]",
        11,
        "must be",
    )
    assert error.message == message
    assert error.resource == "DestinationRule default/r"


def _line_of(text: str, field: str) -> int:
    """The line of the last key of `field` in `text` (each test text names it once)."""
    key = field.rsplit(".", 1)[-1].split("[")[0]
    return next(i for i, line in enumerate(text.splitlines(), 1) if f"{key}:" in line)


# --------------------------------------------------------------------------------------
# Kubernetes labels and subset names
# --------------------------------------------------------------------------------------

LABEL_PLACES = [
    pytest.param(
        lambda labels: resource(
            "DestinationRule", f"host: r\nsubsets: [{{name: v1, labels: {labels}}}]"
        ),
        "spec.subsets[0].labels",
        id="subset",
    ),
    pytest.param(
        lambda labels: vs_http(
            f"- match: [{{sourceLabels: {labels}}}]\n  route: [{{destination: {{host: r}}}}]"
        ),
        "spec.http[0].match[0].sourceLabels",
        id="source-labels",
    ),
    pytest.param(
        lambda labels: resource("WorkloadEntry", f"address: 10.0.0.1\nlabels: {labels}"),
        "spec.labels",
        id="workload-entry",
    ),
    pytest.param(
        lambda labels: se(
            "hosts: [a.example.com]\nports: [{number: 80, name: http}]\nresolution: STATIC\n"
            f"endpoints: [{{address: 10.0.0.1, labels: {labels}}}]"
        ),
        "spec.endpoints[0].labels",
        id="service-entry-endpoint",
    ),
]


@pytest.mark.parametrize(("build", "field"), LABEL_PLACES)
@pytest.mark.parametrize(
    "labels",
    [
        "{'a b': x}",
        "{'-app': x}",
        "{'app.': x}",
        "{'example.com/': x}",
        "{'a/b/c': x}",
        "{'-x.com/app': x}",
        "{'" + "a" * 64 + "': x}",
        "{app: 'a b'}",
        "{app: '-v1'}",
        "{app: 'v1.'}",
    ],
)
def test_labels_that_are_not_kubernetes_labels_are_errors(
    build: Callable[[str], str], field: str, labels: str
) -> None:
    """Label keys and values must be Kubernetes label syntax, as Istio's
    labels.Instance.Validate requires, wherever policy names labels."""
    result = load(build(labels))
    assert len(result.errors) == 1, dump(result)
    assert result.errors[0].field is not None and result.errors[0].field.startswith(field)
    assert "invalid label" in result.errors[0].message


@pytest.mark.parametrize(("build", "field"), LABEL_PLACES)
def test_kubernetes_labels_load(build: Callable[[str], str], field: str) -> None:
    """A DNS prefix, dots and underscores in names, an empty value and a long value (Istio
    does not limit a value's length) are valid."""
    labels = "{'app.kubernetes.io/name': x, my_key.v2: A-b_c.1, empty: '', long: " + "v" * 80 + "}"
    result = load(build(labels))
    assert result.errors == (), dump(result)


@pytest.mark.parametrize("name", ["V_1", "v1.0", "-v1", "v" * 64, "''"])
def test_a_subset_name_must_be_a_dns_label(name: str) -> None:
    """Istio's validateSubsetName: a DNS-1123 label."""
    text = resource("DestinationRule", f"host: r\nsubsets: [{{name: {name}}}]")
    check_error(text, "spec.subsets[0].name", 7, "invalid subset name")


# --------------------------------------------------------------------------------------
# AuthorizationPolicy
# --------------------------------------------------------------------------------------


def authz(spec: str) -> str:
    return resource("AuthorizationPolicy", spec)


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        pytest.param("action: CUSTOM", "spec", "CUSTOM action without rules", id="custom-alone"),
        pytest.param(
            "action: CUSTOM\nrules: [{}]",
            "spec.provider",
            "is required",
            id="custom-no-provider",
        ),
        pytest.param(
            "action: CUSTOM\nprovider: {name: ''}\nrules: [{}]",
            "spec.provider.name",
            "must not be empty",
            id="custom-empty-provider",
        ),
        pytest.param(
            "targetRef: {kind: Service}\nrules: [{}]",
            "spec.targetRef.name",
            "is required",
            id="no-name",
        ),
        pytest.param(
            "targetRef: {kind: Service, name: a, namespace: other}\nrules: [{}]",
            "spec.targetRef.namespace",
            "must not be set",
            id="cross-namespace",
        ),
        pytest.param(
            "targetRef: {kind: Pod, name: a}\nrules: [{}]",
            "spec.targetRef",
            "cannot target core/Pod",
            id="kind",
        ),
        pytest.param(
            "targetRefs: [{group: networking.istio.io, kind: Service, name: a}]\nrules: [{}]",
            "spec.targetRefs[0]",
            "cannot target networking.istio.io/Service",
            id="group",
        ),
        pytest.param(
            "rules: [{to: [{operation: {paths: ['/a/{x}']}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "'{' or '}' other than a whole {*} or {**} segment",
            id="unknown-template",
        ),
        pytest.param(
            "rules: [{to: [{operation: {notPaths: ['/{**}/{*}']}}]}]",
            "spec.rules[0].to[0].operation.notPaths[0]",
            "{**} must be the last operator",
            id="template-after-any",
        ),
        pytest.param(
            "rules: [{to: [{operation: {paths: ['/{*}/a b']}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "not made of URI path characters",
            id="literal-beside-template",
        ),
        pytest.param(
            "rules: [{when: [{key: '', values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "must not be empty",
            id="empty-key",
        ),
        pytest.param(
            "rules: [{when: [{key: 'request.headers[]', values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "unknown attribute",
            id="empty-header-name",
        ),
        pytest.param(
            "rules: [{when: [{key: 'request.headers[x-a]', values: ['']}]}]",
            "spec.rules[0].when[0].values[0]",
            "empty value not allowed",
            id="empty-value",
        ),
        pytest.param(
            "rules: [{when: [{key: source.serviceAccount, values: ['ns/']}]}]",
            "spec.rules[0].when[0].values[0]",
            "expected 'serviceAccount' or 'namespace/serviceAccount'",
            id="service-account",
        ),
    ],
)
def test_authorization_policy_errors_as_istio(spec: str, field: str, fragment: str) -> None:
    """One error each, as Istio's ValidateAuthorizationPolicy reports them, on the line of
    the field (or of its closest ancestor the YAML has)."""
    line = {"spec": 5, "spec.provider": 5, "spec.provider.name": 7}.get(field, 6)
    check_error(authz(spec), field, line, fragment)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("targetRef: {kind: Service, name: a}", id="service"),
        pytest.param("targetRef: {group: core, kind: Service, name: a}", id="core-group"),
        pytest.param(
            "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: a},"
            " {group: networking.istio.io, kind: ServiceEntry, name: b}]",
            id="gateway-and-service-entry",
        ),
        pytest.param(
            "rules: [{to: [{operation: {paths: ['/a/{*}/b/{**}', '/{**}/x.m3u8', /c/*]}}]}]",
            id="path-templates",
        ),
        pytest.param(
            "rules: [{when: [{key: 'request.headers[x-a b]', values: [a]},"
            " {key: 'request.experimental.inline.headers[x-b]', values: [b]},"
            " {key: source.serviceAccount, values: [ns/sa, sa]}]}]",
            id="condition-keys",
        ),
    ],
)
def test_authorization_policies_istio_accepts(spec: str) -> None:
    """targetRefs to a Service, ServiceEntry or Gateway; `{*}`/`{**}` path templates; header
    conditions (Istio checks only the a[b] form of the key)."""
    if "rules" not in spec:
        spec += "\nrules: [{}]"
    check_valid(authz(spec))


# --------------------------------------------------------------------------------------
# ServiceEntry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["*foo.example.com", "*-foo.example.com"])
def test_a_partial_wildcard_service_entry_host_is_a_warning(host: str) -> None:
    """Istio warns about (and accepts) a ServiceEntry host whose wildcard is not `*.`."""
    result = load(se(f"hosts: ['{host}']\nports: [{{number: 80, name: http}}]"))
    assert result.errors == (), dump(result)
    assert [(d.field, d.line, d.message) for d in result.warnings] == [
        ("spec.hosts[0]", 6, f"partial wildcard {host!r} not allowed")
    ]


VM_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: vm}}
spec:
  hosts: [vm.example.internal]
  location: MESH_INTERNAL
  {resolution}
  ports: [{{number: 8080, name: http}}]
  workloadSelector: {{labels: {{app: vm}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm-1}}
spec: {{address: 10.1.1.1, labels: {{app: vm}}}}
"""


@pytest.mark.parametrize("resolution", ["resolution: NONE", ""])
def test_resolution_none_ignores_the_workload_selector(resolution: str) -> None:
    """With resolution NONE (the default) Envoy sends requests to their original
    destination, so the WorkloadEntries a selector picks are not endpoints; Istio warns."""
    result = load(VM_ENTRY.format(resolution=resolution))
    assert result.errors == (), dump(result)
    assert [d.field for d in result.warnings] == ["spec.workloadSelector"]
    assert "should not be set when resolution is NONE" in result.warnings[0].message
    snapshot = Snapshot.build(result.resources, MeshConfig())
    endpoints = snapshot.endpoints("vm.example.internal", None, 8080)
    assert [str(e) for e in endpoints] == ["vm.example.internal:8080"]


@pytest.mark.parametrize(
    ("selector", "errors"),
    [("{labels: {app: '*'}}", 1), ("{labels: {'': vm}}", 1), ("{}", 0)],
)
def test_service_entry_workload_selector_labels(selector: str, errors: int) -> None:
    """A wildcard or an empty key in the selector is an error; no labels, a warning."""
    text = se(
        "hosts: [a.example.com]\nports: [{number: 80, name: http}]\nresolution: STATIC\n"
        f"workloadSelector: {selector}"
    )
    result = load(text)
    assert len(result.errors) == errors, dump(result)
    if not errors:
        assert "without labels" in result.warnings[0].message


# --------------------------------------------------------------------------------------
# CORS
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cors",
    [
        "{allowOrigins: [{exact: '*'}]}",
        "{allowOrigin: ['*']}",
        "{allowOrigins: [{regex: '.*'}, {prefix: 'https://'}]}",
        "{allowHeaders: ['*', x-user], exposeHeaders: ['*']}",
    ],
)
def test_cors_policies_istio_accepts(cors: str) -> None:
    """`exact: '*'` (and the deprecated allowOrigin `*`) allow any origin, as in Istio."""
    check_valid(vs_route(f"corsPolicy: {cors}"))


@pytest.mark.parametrize(
    ("cors", "field", "fragment"),
    [
        ("{allowOrigins: [{}]}", "allowOrigins[0]", "needs a non-empty exact, prefix or regex"),
        ("{allowOrigins: [{exact: ''}]}", "allowOrigins[0]", "needs a non-empty"),
        ("{allowOrigins: [{regex: '*'}]}", "allowOrigins[0].regex", "'*' is not a regex"),
        ("{allowHeaders: ['a b']}", "allowHeaders[0]", "invalid header name 'a b'"),
        ("{exposeHeaders: ['x:y']}", "exposeHeaders[0]", "invalid header name 'x:y'"),
        ("{maxAge: 0s}", "maxAge", "must be at least 1ms"),
    ],
)
def test_cors_errors_as_istio(cors: str, field: str, fragment: str) -> None:
    """Istio's validateCORSPolicy: origins need a non-empty match (a regex must compile),
    header names are `[-_A-Za-z0-9]+` or `*`, maxAge is a duration of at least 1ms."""
    check_error(vs_route(f"corsPolicy: {cors}"), f"spec.http[0].corsPolicy.{field}", 9, fragment)


# --------------------------------------------------------------------------------------
# Workload selectors (istio.type.v1beta1.WorkloadSelector)
# --------------------------------------------------------------------------------------

SELECTED_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: r}}
spec:
  host: r
  workloadSelector: {{{selector}}}
  trafficPolicy: {{loadBalancer: {{simple: RANDOM}}}}
"""


def test_a_destination_rule_selects_workloads_with_match_labels() -> None:
    """A DestinationRule's workloadSelector is a v1beta1 WorkloadSelector (`matchLabels`),
    and applies only to the workloads it selects."""
    result = load(SELECTED_RULE.format(selector="matchLabels: {app: a}"))
    assert result.diagnostics == (), dump(result)
    host = "r.default.svc.cluster.local"
    chosen = Snapshot.build(result.resources, MeshConfig(service="a", labels={"app": "a"}))
    other = Snapshot.build(result.resources, MeshConfig(service="b", labels={"app": "b"}))
    assert chosen.destination_policy(host) is not None
    assert other.destination_policy(host) is None


def test_a_destination_rule_selector_with_labels_is_an_unknown_field() -> None:
    """`labels` is a ServiceEntry selector's spelling; Kubernetes would not keep it here."""
    check_error(
        SELECTED_RULE.format(selector="labels: {app: a}"),
        "spec.workloadSelector.labels",
        7,
        "unknown field",
    )


@pytest.mark.parametrize(
    "kind_and_spec",
    [
        ("AuthorizationPolicy", "rules: [{}]"),
        ("PeerAuthentication", "mtls: {mode: STRICT}"),
        ("Telemetry", "tracing: [{randomSamplingPercentage: 10}]"),
        ("DestinationRule", "host: r"),
    ],
)
@pytest.mark.parametrize(
    ("labels", "errors"), [("{app: '*'}", 1), ("{'': a}", 1), ("{app: 'a*'}", 1), ("{}", 0)]
)
def test_match_labels_selectors_as_istio(
    kind_and_spec: tuple[str, str], labels: str, errors: int
) -> None:
    """Istio's validateWorkloadSelector: no wildcard and no empty key (errors); no labels at
    all selects every workload (a warning)."""
    kind, spec = kind_and_spec
    key = "workloadSelector" if kind == "DestinationRule" else "selector"
    result = load(resource(kind, f"{spec}\n{key}: {{matchLabels: {labels}}}"))
    assert len(result.errors) == errors, dump(result)
    if not errors:
        assert [d.field for d in result.warnings] == [f"spec.{key}"]


# --------------------------------------------------------------------------------------
# Routes that delegate, and delegate VirtualServices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "delegate"])
def test_regex_matches_where_routes_delegate_load(where: str) -> None:
    """Istio's current validateHTTPRouteMatchRequest checks every route alike: a regex match
    in a route with `delegate` or in a delegate VirtualService is valid (pilot's merge then
    drops a delegate route whose match does not fit the root's)."""
    match = "{uri: {regex: '/a.*'}, headers: {x-a: {regex: 'a.*'}}}"
    if where == "root":
        text = vs_http(f"- match: [{match}]\n  delegate: {{name: child}}")
    else:
        text = vs_http(f"- match: [{match}]\n  route: [{{destination: {{host: r}}}}]", hosts="[]")
    check_valid(text)


def test_without_headers_names_are_checked_in_every_route() -> None:
    """withoutHeaders names are header names (or JWT claims), as Istio checks them."""
    check_error(
        vs_http("- match: [{withoutHeaders: {x.a: {}}}]\n  route: [{destination: {host: r}}]"),
        "spec.http[0].match[0].withoutHeaders['x.a']",
        8,
        "invalid header name 'x.a'",
    )


# --------------------------------------------------------------------------------------
# Gateway names, direct responses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateways", "errors", "warnings"),
    [
        ("[mesh]", 0, 0),
        ("[istio-system/ingress, mesh]", 0, 0),
        ("[ingress.istio-system]", 0, 1),
        ("['ns/GW_1']", 1, 0),
        ("['/gw']", 2, 0),
        ("['bad_ns/gw']", 1, 0),
        ("['a..b']", 1, 1),
        ("[mesh, 'ns/GW_1']", 0, 0),  # Istio stops at the first legacy-form name
    ],
)
def test_gateway_names_as_istio(gateways: str, errors: int, warnings: int) -> None:
    """Gateways are `namespace/name` or a DNS name (`mesh`; `gw.ns` is the legacy form, a
    warning), at the VirtualService and in match blocks."""
    for text in (
        vs_http("- route: [{destination: {host: r}}]", extra=f"gateways: {gateways}\n"),
        vs_http(f"- match: [{{gateways: {gateways}}}]\n  route: [{{destination: {{host: r}}}}]"),
    ):
        result = load(text)
        assert (len(result.errors), len(result.warnings)) == (errors, warnings), dump(result)


@pytest.mark.parametrize(
    ("size", "errors", "warnings"),
    [(100 * 1024, 0, 0), (100 * 1024 + 1, 0, 1), (1024 * 1024 + 1, 1, 0)],
)
def test_direct_response_body_size(size: int, errors: int, warnings: int) -> None:
    """Istio refuses a direct response body over 1MB and warns over 100KB."""
    result = load(vs_http(f"- directResponse: {{status: 200, body: {{string: '{'a' * size}'}}}}"))
    assert (len(result.errors), len(result.warnings)) == (errors, warnings), dump(result)


# --------------------------------------------------------------------------------------
# WorkloadEntry, ServiceEntry ports
# --------------------------------------------------------------------------------------


def test_a_workload_entry_port_name_must_be_a_dns_label() -> None:
    """Istio's validateWorkloadEntry checks each port name with ValidatePortName."""
    check_error(
        resource("WorkloadEntry", "address: 10.0.0.1\nports: {HTTP_1: 8080}"),
        "spec.ports.HTTP_1",
        7,
        "invalid port name 'HTTP_1'",
    )


def test_target_port_with_resolution_none_is_a_warning_and_unused() -> None:
    """With resolution NONE the original destination's port is used: Istio warns that
    targetPort has no effect, and meshlib sends to the port the request named."""
    text = se("hosts: [a.example.com]\nports: [{number: 80, name: http, targetPort: 8080}]")
    result = load(text)
    assert result.errors == (), dump(result)
    assert [(d.field, d.line) for d in result.warnings] == [("spec.ports[0].targetPort", 7)]
    snapshot = Snapshot.build(result.resources, MeshConfig())
    assert [str(e) for e in snapshot.endpoints("a.example.com", None, 80)] == ["a.example.com:80"]


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        pytest.param(
            se(
                "hosts: [a.example.com]\nresolution: DNS\nports: [{number: 80, name: http, targetPort: 0}]"
            ),
            "spec.ports[0].targetPort",
            "must be >= 1",
            id="target-port-0",
        ),
        pytest.param(
            resource(
                "PeerAuthentication",
                "selector: {matchLabels: {app: a}}\nmtls: {mode: STRICT}\nportLevelMtls: {}",
                api="security.istio.io/v1",
            ),
            "spec.portLevelMtls",
            "must have at least one port",
            id="empty-port-level-mtls",
        ),
    ],
)
def test_zero_values_istio_refuses_though_they_read_as_unset(
    text: str, field: str, fragment: str
) -> None:
    """`targetPort: 0` fails the CRD's rule (0 < self), though istiod's own check skips 0;
    `portLevelMtls: {}` fails istiod's ("if defined, must have at least one element")."""
    check_error(text, field, _line_of(text, field), fragment)


@pytest.mark.parametrize(
    ("rules", "warned"),
    [
        ("[{to: [{operation: {methods: [GET]}}]}]", True),
        ("[{from: [{source: {requestPrincipals: ['*']}}]}]", True),
        ("[{to: [{operation: {methods: [GET], ports: ['8080']}}]}]", False),
        ("[{from: [{source: {namespaces: [a]}}]}]", False),
        ("[{from: [{source: {ipBlocks: [10.0.0.0/8]}}], to: [{operation: {paths: [/a]}}]}]", True),
        ("[{when: [{key: 'request.headers[x-a]', values: [a]}]}]", False),
    ],
)
def test_a_deny_rule_with_only_http_attributes_is_a_warning(rules: str, warned: bool) -> None:
    """Istio warns that such a DENY rule denies all TCP traffic under its scope."""
    result = load(authz(f"action: DENY\nrules: {rules}"))
    assert result.errors == (), dump(result)
    assert [d.field for d in result.warnings] == (["spec.rules[0]"] if warned else [])


# --------------------------------------------------------------------------------------
# Smaller checks Istio makes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        pytest.param(
            resource("WorkloadEntry", "address: unix://relative/sock"),
            "spec.address",
            "not an absolute path to a file",
            id="unix-relative",
        ),
        pytest.param(
            se(
                "hosts: [a.example.com]\nports: [{number: 80, name: http}, {number: 81, name: h2}]\n"
                "resolution: STATIC\nendpoints: [{address: 'unix:///tmp/s'}]"
            ),
            "spec.endpoints[0].address",
            "a unix endpoint needs exactly 1 service port",
            id="unix-two-ports",
        ),
        pytest.param(
            dr("loadBalancer: {consistentHash: {httpCookie: {name: '', ttl: 0s}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            "a cookie name is required",
            id="cookie-name",
        ),
        pytest.param(
            dr("tls: {mode: SIMPLE, credentialName: c, caCertificates: /ca.pem}"),
            "spec.trafficPolicy.tls",
            "caCertificates cannot be given with credentialName",
            id="credential-and-files",
        ),
        pytest.param(
            resource("Telemetry", "tracing: [{customTags: {'': {literal: {value: a}}}}]"),
            "spec.tracing[0].customTags['']",
            "a tag name may not be empty",
            id="empty-tag-name",
        ),
    ],
)
def test_smaller_errors_as_istio(text: str, field: str, fragment: str) -> None:
    """One error each, as Istio's webhook gives."""
    result = load(text)
    assert len(result.errors) == 1, dump(result)
    assert (result.errors[0].field, fragment in result.errors[0].message) == (field, True)


def test_duplicate_hosts_are_checked_only_when_every_host_is_valid() -> None:
    """Istio looks for duplicate hosts only when all hosts are valid: one error here."""
    result = load(vs_http("- route: [{destination: {host: r}}]", hosts="[a, a, 'bad_host']"))
    assert [d.field for d in result.errors] == ["spec.hosts[2]"], dump(result)


def test_a_legacy_gateway_name_may_end_with_a_dot() -> None:
    """A fully qualified name (`gw.ns.`) is a valid legacy gateway name: only the warning."""
    result = load(vs_http("- route: [{destination: {host: r}}]", extra="gateways: [gw.ns.]\n"))
    assert (len(result.errors), len(result.warnings)) == (0, 1), dump(result)


def test_maglev_table_size_zero_is_unset_and_not_prime() -> None:
    """`tableSize: 0` is proto3's unset value, and 0 is not prime: Istio reports both."""
    result = load(dr("loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 0}}}"))
    assert [d.message.split(" (")[0] for d in result.errors] == [
        "must be set for maglev",
        "must be a prime number below 5000011",
    ], dump(result)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param(
            vs_route("rewrite: {uriRegexRewrite: {match: '/a', rewrite: ''}}"),
            "spec.http[0].rewrite.uriRegexRewrite.rewrite",
            id="regex-rewrite-empty-rewrite",
        ),
        pytest.param(
            vs_route("rewrite: {uriRegexRewrite: {match: '', rewrite: /b}}"),
            "spec.http[0].rewrite.uriRegexRewrite.match",
            id="regex-rewrite-empty-match",
        ),
        pytest.param(
            dr("connectionPool: {tcp: {idleTimeout: 0s}}"),
            "spec.trafficPolicy.connectionPool.tcp.idleTimeout",
            id="tcp-idle-timeout-0s",
        ),
        pytest.param(
            dr("loadBalancer: {warmupDurationSecs: 0s}"),
            "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
            id="warmup-0s",
        ),
    ],
)
def test_more_errors_as_istio(text: str, field: str) -> None:
    """uriRegexRewrite needs both fields non-empty; tcp.idleTimeout and warmupDurationSecs
    are durations of at least 1ms (Istio's ValidateDuration)."""
    result = load(text)
    assert [d.field for d in result.errors] == [field], dump(result)


def test_empty_subset_and_port_zero_are_unset() -> None:
    """Istio reads `subset: ''` and a match `port: 0` as unset (proto3 defaults): valid, and
    they neither pick a subset nor restrict the port."""
    result = check_valid(
        vs_http("- match: [{port: 0}]\n  route: [{destination: {host: r, subset: ''}}]")
    )
    route = result.resources[0].spec.http[0]
    assert (route.match[0].port, route.route[0].destination.subset) == (None, None)


def test_an_empty_retry_on_is_unset() -> None:
    """`retryOn: ''` (a Helm value left empty) is proto3's unset string: Istio's
    validateHTTPRetry skips it and pilot keeps its default retry conditions."""
    result = check_valid(vs_route("retries: {attempts: 2, retryOn: ''}"))
    assert result.resources[0].spec.http[0].retries.retry_on is None
    snapshot = Snapshot.build(result.resources, MeshConfig())
    route = snapshot.route(RequestAttributes("GET", "r")).route
    assert route is not None and route.retries is not None
    default = RetryPolicy.resolve(None)
    assert default is not None and route.retries.retry_on == default.retry_on


def test_an_empty_source_namespace_is_unset() -> None:
    """`sourceNamespace: ''` is unset (Istio checks the name only when it is not empty): the
    block applies to callers in every namespace."""
    result = check_valid(
        vs_http(
            "- match: [{sourceNamespace: ''}]\n  route: [{destination: {host: r, subset: a}}]\n"
            "- route: [{destination: {host: r, subset: b}}]"
        )
    )
    assert result.resources[0].spec.http[0].match[0].source_namespace is None
    snapshot = Snapshot.build(result.resources, MeshConfig(namespace="shop"))
    route = snapshot.route(RequestAttributes("GET", "r.default")).route
    assert route is not None and route.destinations[0].subset == "a"


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        (
            "tracing: [{randomSamplingPercentage: 1}, {randomSamplingPercentage: 2}]",
            "spec.tracing",
            "multiple tracing",
        ),
        (
            "tracing: [{providers: [{name: a}, {name: b}]}]",
            "spec.tracing[0].providers",
            "multiple providers",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {'': {operation: REMOVE}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides['']",
            "may not be empty",
        ),
    ],
)
def test_telemetry_warnings_as_istio(spec: str, field: str, fragment: str) -> None:
    """Istio's validateTelemetryTracing/Metrics warnings."""
    result = load(resource("Telemetry", spec))
    assert result.errors == (), dump(result)
    assert [(d.field, fragment in d.message) for d in result.warnings] == [(field, True)]
