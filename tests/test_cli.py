"""The `meshlib` command line, run as a user runs it: the installed console script."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import meshlib
from meshlib.cli import main
from meshlib.config import MeshConfig
from meshlib.dataplane.cluster import ClusterState
from meshlib.dataplane.routing import plan_route
from meshlib.policy.loader import load_paths
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot
from tests.conftest import BOOKINFO

MESHLIB = shutil.which("meshlib", path=str(Path(sys.executable).parent)) or "meshlib"
NETWORKING = BOOKINFO / "networking"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHLIB, *args], capture_output=True, text=True, timeout=60)


def test_check_valid_policy_exits_zero() -> None:
    """Valid policy: exit 0, a summary on stderr."""
    result = run(
        "check",
        str(NETWORKING / "destination-rule-all.yaml"),
        str(NETWORKING / "virtual-service-all-v1.yaml"),
        str(BOOKINFO / "services.yaml"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s)" in result.stderr


def test_check_reports_every_error_in_the_documented_format(tmp_path: Path) -> None:
    """Every error is one line FILE:LINE: error: KIND NS/NAME: FIELD: message; exit 1."""
    bad = tmp_path / "mesh.yaml"
    bad.write_text(
        """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: -5
    timeout: soon
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {maxEjectionPercent: 150}
"""
    )
    result = run("check", str(bad))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert (
        f"{bad}:12: error: VirtualService default/reviews: spec.http[0].route[1].weight: must be >= 0"
        in lines
    )
    assert any(
        line.startswith(
            f"{bad}:13: error: VirtualService default/reviews: spec.http[0].timeout: invalid duration 'soon'"
        )
        for line in lines
    )
    assert (
        f"{bad}:21: error: DestinationRule shop/reviews: spec.trafficPolicy.outlierDetection.maxEjectionPercent: must be <= 100"
        in lines
    )
    assert "3 error(s)" in result.stderr


def test_check_reports_cross_resource_findings(tmp_path: Path) -> None:
    """A route to a subset no DestinationRule defines is reported, and check fails."""
    result = run(
        "check",
        str(NETWORKING / "virtual-service-reviews-90-10.yaml"),
        str(BOOKINFO / "services.yaml"),
    )
    assert result.returncode == 1
    assert (
        "spec.http[0].route[0].destination.subset: subset 'v1' of host reviews.default.svc.cluster.local is not defined by any DestinationRule"
        in result.stdout
    )


def test_check_reports_cross_resource_findings_at_their_fields_in_line_order(
    tmp_path: Path,
) -> None:
    """Analysis findings print like validation errors, FILE:LINE: severity: KIND NS/NAME:
    FIELD: message, at the line of the field they name, sorted by line; a host claimed by two
    VirtualServices is an error on each, naming the other."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(
        (BOOKINFO / "services.yaml").read_text()
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
        port: {number: 9090}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-canary}
spec:
  hosts:
  - reviews.default.svc.cluster.local
  http:
  - route: [{destination: {host: ratings}}]
  - route: [{destination: {host: details}}]
