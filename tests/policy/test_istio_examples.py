"""Istio's own documented examples (tests/data/istio_examples/, one file per example, each
naming its istio.io page) load in meshlib as Istio reads them: valid YAML is never an error,
what meshlib skips is a warning naming the resource and field, and what it implements means
what Istio means."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshlib.cli import main
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_paths, load_text
from meshlib.policy.snapshot import Snapshot

EXAMPLES = Path(__file__).parent.parent / "data" / "istio_examples"
REGISTRY = EXAMPLES / "registry"
FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
ROOT = Path(__file__).parent.parent.parent

GATEWAY = "ignored: gateways configure ingress/egress proxies, not sidecars"
JWT = "ignored: JWT authentication is not implemented by meshlib yet"
LOCALITY = "ignored: localities do not exist in library mode"
TCP = "ignored: TCP routes need a proxy; meshlib routes HTTP"
LB = "spec.trafficPolicy.loadBalancer.localityLbSetting"

# Every warning each example gets, as (resource, field, start of the message); the other
# examples get none.
WARNINGS: dict[str, list[tuple[str, str | None, str]]] = {
    "authz-deny.yaml": [
        ("AuthorizationPolicy foo/deny-method-get", "spec.rules[0]", "this DENY rule uses only")
    ],
    "authz-jwt.yaml": [("RequestAuthentication foo/jwt-example", None, JWT)],
    "circuit-breaking-as-stored.yaml": [
        (
            "DestinationRule default/httpbin",
            "spec.trafficPolicy.outlierDetection.consecutiveErrors",
            "ignored: consecutiveErrors is deprecated",
        )
    ],
    "egress-control-gateway-api.yaml": [
        ("HTTPRoute default/httpbin-ext", None, "ignored: not an Istio resource")
    ],
    "egress-gateway.yaml": [("Gateway default/istio-egressgateway", None, GATEWAY)],
    "ingress-gateway-httpbin.yaml": [("Gateway default/httpbin-gateway", None, GATEWAY)],
    "locality-distribute.yaml": [("DestinationRule sample/helloworld", LB, LOCALITY)],
    "locality-failover.yaml": [("DestinationRule sample/helloworld", LB, LOCALITY)],
    "mirroring-mirror-percent.yaml": [
        ("VirtualService default/httpbin", "spec.http[0].mirrorPercent", "using deprecated")
    ],
    "mirroring.yaml": [
        (
            "Service default/httpbin",
            None,
            "ignored: meshlib does not read Kubernetes Services; for routes to it to have"
            " endpoints, describe it with a ServiceEntry (hosts:"
            " [httpbin.default.svc.<cluster domain>], with its ports and endpoints)",
        ),
        ("Deployment default/httpbin-v1", None, "ignored: not an Istio resource"),
    ],
    "ref-dr-locality.yaml": [("DestinationRule default/helloworld", LB, LOCALITY)],
    "ref-dr-tunnel.yaml": [
        ("DestinationRule default/tunnel-proxy", "spec.trafficPolicy.tunnel", "ignored:")
    ],
    "ref-envoyfilter.yaml": [("EnvoyFilter istio-config/custom-protocol", None, "ignored:")],
    "ref-gateway.yaml": [("Gateway some-config-namespace/my-gateway", None, GATEWAY)],
    "ref-proxyconfig.yaml": [("ProxyConfig example/per-workload-proxyconfig", None, "ignored:")],
    "ref-requestauthentication.yaml": [("RequestAuthentication foo/httpbin", None, JWT)],
    "ref-se-vm-dns-address.yaml": [
        (
            "ServiceEntry default/details-svc",
            "spec.workloadSelector",
            "workloadSelector should not be set when resolution is DNS",
        )
    ],
    "ref-sidecar.yaml": [
        ("Sidecar istio-config/default", None, "ignored:"),
        ("Sidecar prod-us1/ratings", None, "ignored:"),
    ],
    "ref-vs-tcp-route.yaml": [("VirtualService default/bookinfo-mongo", "spec.tcp", TCP)],
    "ref-vs-tls-route.yaml": [("VirtualService default/bookinfo-sni", "spec.tls", "ignored:")],
    "ref-wasmplugin.yaml": [("WasmPlugin istio-ingress/openid-connect", None, "ignored:")],
    "ref-workloadgroup.yaml": [("WorkloadGroup bookinfo/reviews", None, "ignored:")],
    "tcp-traffic-shifting.yaml": [
        ("Gateway default/tcp-echo-gateway", None, GATEWAY),
        ("VirtualService default/tcp-echo", "spec.tcp", TCP),
    ],
}


def test_the_sweep_covers_sixty_resources_of_every_kind() -> None:
    """The examples hold 60+ resources, among them each kind meshlib reads or skips."""
    kinds = [
        line.split(":", 1)[1].strip().strip('"')
        for name in FILES
        for line in (EXAMPLES / name).read_text().splitlines()
        if line.startswith("kind:")
    ]
    assert len(kinds) >= 60
    assert set(kinds) >= {
        "VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry", "Gateway",
        "Sidecar", "EnvoyFilter", "WasmPlugin", "ProxyConfig", "WorkloadGroup",
        "RequestAuthentication", "PeerAuthentication", "AuthorizationPolicy", "Telemetry",
        "Service", "Deployment", "HTTPRoute",
    }  # fmt: skip


@pytest.mark.parametrize("name", FILES)
def test_each_example_loads_with_only_its_expected_warnings(name: str) -> None:
    """No example is an error; each warning names its resource and field (and a line)."""
    result = load_paths([EXAMPLES / name])
    assert result.errors == (), [str(e) for e in result.errors]
    got = [(w.resource, w.field, w.message) for w in result.warnings]
    expected = WARNINGS.get(name, [])
    assert len(got) == len(expected), got
    for (resource, field, message), (want_resource, want_field, start) in zip(
        got, expected, strict=True
    ):
        assert (resource, field) == (want_resource, want_field)
        assert message.startswith(start), message
    assert all(w.line and w.file == str(EXAMPLES / name) for w in result.warnings)
    assert result.resources or expected  # only skipped kinds may leave nothing loaded


@pytest.mark.parametrize("name", FILES)
def test_meshlib_check_accepts_each_example_with_its_services(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`meshlib check EXAMPLE registry/` exits 0: given the services the example routes to
    (as ServiceEntries), nothing in it is an error for the cross-resource checks either."""
    assert main(["check", str(EXAMPLES / name), str(REGISTRY)]) == 0
    assert ": error:" not in capsys.readouterr().out


