"""Validation that agrees with istiod's webhook (pkg/config/validation): cases where meshlib
once disagreed with it, each with the severity Istio gives (error, warning, or nothing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.dataplane.test_routing import plan, snapshot_for
from tests.policy.test_validation import (
    check_error,
    check_valid,
    dr,
    dump,
    load,
    resource,
    se,
    vs_http,
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