"""
    )
    start = (BOOKINFO / "services.yaml").read_text().count("\n") + 1  # the `---` line
    result = run("check", str(policy))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{policy}:{start + 5}: error: VirtualService default/reviews: spec.hosts[0]: host"
        " reviews.default.svc.cluster.local is also claimed by VirtualService"
        " default/reviews-canary for the mesh gateway: a sidecar takes one VirtualService per"
        " host and ignores the others' routes for it (here default/reviews: it is older);"
        " merge them, or keep them apart with exportTo",
        f"{policy}:{start + 10}: error: VirtualService default/reviews:"
        " spec.http[0].route[0].destination.port.number: reviews.default.svc.cluster.local has"
        " no port 9090 (ports of ServiceEntry default/reviews: 9080); a sidecar has no cluster"
        " for it and answers 503",
        f"{policy}:{start + 17}: error: VirtualService default/reviews-canary: spec.hosts[0]:"
        " host reviews.default.svc.cluster.local is also claimed by VirtualService"
        " default/reviews for the mesh gateway: a sidecar takes one VirtualService per host and"
        " ignores the others' routes for it (here default/reviews: it is older); merge them, or"
        " keep them apart with exportTo",
        f"{policy}:{start + 20}: warning: VirtualService default/reviews-canary: spec.http[1]:"
        " unreachable: the earlier route http[0] matches every request",
    ]
    assert "8 resources checked: 3 error(s), 1 warning(s)" in result.stderr


def test_check_warns_about_ignored_kinds() -> None:
    """Gateways load with a warning naming what is ignored; the exit code stays 0."""
    result = run(
        "check", str(NETWORKING / "bookinfo-gateway.yaml"), str(BOOKINFO / "services.yaml")
    )
    assert result.returncode == 0
    assert "warning: Gateway default/bookinfo-gateway: ignored: gateways configure" in result.stdout


def test_check_warns_about_deprecated_consecutive_errors(tmp_path: Path) -> None:
    """consecutiveErrors, which Istio no longer reads, is a warning naming the field and what
    to use instead; the exit code stays 0."""
    rule = tmp_path / "mesh.yaml"
    rule.write_text(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n"
        "spec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection: {consecutiveErrors: 3}\n"
    )
    result = run("check", str(rule))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"{rule}:7: warning: DestinationRule default/reviews: "
        "spec.trafficPolicy.outlierDetection.consecutiveErrors: ignored: consecutiveErrors is"
        " deprecated"
    ) in result.stdout
    assert "use consecutive5xxErrors or consecutiveGatewayErrors" in result.stdout


def test_check_skips_another_mesh_kind_of_an_istio_name(tmp_path: Path) -> None:
    """A folder mixing meshes' manifests checks clean: Linkerd's AuthorizationPolicy is not
    Istio's, so it is skipped with a warning rather than failing the run."""
    (tmp_path / "linkerd.yaml").write_text(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: web-authz}\nspec: {targetRef: {kind: Server, name: web-http}}\n"
    )
    shutil.copy(NETWORKING / "destination-rule-all.yaml", tmp_path)
    result = run("check", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"{tmp_path / 'linkerd.yaml'}:1: warning: AuthorizationPolicy default/web-authz: ignored:"
        " not an Istio resource (policy.linkerd.io/v1alpha1 AuthorizationPolicy)"
    ) in result.stdout