def test_meshlib_check_in_a_subprocess_names_file_line_and_resource() -> None:
    """As a user runs it: every line of output is FILE:LINE: severity: KIND NS/NAME: ...,
    no traceback, and the summary counts every example."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    files = [str(EXAMPLES / n) for n in ("mirroring.yaml", "ref-sidecar.yaml", "authz-jwt.yaml")]
    done = subprocess.run(
        [sys.executable, "-m", "meshlib", "check", *files, str(REGISTRY)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines
    for line in lines:
        where, severity, rest = line.split(": ", 2)
        file, number = where.rsplit(":", 1)
        assert file.startswith(str(EXAMPLES)) and int(number) > 0
        assert severity == "warning" and rest.split(" ", 1)[0].isalpha()
    assert "resources checked: 0 error(s)" in done.stderr
    assert any("Service default/httpbin: ignored: meshlib does not read" in x for x in lines)


def snapshot(*names: str, namespace: str = "default") -> Snapshot:
    result = load_paths([*(EXAMPLES / n for n in names), REGISTRY])
    assert result.errors == ()
    return Snapshot.build(result.resources, MeshConfig(service="sleep", namespace=namespace))


def routes(capsys: pytest.CaptureFixture[str], name: str, *argv: str) -> dict[str, object]:
    assert main(["routes", str(EXAMPLES / name), str(REGISTRY), *argv, "--output", "json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_the_deprecated_mirror_percent_mirrors_that_share(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """mirroring (older release): `mirrorPercent: 100` mirrors every request to v2."""
    out = routes(capsys, "mirroring-mirror-percent.yaml", "--host", "httpbin:8000")
    assert out["mirror"] == {
        "destinations": [
            {
                "host": "httpbin.default.svc.cluster.local",
                "subset": "v2",
                "port": None,
                "percentage": 100.0,
            }
        ]
    }


def test_the_request_timeout_example_sets_half_a_second(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """request-timeouts: `timeout: 0.5s` on the reviews route."""
    out = routes(capsys, "timeouts-reviews.yaml", "--host", "reviews:9080")
    assert out["timeout"] == "0.5s"


def test_the_egress_gateway_example_sends_sidecar_traffic_to_the_gateway(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """egress-gateway: of the routes, only the one matching `gateways: [mesh]` applies to a
    sidecar; it sends edition.cnn.com to the egress gateway's subset."""
    out = routes(capsys, "egress-gateway.yaml", "--host", "edition.cnn.com")
    assert out["route"] == {"index": 0, "name": None}
    destinations = out["destinations"]
    assert isinstance(destinations, list)
    assert [(d["host"], d["subset"], d["port"]) for d in destinations] == [
        ("istio-egressgateway.istio-system.svc.cluster.local", "cnn", 80)
    ]