def test_check_unreadable_yaml(tmp_path: Path) -> None:
    """A YAML syntax error names the file and line."""
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: [unclosed\n")
    result = run("check", str(bad))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{bad}:3: error: invalid YAML")


def test_routes_json_contract() -> None:
    """`routes --output json` prints exactly the documented keys."""
    result = run(
        "routes",
        str(NETWORKING / "destination-rule-all.yaml"),
        str(NETWORKING / "virtual-service-reviews-test-v2.yaml"),
        str(BOOKINFO / "services.yaml"),
        "--host",
        "reviews:9080",
        "--header",
        "end-user=jason",
        "--output",
        "json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in (
        "host",
        "virtualService",
        "route",
        "destinations",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "headers",
    ):
        assert key in out
    assert out["route"] == {"index": 0, "name": None}
    assert out["destinations"] == [
        {
            "host": "reviews.default.svc.cluster.local",
            "subset": "v2",
            "port": 9080,
            "weight": 100.0,
            "endpoints": ["127.0.0.1:19084"],
            "trafficPolicy": None,
        }
    ]
    assert "notes" not in out  # reviews declares port 9080


def test_routes_text_output() -> None:
    """The text form names the VirtualService, the route and each share."""
    result = run(
        "routes",
        str(NETWORKING / "destination-rule-all.yaml"),
        str(NETWORKING / "virtual-service-reviews-90-10.yaml"),
        str(BOOKINFO / "services.yaml"),
        "--host",
        "reviews",
    )
    assert result.returncode == 0
    assert "virtualService:  default/reviews" in result.stdout
    assert (
        "90%  reviews.default.svc.cluster.local subset v1 port 9080 -> 127.0.0.1:19083"
        in result.stdout
    )
    assert (
        "10%  reviews.default.svc.cluster.local subset v2 port 9080 -> 127.0.0.1:19084"
        in result.stdout
    )


def test_routes_source_labels_select_rules(tmp_path: Path) -> None:
    """--source-labels and --namespace describe the calling workload."""
    policy = tmp_path / "vs.yaml"
    policy.write_text(
        """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews.default.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: reviews.default.svc.cluster.local, subset: v1}}]
"""
    )
    common = ["routes", str(policy), "--host", "reviews.default", "-o", "json"]
    product = json.loads(
        run(*common, "--source-labels", "app=productpage", "--namespace", "web").stdout
    )
    other = json.loads(run(*common, "--source-labels", "app=other").stdout)
    assert product["destinations"][0]["subset"] == "v2"
    assert other["destinations"][0]["subset"] == "v1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--header", "novalue"], "--header: expected K=V", id="header"),
        pytest.param(["--source-labels", "x"], "--source-labels: expected k=v", id="labels"),
        pytest.param(["--namespace", "Bad_NS"], "--namespace 'Bad_NS': must be", id="namespace"),
        pytest.param(
            ["--source-labels", "a=b c"], "--source-labels 'a=b c': 'b c' is not", id="label"
        ),
        pytest.param(["--host", "reviews:99999"], "--host: 'reviews:99999' is not", id="port"),
        pytest.param(["--host", "reviews:abc"], "--host: 'reviews:abc' is not", id="port-text"),
        pytest.param(["--host", ""], "--host: '' is not", id="empty-host"),
        pytest.param(["--host", "http://reviews:9080"], "--host: 'http://", id="url"),
    ],
)
def test_routes_bad_arguments(args: list[str], message: str) -> None:
    """Bad arguments give a one-line error naming the flag and exit 2, never a traceback."""
    result = run("routes", str(BOOKINFO / "services.yaml"), "--host", "reviews", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("host", ["reviews", "reviews:9080", "[::1]:9080", "10.0.0.1"])
def test_routes_takes_hosts_with_or_without_a_port(host: str) -> None:
    result = run("routes", str(BOOKINFO / "services.yaml"), "--host", host)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--namespace", ""], "--namespace '': must be", id="empty-namespace"),
        pytest.param(["--namespace", "BAD_NS"], "--namespace 'BAD_NS': must be", id="namespace"),
        pytest.param(["a" * 300 + ".yaml"], "File name too long", id="long-path"),
    ],
)
def test_check_bad_arguments(args: list[str], message: str) -> None:
    """As for routes: one line naming what is wrong, exit 2, no traceback."""
    result = run("check", str(BOOKINFO / "services.yaml"), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_cut_short_by_its_reader_still_fails_on_errors(tmp_path: Path) -> None:
    """`meshlib check ... | head -1` in CI: the reader goes away before the output ends, and
    the exit code and the summary still tell there were errors."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "---\n".join(
            f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: r{i}}}\nspec: {{host: r, bogus{i}: 1}}\n"
            for i in range(3000)
        )
    )
    with subprocess.Popen(
        [MESHLIB, "check", str(bad)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as check:
        assert check.stdout is not None and check.stderr is not None
        check.stdout.readline()
        check.stdout.close()  # as `head -1` exits
        stderr = check.stderr.read().decode()
        assert check.wait(timeout=60) == 1
    assert "3000 error(s)" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_routes_refuses_invalid_policy(tmp_path: Path) -> None:
    """routes on invalid policy prints the errors and exits 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {hosts: 3}\n"
    )
    result = run("routes", str(bad), "--host", "x")
    assert result.returncode == 1
    assert "spec.hosts: must be a list" in result.stderr


def test_check_warns_about_telemetry_meshlib_leaves_out(tmp_path: Path) -> None:
    """Valid for Istio, not applied by meshlib: said up front, with file, line and field."""
    path = tmp_path / "telemetry.yaml"
    path.write_text(
        """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - customTags:
      path: {formatter: {value: "%REQ(:PATH)%"}}
      user: {header: {name: end-user}}
  metrics:
  - overrides:
    - tagOverrides:
        host: {value: request.host}
        region: {value: "'eu-west-1'"}
        le: {value: "'x'"}
        request_protocol: {operation: REMOVE}
"""
    )
    result = run("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    where = "warning: Telemetry istio-system/mesh-default: "
    assert (
        f"{path}:7: {where}spec.tracing[0].customTags.path.formatter: formatter tags (Envoy command operators) are not applied by meshlib"
        in lines
    )
    assert any(
        line.startswith(
            f"{path}:12: {where}spec.metrics[0].overrides[0].tagOverrides.host.value: 'request.host'"
        )
        for line in lines
    )
    assert any(
        line.startswith(
            f"{path}:14: {where}spec.metrics[0].overrides[0].tagOverrides.le: not a label"
        )
        for line in lines
    )
    assert (
        "region" not in result.stdout
        and "request_protocol" not in result.stdout
        and "user" not in result.stdout
    )
    assert "0 error(s), 3 warning(s)" in result.stderr


def test_check_warns_about_a_filter_meshlib_does_not_evaluate(tmp_path: Path) -> None:
    """A valid CEL filter outside meshlib's subset: a warning that every request is logged;
    a filter in the subset: nothing; a malformed one: an error."""
    path = tmp_path / "telemetry.yaml"
    path.write_text(
        """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 500"}
  - filter: {expression: "response.code >= 400 || request.url_path.startsWith('/api')"}
"""
    )
    result = run("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(
        f"{path}:8: warning: Telemetry istio-system/mesh-default:"
        " spec.accessLogging[1].filter.expression: meshlib logs every request for this entry:"
    )
    assert "startsWith()" in line
    path.write_text(path.read_text().replace("response.code >= 500", "response.code >= 500 &&"))
    result = run("check", str(path))
    assert result.returncode == 1
    assert "spec.accessLogging[0].filter.expression: must be a valid CEL expression" in (
        result.stdout
    )


def test_check_warns_about_an_access_log_entry_without_provider(tmp_path: Path) -> None:
    """An accessLogging entry naming no provider, with none to inherit: a warning at the
    entry's line (Istio logs nothing for it, meshlib logs it as envoy); exit 0."""
    path = tmp_path / "telemetry.yaml"
    path.write_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: mesh-default, namespace: istio-system}\n"
        "spec:\n  accessLogging:\n  - match: {mode: SERVER}\n"
    )
    result = run("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(
        f"{path}:6: warning: Telemetry istio-system/mesh-default:"
        " spec.accessLogging[0].providers: names no provider and inherits none:"
    )
    assert "(providers: [{name: envoy}])" in line


def test_check_takes_the_mesh_level_from_meshlib_root_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mesh-level Telemetry whose providers others inherit is the root namespace's, as a
    Mesh reads MESHLIB_ROOT_NAMESPACE; a bad value is one line naming it, exit 2."""
    policy = tmp_path / "telemetry.yaml"
    policy.write_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: mesh, namespace: mesh-root}\n"
        "spec: {accessLogging: [{providers: [{name: envoy}]}]}\n---\n"
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: shop, namespace: shop}\nspec: {accessLogging: [{}]}\n"
    )
    assert main(["check", str(policy)]) == 0
    assert "accessLogging[0].providers: names no provider" in capsys.readouterr().out
    monkeypatch.setenv("MESHLIB_ROOT_NAMESPACE", "mesh-root")
    assert main(["check", str(policy)]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("MESHLIB_ROOT_NAMESPACE", "Bad_NS")
    assert main(["check", str(policy)]) == 2
    assert "MESHLIB_ROOT_NAMESPACE='Bad_NS'" in capsys.readouterr().err


def test_routes_sends_a_one_port_service_to_its_port_as_the_data_plane_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`reviews:80` reaches reviews' only port, 9080, in `routes` as in `plan_route`."""
    services = str(BOOKINFO / "services.yaml")
    assert main(["routes", services, "--host", "reviews:80", "-o", "json"]) == 0
    [destination] = json.loads(capsys.readouterr().out)["destinations"]
    snapshot = Snapshot.build(load_paths([services]).resources, MeshConfig())
    plan = plan_route(snapshot, RequestAttributes("GET", "reviews:80"), random.Random(1))
    assert plan.cluster is not None and destination["port"] == plan.cluster[2] == 9080
    assert destination["endpoints"] == ["127.0.0.1:19083", "127.0.0.1:19084", "127.0.0.1:19085"]