def test_the_stored_circuit_breaker_reads_as_istio_does() -> None:
    """circuit-breaking as `kubectl get` printed it: `180.000s` is three minutes, and the
    deprecated `consecutiveErrors: 1` is not read (Istio no longer does): Envoy's 5 apply."""
    policy = snapshot("circuit-breaking-as-stored.yaml").traffic_policy(
        "httpbin.default.svc.cluster.local", None, 8000
    )
    outlier = policy.outlier_detection
    assert outlier is not None
    assert outlier.base_ejection_time is not None and outlier.base_ejection_time.seconds == 180
    assert outlier.interval is not None and outlier.interval.seconds == 1
    assert outlier.consecutive_5xx_errors is None  # unset: the data plane's default of 5
    pool = policy.connection_pool
    assert pool is not None and pool.tcp is not None and pool.tcp.max_connections == 1


def test_a_kubernetes_service_skipped_says_how_to_describe_it() -> None:
    """A `v1 Service` beside the Istio resources that route to it: the warning says meshlib
    does not read it and names the ServiceEntry host to write, in the Service's namespace."""
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {}\n"
    (warning,) = load_text(text, "app.yaml").warnings
    assert (warning.file, warning.line, warning.resource) == ("app.yaml", 1, "Service shop/web")
    assert "does not read Kubernetes Services" in warning.message
    assert "hosts: [web.shop.svc.<cluster domain>]" in warning.message


def test_an_uppercase_namespace_says_what_a_namespace_may_be() -> None:
    """Istio's delegate example writes `namespace: nsA`, which Kubernetes refuses: the error
    names the field and the rule, not only the value."""
    text = (
        (EXAMPLES / "ref-vs-delegate.yaml").read_text().replace("namespace: nsa", "namespace: nsA")
    )
    errors = load_text(text, "delegate.yaml").errors
    assert [(e.resource, e.field) for e in errors] == [
        ("VirtualService nsA/productpage", "metadata.namespace")
    ]
    assert "a DNS label" in errors[0].message and "lowercase" in errors[0].message


def test_istio_s_unquoted_ipv6_address_list_is_an_error_naming_the_value() -> None:
    """Some of Istio's examples write `addresses: [1.2.3.4, 2001:db8::]`, which go-yaml reads
    and YAML 1.2 does not: meshlib's documented limitation is an error that says to quote it,
    never a crash or a silent mis-read."""
    text = (EXAMPLES / "ref-se-addresses-inline.yaml").read_text()
    text = text.replace('"2001:db8::"', "2001:db8::")
    (error,) = load_text(text, "se.yaml").errors
    assert error.line is not None and "2001:db8::" in error.message and "quote" in error.message


# YAML Istio's validation (pkg/config/validation) rejects: meshlib rejects it too, naming
# the field.
REJECTED = [
    pytest.param(
        "networking.istio.io/v1", "VirtualService",
        "hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  redirect: {uri: /x}",
        "spec.http[0]", id="route-and-redirect",
    ),
    pytest.param(
        "networking.istio.io/v1", "VirtualService",
        "hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  retries: {attempts: 3, retryOn: '5xx, reset'}",
        "spec.http[0].retries.retryOn", id="retry-on-space",
    ),
    pytest.param(
        "networking.istio.io/v1", "DestinationRule",
        "host: r\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent", id="ejection-percent",
    ),
    pytest.param(
        "networking.istio.io/v1", "ServiceEntry",
        "hosts: [a.example.com]\nports: [{number: 80, name: http}]\nresolution: NONE\n"
        "endpoints: [{address: 1.2.3.4}]",
        "spec.endpoints", id="none-with-endpoints",
    ),
    pytest.param(
        "security.istio.io/v1", "PeerAuthentication",
        "portLevelMtls: {8080: {mode: DISABLE}}",
        "spec.portLevelMtls", id="port-level-without-selector",
    ),
    pytest.param(
        "security.istio.io/v1", "AuthorizationPolicy",
        "action: CUSTOM\nrules: [{}]", "spec.provider", id="custom-without-provider",
    ),
    pytest.param(
        "telemetry.istio.io/v1", "Telemetry",
        "tracing:\n- customTags: {a: {literal: {value: x}, header: {name: y}}}",
        "spec.tracing[0].customTags.a", id="custom-tag-two-kinds",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("api_version", "kind", "spec", "field"), REJECTED)
def test_what_istio_rejects_is_an_error_naming_the_field(
    api_version: str, kind: str, spec: str, field: str
) -> None:
    """Each spec is one Istio's webhook refuses; meshlib's error names that field."""
    indented = "\n".join("  " + line for line in spec.splitlines())
    text = f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x}}\nspec:\n{indented}\n"
    errors = load_text(text, "bad.yaml").errors
    assert errors, f"{kind} accepted"
    assert any((e.field or "").startswith(field) for e in errors), [str(e) for e in errors]