CORP_POLICY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.corp.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
"""


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_check_and_routes_read_short_names_in_the_cluster_domain(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cluster-domain, else MESHLIB_CLUSTER_DOMAIN, expands `reviews` for check and routes."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(CORP_POLICY)
    domain: list[str] = []
    if how == "flag":
        domain = ["--cluster-domain", "corp.internal"]
        monkeypatch.setenv("MESHLIB_CLUSTER_DOMAIN", "ignored.example")
    else:
        monkeypatch.setenv("MESHLIB_CLUSTER_DOMAIN", "corp.internal")
    assert main(["check", str(policy), *domain]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().err
    assert main(["routes", str(policy), "--host", "reviews", "-o", "json", *domain]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"] == "reviews.default.svc.corp.internal"
    assert out["destinations"][0]["endpoints"] == ["10.0.0.1:9080"]


def test_without_a_cluster_domain_short_names_are_in_cluster_local(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No flag, no variable: `reviews` is reviews.default.svc.cluster.local, not registered
    (an error, as Istio's ReferencedResourceNotFound)."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(CORP_POLICY)
    assert main(["check", str(policy)]) == 1
    assert (
        f"{policy}:16: error: VirtualService default/reviews: spec.http[0].route[0].destination.host:"
        " host reviews.default.svc.cluster.local is not in the registry"
    ) in capsys.readouterr().out
    assert main(["routes", str(policy), "--host", "reviews", "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"] == "reviews.default.svc.cluster.local"
    assert out["destinations"][0]["endpoints"] == []


@pytest.mark.parametrize(
    ("args", "variable", "message"),
    [
        pytest.param(
            ["--cluster-domain", "Corp_X"], "", "--cluster-domain 'Corp_X': must be", id="flag"
        ),
        pytest.param([], "Corp_X", "MESHLIB_CLUSTER_DOMAIN='Corp_X': must be", id="variable"),
    ],
)
@pytest.mark.parametrize("command", ["check", "routes"])
def test_a_bad_cluster_domain_is_named_by_its_source(
    command: str,
    args: list[str],
    variable: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused cluster domain: one line naming the flag or the variable, exit 2."""
    monkeypatch.setenv("MESHLIB_CLUSTER_DOMAIN", variable)
    host = ["--host", "reviews"] if command == "routes" else []
    assert main([command, str(BOOKINFO / "services.yaml"), *host, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meshlib: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("header", ["=x", "bad name=x", "end-user:=jason", " =x"])
def test_routes_refuses_a_header_that_has_no_header_name(
    header: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--header` whose name is no HTTP header name: one line naming the flag, exit 2 (it
    used to fall silently to the default route)."""
    args = ["routes", str(BOOKINFO / "services.yaml"), "--host", "reviews", "--header", header]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meshlib: error: --header {header!r}: ") and err.count("\n") == 1
    assert "is not an HTTP header name" in err


def test_routes_help_says_both_things_namespace_sets(capsys: pytest.CaptureFixture[str]) -> None:
    """routes --namespace is the caller's namespace and that of resources that set none."""
    with pytest.raises(SystemExit) as exited:
        main(["routes", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "namespace of the calling workload, and of resources that set none" in help_text


def test_a_bad_source_label_is_shown_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    """--source-labels 'app=a b': the flag and its text as given, and what a value may be."""
    args = ["routes", str(BOOKINFO / "services.yaml"), "--host", "reviews"]
    assert main([*args, "--source-labels", "team=web,app=a b"]) == 2
    assert capsys.readouterr().err.startswith(
        "meshlib: error: --source-labels 'team=web,app=a b': 'a b' is not a valid value for"
        " label 'app' (up to 63 letters"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`meshlib --version` prints `meshlib <version>` and exits 0."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"meshlib {meshlib.__version__}\n"


def test_python_dash_m_meshlib_is_the_command(tmp_path: Path) -> None:
    """`python -m meshlib` runs the CLI: its output, its exit code, `meshlib` in its usage."""
    root = Path(__file__).resolve().parents[1]

    def python_m(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "meshlib", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=root)

    version = python_m("--version")
    assert (version.returncode, version.stdout) == (0, f"meshlib {meshlib.__version__}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: [unclosed\n")
    assert python_m("check", str(bad)).returncode == 1
    usage = python_m()
    assert usage.returncode == 2 and usage.stderr.startswith("usage: meshlib ")


def test_routes_json_retries_keys_that_appear_only_sometimes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As docs/policy.md says: `default` only on Istio's default retry policy, `perTryTimeout`
    only when set."""
    services = str(BOOKINFO / "services.yaml")
    assert main(["routes", services, "--host", "reviews", "-o", "json"]) == 0
    default = json.loads(capsys.readouterr().out)["retries"]
    assert default["default"] is True and "perTryTimeout" not in default
    policy = tmp_path / "vs.yaml"
    policy.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        "spec:\n  hosts: [reviews]\n  http:\n  - retries: {attempts: 3, perTryTimeout: 2s}\n"
        "    route: [{destination: {host: reviews}}]\n"
    )
    assert main(["routes", services, str(policy), "--host", "reviews", "-o", "json"]) == 0
    retries = json.loads(capsys.readouterr().out)["retries"]
    assert retries["perTryTimeout"] == "2s" and "default" not in retries


TWO_PORTS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shop}
spec:
  hosts: [shop.example.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: %s, name: http, protocol: HTTP}, {number: 9090, name: admin, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
"""


@pytest.mark.parametrize(("first_port", "shown"), [(80, 80), (9080, None)])
def test_routes_without_a_port_uses_the_schemes_as_the_data_plane_does(
    first_port: int, shown: int | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--host shop` is port 80: a service of two ports serves it only if 80 is one of them."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(TWO_PORTS % first_port)
    assert main(["routes", str(policy), "--host", "shop.example.internal", "-o", "json"]) == 0
    [destination] = json.loads(capsys.readouterr().out)["destinations"]
    snapshot = Snapshot.build(load_paths([str(policy)]).resources, MeshConfig())
    plan = plan_route(snapshot, RequestAttributes("GET", "shop.example.internal"), random.Random(1))
    assert destination["port"] == 80
    if shown is None:
        assert plan.cluster is None and plan.reply is not None  # 503 NC
        assert destination["error"] == "port 80 is not a port of this service (503, no cluster)"
        assert destination["endpoints"] == []
    else:
        assert plan.cluster is not None and plan.cluster[2] == shown
        assert "error" not in destination
        assert destination["endpoints"] == ["10.0.0.1:80"]


INVALID_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}, weight: -5}]
    timeout: soon
"""
VALID_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec: {host: reviews}
"""


@pytest.mark.parametrize(
    ("text", "summary"),
    [
        pytest.param(VALID_DR, "1 resource checked: 0 error(s), 1 warning(s)", id="all-valid"),
        pytest.param(INVALID_VS, "1 resource checked: 2 error(s), 0 warning(s)", id="invalid"),
        pytest.param(
            f"{INVALID_VS}---\n{VALID_DR}---\n",
            "2 resources checked: 2 error(s), 1 warning(s)",
            id="some-invalid",
        ),
        pytest.param(
            "apiVersion: v1\nkind: List\nitems:\n- {kind: DestinationRule}\n- 3\n",
            "2 resources checked: 2 error(s), 0 warning(s)",
            id="list-items",
        ),
        pytest.param(
            "apiVersion: v1\nkind: [unclosed\n",
            "1 resource checked: 1 error(s), 0 warning(s)",
            id="unparseable-yaml",
        ),
        pytest.param(
            f"{VALID_DR}---\nkind: [unclosed\n",
            "2 resources checked: 1 error(s), 1 warning(s)",
            id="valid-then-unparseable",
        ),
    ],
)
def test_check_counts_every_resource_it_read_valid_or_not(
    text: str, summary: str, tmp_path: Path
) -> None:
    """The summary counts each resource in the files, left out for its errors or not (it
    counted only the valid ones: "0 resources checked: 2 error(s)"); a document that is not
    YAML counts as one."""
    policy = tmp_path / "bad.yaml"
    policy.write_text(text)
    result = run("check", str(policy))
    assert result.stderr.splitlines()[-1] == summary


def test_check_counts_a_file_it_cannot_decode_as_one(tmp_path: Path) -> None:
    """A file that is not text is one resource with one error, like a document that is not
    YAML."""
    policy = tmp_path / "binary.yaml"
    policy.write_bytes(b"\xff\xfe\x00\x00kind: \x80\x81")
    result = run("check", str(policy))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "1 resource checked: 1 error(s), 0 warning(s)"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param(
            "reviews/1",
            "--path 'reviews/1': must start with / (an HTTP path): write --path /reviews/1",
            id="relative",
        ),
        pytest.param(
            "?page=2",
            "--path '?page=2': must start with / (an HTTP path): write --path /?page=2",
            id="query-only",
        ),
        pytest.param("", "--path '': must start with / (an HTTP path): write --path /", id="empty"),
        pytest.param(
            "http://reviews:9080/reviews/1?page=2",
            "--path 'http://reviews:9080/reviews/1?page=2': a path, not a URL:"
            " write --host reviews:9080 --path /reviews/1?page=2",
            id="url",
        ),
    ],
)
def test_routes_refuses_a_path_without_its_leading_slash(path: str, message: str) -> None:
    """HTTP paths start with `/`, and Istio's `uri` matches with them: a --path without one
    is a usage error saying what to write, exit 2 (it was routed silently, where a `prefix:
    /reviews` route could never match it)."""
    args = ["routes", str(BOOKINFO / "services.yaml"), "--host", "reviews:9080"]
    result = run(*args, "--path", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"meshlib: error: {message}\n"


DESTINATION_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 10}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: end-user}
        localityLbSetting: {enabled: true}
      outlierDetection: {consecutive5xxErrors: 1}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        connectionPool: {http: {http2MaxRequests: 5}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v2}, weight: 30}
    - {destination: {host: reviews, subset: v3}, weight: 20}
"""


def test_routes_shows_the_destination_rule_policy_of_each_destination(tmp_path: Path) -> None:
    """Each destination shows the traffic policy its cluster takes, as the data plane gets it
    from the Snapshot: a subset's blocks replace the host's whole blocks, a subset's
    port-level entry replaces all four; fields library mode ignores are left out."""
    policy = tmp_path / "reviews.yaml"
    policy.write_text(DESTINATION_RULE)
    args = ["routes", str(BOOKINFO / "services.yaml"), str(policy), "--host", "reviews:9080"]
    result = run(*args, "-o", "json")
    assert result.returncode == 0, result.stderr
    v1, v2, v3 = (d["trafficPolicy"] for d in json.loads(result.stdout)["destinations"])
    pool = {"tcp": {"maxConnections": 100, "connectTimeout": "2s"}}
    assert v1 == {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {**pool, "http": {"http1MaxPendingRequests": 10}},
        "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"},
        "tls": {"mode": "ISTIO_MUTUAL"},
    }
    assert v2 == {
        "loadBalancer": {"consistentHash": {"httpHeaderName": "end-user"}},
        "connectionPool": {**pool, "http": {"http1MaxPendingRequests": 10}},
        "outlierDetection": {"consecutive5xxErrors": 1},
        "tls": {"mode": "ISTIO_MUTUAL"},
    }
    assert v3 == {"connectionPool": {"http": {"http2MaxRequests": 5}}}
    # The very policy the data plane's cluster for each destination takes.
    paths = [str(BOOKINFO / "services.yaml"), str(policy)]
    snapshot = Snapshot.build(load_paths(paths).resources, MeshConfig())
    for subset, shown in (("v1", v1), ("v2", v2), ("v3", v3)):
        key = ("reviews.default.svc.cluster.local", subset, 9080)
        assert ClusterState(key, snapshot, random.Random(1)).policy.to_dict() == shown
    text = run(*args).stdout.splitlines()
    at = text.index(
        "      30%  reviews.default.svc.cluster.local subset v2 port 9080 -> 127.0.0.1:19084"
    )
    assert text[at + 1 : at + 5] == [
        '           loadBalancer:     {"consistentHash": {"httpHeaderName": "end-user"}}',
        '           connectionPool:   {"tcp": {"maxConnections": 100, "connectTimeout": "2s"},'
        ' "http": {"http1MaxPendingRequests": 10}}',
        '           outlierDetection: {"consecutive5xxErrors": 1}',
        '           tls:              {"mode": "ISTIO_MUTUAL"}  (not enforced yet)',
    ]
    assert text[at + 5].startswith("      20%  ")


def test_routes_shows_no_policy_where_no_destination_rule_sets_one() -> None:
    """No trafficPolicy in the DestinationRule: `null` in JSON, no line in the text."""
    args = [
        "routes",
        str(BOOKINFO / "services.yaml"),
        str(NETWORKING / "destination-rule-all.yaml"),
        str(NETWORKING / "virtual-service-reviews-90-10.yaml"),
        "--host",
        "reviews:9080",
    ]
    destinations = json.loads(run(*args, "-o", "json").stdout)["destinations"]
    assert [d["trafficPolicy"] for d in destinations] == [None, None]
    text = run(*args).stdout.splitlines()
    assert text[4].startswith("      90%") and text[5].startswith("      10%")
    assert text[6].startswith("retries:")


def test_routes_notes_a_port_the_service_does_not_declare(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`reviews:9081` goes to reviews' only port, 9080, as in the data plane, and `routes`
    says once that 9081 is not a port of reviews; a declared port gets no note."""
    services = str(BOOKINFO / "services.yaml")
    dr = str(NETWORKING / "destination-rule-reviews.yaml")
    vs = str(NETWORKING / "virtual-service-reviews-90-10.yaml")
    note = (
        "port 9081 is not declared by reviews.default.svc.cluster.local: its only port, 9080,"
        " is used (a sidecar has no route for port 9081)"
    )
    assert main(["routes", services, dr, vs, "--host", "reviews:9081"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("note:")] == [f"note:            {note}"]
    assert main(["routes", services, dr, vs, "--host", "reviews:9081", "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["notes"] == [note]
    assert [d["port"] for d in out["destinations"]] == [9080, 9080]
    snapshot = Snapshot.build(load_paths([services, dr, vs]).resources, MeshConfig())
    plan = plan_route(snapshot, RequestAttributes("GET", "reviews:9081"), random.Random(1))
    assert plan.cluster is not None and plan.cluster[2] == 9080
    assert main(["routes", services, "--host", "reviews", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [
        "port 80 (the scheme's: --host names none) is not declared by"
        " reviews.default.svc.cluster.local: its only port, 9080, is used (a sidecar has no"
        " route for port 80)"
    ]
    assert main(["routes", services, dr, vs, "--host", "reviews:9080"]) == 0
    assert "note:" not in capsys.readouterr().out
