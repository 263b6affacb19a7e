"""integrations/ works: both Prometheus configs load and scrape meshlib, and every query of the
Grafana dashboard runs against what meshlib exports.

One module-wide stack: productpage calls reviews v1 and v2 (meshed WSGI apps, each on a real
wsgiref server) and ratings (a port where nothing listens), from a background thread; each of the
three workloads serves its metrics on its own OS-assigned loopback port. Two real Prometheus
servers (the Debian package's binary) scrape them:

- `integrations/prometheus/demo.yml`, copied byte for byte into a temporary repository layout
  beside the `.demo/targets.json` that `make demo` writes, and started from that root with the
  command the README gives;
- `integrations/prometheus/kubernetes.yml` with its `kubernetes_sd_configs` swapped for a
  file_sd file holding the meta labels Kubernetes discovery gives pods (the Debian build has no
  Kubernetes discovery), so its relabeling runs unchanged on pod-shaped targets.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry.metrics import render
from tests import prometheus
from tests.upstream import WsgiServer, mesh_for, refused_port

ROOT = Path(__file__).parent.parent
DEMO_CONFIG = ROOT / "integrations" / "prometheus" / "demo.yml"
KUBERNETES_CONFIG = ROOT / "integrations" / "prometheus" / "kubernetes.yml"
ALERTS = ROOT / "integrations" / "prometheus" / "meshlib-alerts.yml"
DASHBOARD = ROOT / "integrations" / "grafana" / "meshlib-golden-signals.json"

PROMTOOL = shutil.which("promtool")
PROMTOOL_SKIP = "needs promtool from the Debian package `prometheus` (apt-get install prometheus)"
needs_prometheus = pytest.mark.skipif(not prometheus.AVAILABLE, reason=prometheus.SKIP_REASON)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=PROMTOOL_SKIP)

RATE_INTERVAL = "10s"  # what $__rate_interval becomes: ten 1 s scrapes
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = ["datasource", "reporter", "namespace", "service", "workload"]
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}

POLICY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {ratings}}}}}]
"""


# --- the workloads ---------------------------------------------------------------------------


def reviews_app() -> Any:
    """A WSGI reviews: every 10th answer 503, every 7th 404, else 200; 100-500 body bytes."""
    counter = itertools.count(1)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        n = next(counter)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if n % 10 == 0:
            status = "503 Service Unavailable"
        elif n % 7 == 0:
            status = "404 Not Found"
        else:
            status = "200 OK"
        body = b"x" * (100 * (n % 5 + 1))
        time.sleep(0.002)  # a latency the histograms can see
        start_response(status, [("content-type", "text/plain"), ("content-length", str(len(body)))])
        return [body]

    return app


@dataclass
class Workloads:
    meshes: dict[str, meshlib.Mesh]  # "productpage", "reviews-v1", "reviews-v2"
    ports: dict[str, int]  # each one's metrics port on 127.0.0.1

    def exported_names(self) -> set[str]:
        """Every sample name the three workloads expose."""
        return {
            sample.name
            for mesh in self.meshes.values()
            for family in text_string_to_metric_families(render(mesh.registry).decode())
            for sample in family.samples
        }


@pytest.fixture(scope="module")
def workloads() -> Iterator[Workloads]:
    """The three workloads serving metrics, with traffic flowing until the module ends."""
    meshes = {
        name: meshlib.Mesh(MeshConfig(service="reviews", version=name[-2:], workload=name))
        for name in ("reviews-v1", "reviews-v2")
    }
    servers = {
        name: WsgiServer(meshlib.MeshWSGIMiddleware(reviews_app(), mesh=mesh))
        for name, mesh in meshes.items()
    }
    ratings = refused_port()  # nothing listens: every call to ratings is refused
    policy = POLICY.format(
        v1=servers["reviews-v1"].port,
        v2=servers["reviews-v2"].port,
        ratings=ratings.getsockname()[1],
    )
    meshes["productpage"] = mesh_for(MeshConfig(service="productpage", version="v1"), policy)
    for server in servers.values():
        server.__enter__()
    client = meshlib.Client(mesh=meshes["productpage"])
    stop = threading.Event()
    calls: list[int] = []
    errors: list[BaseException] = []

    def drive() -> None:  # about 40 calls a second until the module ends
        try:
            for i in itertools.count():
                if i % 10 == 9:
                    response = client.get("http://ratings:9080/ratings/1")
                else:
                    response = client.post(
                        "http://reviews:9080/reviews/1", content=b"y" * (50 * (i % 4))
                    )
                calls.append(response.status_code)
                if stop.wait(0.02):
                    return
        except BaseException as exc:  # surfaced at teardown
            errors.append(exc)

    thread = threading.Thread(target=drive, name="traffic", daemon=True)
    try:
        ports = {
            name: mesh.serve_metrics(0, host="127.0.0.1").port for name, mesh in meshes.items()
        }
        thread.start()
        deadline = time.monotonic() + 10
        while len(calls) < 30:  # every kind of answer, from both versions
            assert not errors, errors
            assert time.monotonic() < deadline, f"traffic too slow: {len(calls)} calls"
            time.sleep(0.05)
        yield Workloads(meshes, ports)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
        client.close()
        for server in servers.values():
            server.__exit__()
        ratings.close()
        for mesh in meshes.values():
            mesh.close()
    assert not errors, errors


# --- Prometheus ------------------------------------------------------------------------------


class ConfiguredPrometheus(prometheus.Prometheus):
    """The suite's loopback Prometheus, run with a given config file instead of the one it
    writes (which stays unused in `workdir`)."""

    def __init__(self, workdir: Path, config: Path) -> None:
        super().__init__(workdir, {})
        self.config = config

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(match, label) lists."""
        response = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": match})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (label, match, body)
        return sorted(body["data"])

    def targets(self) -> dict[str, list[dict[str, Any]]]:
        body = self.http.get("/api/v1/targets", params={"state": "any"}).json()
        assert body["status"] == "success", body
        return dict(body["data"])


def demo_layout(root: Path, entries: list[dict[str, Any]]) -> Path:
    """`root` laid out like the repository: demo.yml copied as it is, .demo/targets.json beside."""
    config = root / "integrations" / "prometheus" / "demo.yml"
    config.parent.mkdir(parents=True)
    shutil.copyfile(DEMO_CONFIG, config)
    (root / ".demo").mkdir()
    (root / ".demo" / "targets.json").write_text(json.dumps(entries, indent=2))
    return root


def demo_targets(ports: dict[str, int]) -> list[dict[str, Any]]:
    """The file `make demo` writes: one entry per process ("reviews-v2": its metrics port),
    labelled with its app and version."""
    entries = []
    for name, port in ports.items():
        app, _, version = name.partition("-")
        labels = {"app": app, "version": version or "v1"}
        entries.append({"targets": [f"127.0.0.1:{port}"], "labels": labels})
    return entries


REVIEWS_POD = "reviews-v1-5d8f7c9b4-x2x7k"


def pod(
    name: str,
    ip: str,
    annotations: dict[str, str],
    ports: Iterable[int] = (9080,),
    phase: str = "Running",
    labels: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The target groups Kubernetes discovery (role: pod) gives a pod in namespace bookinfo:
    one target per container port, addressed <pod IP>:<port> (the bare IP for a container
    without ports), with the pod's meta labels."""
    labels = labels if labels is not None else {"app": name.split("-")[0], "version": "v1"}
    meta = {
        "__meta_kubernetes_namespace": "bookinfo",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_node_name": "node-1",
        "__meta_kubernetes_pod_host_ip": "10.128.0.4",
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_ready": "true" if phase == "Running" else "false",
        "__meta_kubernetes_pod_uid": f"uid-{name}",
        "__meta_kubernetes_pod_controller_kind": "ReplicaSet",
        "__meta_kubernetes_pod_controller_name": name.rsplit("-", 1)[0],
        "__meta_kubernetes_pod_container_name": name.split("-")[0],
        "__meta_kubernetes_pod_container_init": "false",
        "__meta_kubernetes_pod_container_port_protocol": "TCP",
    }
    for key, value in {**labels, "pod-template-hash": "5d8f7c9b4"}.items():
        sanitized = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        meta[f"__meta_kubernetes_pod_label_{sanitized}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{sanitized}"] = "true"
    for key, value in annotations.items():
        sanitized = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        meta[f"__meta_kubernetes_pod_annotation_{sanitized}"] = value
        meta[f"__meta_kubernetes_pod_annotationpresent_{sanitized}"] = "true"
    host = f"[{ip}]" if ":" in ip else ip
    groups = [
        {
            "targets": [f"{host}:{port}"],
            "labels": {**meta, "__meta_kubernetes_pod_container_port_number": str(port)},
        }
        for port in ports
    ]
    return groups or [{"targets": [ip], "labels": meta}]


def kubernetes_pods(reviews_metrics_port: int) -> list[dict[str, Any]]:
    scrape = {"prometheus.io/scrape": "true"}
    return [
        # Annotated with port and path: the real meshlib metrics of reviews v1.
        *pod(
            REVIEWS_POD,
            "127.0.0.1",
            {
                **scrape,
                "prometheus.io/port": str(reviews_metrics_port),
                "prometheus.io/path": "/metrics",
            },
            ports=(9080, reviews_metrics_port),
        ),
        # Only scrape=true: port 15020 and /stats/prometheus (TEST-NET address, never answers).
        *pod("ratings-v1-6c9d8b7f5-q8w2e", "192.0.2.10", scrape),
        # IPv6, https.
        *pod("details-v1-7d9c6f8b4-k2j4h", "fd00::a", {**scrape, "prometheus.io/scheme": "https"}),
        # Not annotated, and a finished Job's pod: both dropped.
        *pod("legacy-7f9b8c6d5-m3n4p", "192.0.2.11", {}),
        *pod("migrate-x7k2p", "192.0.2.12", scrape, ports=(), phase="Succeeded", labels={}),
    ]


def kubernetes_config_with_file_sd(path: Path, pods_file: Path) -> Path:
    """kubernetes.yml with kubernetes_sd_configs replaced by file_sd on `pods_file` and 1 s
    scrapes; every relabeling rule, the path and honor_labels stay as written."""
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}], job
        job["file_sd_configs"] = [{"files": [str(pods_file)]}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Servers:
    demo: ConfiguredPrometheus
    kubernetes: ConfiguredPrometheus


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, workloads: Workloads) -> Iterator[Servers]:
    """Both Prometheus servers, started together so their first scrapes (about 5 s after start)
    overlap."""
    repo = demo_layout(tmp_path_factory.mktemp("repo"), demo_targets(workloads.ports))
    demo = ConfiguredPrometheus(
        tmp_path_factory.mktemp("demo-prometheus"), Path("integrations/prometheus/demo.yml")
    )
    k8s_dir = tmp_path_factory.mktemp("kubernetes-prometheus")
    pods_file = k8s_dir / "pods.json"
    pods_file.write_text(json.dumps(kubernetes_pods(workloads.ports["reviews-v1"]), indent=2))
    config = kubernetes_config_with_file_sd(k8s_dir / "kubernetes.yml", pods_file)
    kubernetes = ConfiguredPrometheus(k8s_dir, config)
    with pytest.MonkeyPatch.context() as patch:
        # `prometheus --config.file=integrations/prometheus/demo.yml` from the repository root
        patch.chdir(repo)
        demo.start()
    try:
        with kubernetes:
            yield Servers(demo, kubernetes)
    finally:
        demo.stop()


# --- promtool --------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


@needs_promtool
def test_promtool_accepts_demo_config(tmp_path: Path) -> None:
    """promtool accepts demo.yml, and from the repository root finds and accepts the demo's
    targets file through the relative file_sd path."""
    result = promtool("check", "config", str(DEMO_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    repo = demo_layout(tmp_path, demo_targets({"productpage": 41001, "reviews-v2": 41002}))
    result = promtool("check", "config", "integrations/prometheus/demo.yml", cwd=repo)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "SUCCESS" in output, output
    assert "WARNING" not in output, output  # a missing targets file is only a warning


@needs_promtool
def test_promtool_accepts_kubernetes_config() -> None:
    """promtool accepts kubernetes.yml as a complete Prometheus config."""
    result = promtool("check", "config", str(KUBERNETES_CONFIG))
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" in output:
        pytest.skip(
            "this promtool is built without Kubernetes discovery (the Debian package `prometheus` "
            "drops it); the file_sd variant of the file is checked and run by the next tests"
        )
    assert result.returncode == 0 and "SUCCESS" in output, output


@needs_promtool
def test_promtool_accepts_kubernetes_config_with_file_sd(tmp_path: Path) -> None:
    """Everything in kubernetes.yml but its discovery block, and the pod-shaped targets file the
    relabeling test feeds it, pass promtool."""
    pods_file = tmp_path / "pods.json"
    pods_file.write_text(json.dumps(kubernetes_pods(41003)))
    config = kubernetes_config_with_file_sd(tmp_path / "kubernetes.yml", pods_file)
    result = promtool("check", "config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "SUCCESS" in output and "WARNING" not in output, output


@needs_promtool
def test_alert_rules_fire_while_policy_is_rejected(tmp_path: Path) -> None:
    """meshlib-alerts.yml passes promtool, and MeshlibPolicyRejected fires only once a
    process has rejected its policy for a minute, and stops once a change loads (promtool's
    rule unit tests, on a series shaped as meshlib exports it)."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    tests = tmp_path / "alerts_test.yml"
    series = 'meshlib_policy_last_reload_successful{instance="reviews:15020"}'
    tests.write_text(
        json.dumps(
            {
                "rule_files": [str(ALERTS)],
                "evaluation_interval": "30s",
                "tests": [
                    {
                        "interval": "30s",
                        # loaded, rejected from 1m to 3m30s, loaded again
                        "input_series": [{"series": series, "values": "1 1 0 0 0 0 0 0 1 1"}],
                        "alert_rule_test": [
                            {"eval_time": "1m30s", "alertname": "MeshlibPolicyRejected"},
                            {
                                "eval_time": "2m",
                                "alertname": "MeshlibPolicyRejected",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {
                                            "severity": "warning",
                                            "instance": "reviews:15020",
                                        },
                                        "exp_annotations": {
                                            "summary": "reviews:15020 rejects its new policy",
                                            "description": (
                                                "The policy files of reviews:15020 have errors"
                                                " since their last change, and it still serves"
                                                " the last policy that loaded. `meshlib check"
                                                " <files>` lists the errors; the process logs"
                                                " them too (logger meshlib.policy, with file,"
                                                " line and field)."
                                            ),
                                        },
                                    }
                                ],
                            },
                            {"eval_time": "4m", "alertname": "MeshlibPolicyRejected"},
                        ],
                    }
                ],
            }
        )
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Prometheus configs, running ---------------------------------------------------------


@needs_prometheus
def test_demo_config_scrapes_the_demo_targets(servers: Servers, workloads: Workloads) -> None:
    """demo.yml finds every process in .demo/targets.json, scrapes /stats/prometheus, and the
    Istio series carry the file's app and version labels."""
    prom = servers.demo
    prom.wait_for_targets(len(workloads.ports))
    active = prom.targets()["activeTargets"]
    assert {(t["labels"]["app"], t["labels"]["version"], t["health"]) for t in active} == {
        ("productpage", "v1", "up"),
        ("reviews", "v1", "up"),
        ("reviews", "v2", "up"),
    }
    assert {httpx.URL(t["scrapeUrl"]).path for t in active} == {"/stats/prometheus"}
    assert all(t["scrapeInterval"] in ("1s", "2s", "3s", "4s", "5s") for t in active), active
    series = prom.series('istio_requests_total{app="reviews"}')
    assert {(s["version"], s["reporter"], s["destination_workload"]) for s in series} == {
        ("v1", "destination", "reviews-v1"),
        ("v2", "destination", "reviews-v2"),
    }
    callers = prom.series('istio_requests_total{app="productpage",version="v1"}')
    assert {s["destination_service_name"] for s in callers} == {"reviews", "ratings"}
    assert {s["reporter"] for s in callers} == {"source"}


@needs_prometheus
def test_kubernetes_relabeling(servers: Servers, workloads: Workloads) -> None:
    """kubernetes.yml keeps running pods annotated prometheus.io/scrape=true, one target each,
    honours prometheus.io/port, /path and /scheme (defaults 15020 and /stats/prometheus), labels
    targets like Istio's Prometheus, and scrapes the annotated meshlib pod."""
    prom = servers.kubernetes
    prom.wait_for_targets(1)
    targets = prom.targets()
    active = {t["labels"]["pod"]: t for t in targets["activeTargets"]}
    reviews_port = workloads.ports["reviews-v1"]
    assert {name: t["scrapeUrl"] for name, t in active.items()} == {
        REVIEWS_POD: f"http://127.0.0.1:{reviews_port}/metrics",
        "ratings-v1-6c9d8b7f5-q8w2e": "http://192.0.2.10:15020/stats/prometheus",
        "details-v1-7d9c6f8b4-k2j4h": "https://[fd00::a]:15020/stats/prometheus",
    }
    reviews = active[REVIEWS_POD]
    assert reviews["health"] == "up", reviews
    assert reviews["labels"] == {
        "app": "reviews",
        "version": "v1",
        "pod_template_hash": "5d8f7c9b4",
        "namespace": "bookinfo",
        "pod": REVIEWS_POD,
        "node": "node-1",
        "instance": f"127.0.0.1:{reviews_port}",
        "job": "kubernetes-pods",
    }
    dropped = {
        t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in targets["droppedTargets"]
    }
    assert dropped == {"legacy-7f9b8c6d5-m3n4p", "migrate-x7k2p"}
    scraped = prom.series(f'istio_requests_total{{namespace="bookinfo",pod="{REVIEWS_POD}"}}')
    assert scraped and {s["destination_workload"] for s in scraped} == {"reviews-v1"}
    assert {(s["app"], s["version"], s["node"]) for s in scraped} == {("reviews", "v1", "node-1")}


# --- the Grafana dashboard -------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def expressions() -> dict[str, str]:
    """Every panel query, by "<panel title>-<refId>"."""
    return {
        f"{panel['title']}-{target['refId']}": target["expr"]
        for panel in panels(load_dashboard())
        for target in panel.get("targets", [])
    }


def substitute(text: str, values: dict[str, str]) -> str:
    """Grafana's interpolation of $name and ${name}, for one chosen value per variable."""
    result = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)
    assert "$" not in result, result
    return result


# Keywords and grouping clauses: what is left of an expression after them is metric names.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"offset", "and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", stripped)  # label matchers, ranges
    stripped = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", stripped
    )
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped):
        is_function = stripped[match.end() :].lstrip().startswith("(")
        if not is_function and match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


SELECTIONS = [
    pytest.param(
        {"reporter": "destination", "namespace": ".*", "service": ".*", "workload": ".*"},
        id="destination-all",
    ),
    pytest.param(
        {"reporter": "source", "namespace": ".*", "service": ".*", "workload": ".*"},
        id="source-all",
    ),
    pytest.param(
        {
            "reporter": "destination",
            "namespace": "default",
            "service": "reviews",
            "workload": "reviews-v1",
        },
        id="destination-reviews-v1",
    ),
]


def test_dashboard_is_a_valid_grafana_model() -> None:
    """The dashboard imports into any Grafana: one `${datasource}` variable of type prometheus
    used everywhere, the reporter, namespace, service and workload variables from
    istio_requests_total, unique ids, panels on the 24-column grid without overlaps, and no
    reference to an undefined variable."""
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["id"] is None and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == VARIABLES
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    reporter = variables["reporter"]
    assert reporter["type"] == "custom" and not reporter["multi"]
    assert [o["value"] for o in reporter["options"]] == ["destination", "source"]
    assert reporter["current"]["value"] == "destination"
    for name in ("namespace", "service", "workload"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE, variable
        assert variable["definition"].startswith("label_values(istio_requests_total{"), variable
        assert variable["query"]["query"] == variable["definition"], variable
        assert variable["includeAll"] and variable["allValue"] == ".*", variable

    every = panels(dashboard)
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"] for t in panel["targets"]), panel
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]

    texts = [t["expr"] for p in every for t in p.get("targets", [])]
    texts += [v["definition"] for v in variables.values() if v["type"] == "query"]
    used = {
        m.group(1) or m.group(2)
        for text in texts
        for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", text)
    }
    assert used <= set(VARIABLES) | GRAFANA_BUILTINS, used - set(VARIABLES)
    assert {"reporter", "namespace", "service", "workload", "__rate_interval"} <= used


def test_dashboard_uses_only_metrics_meshlib_exports(workloads: Workloads) -> None:
    """Every panel query selects Istio metric names that meshlib's exposition contains."""
    exported = workloads.exported_names()
    for expr in expressions().values():
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (names - exported, expr)
        assert all(name.startswith("istio_") for name in names), expr


@pytest.fixture(scope="module")
def scraped(servers: Servers, workloads: Workloads) -> float:
    """A moment at which the demo's Prometheus holds at least 5 scrapes of every series inside
    the rate window (the dashboard's queries are evaluated there)."""
    prom = servers.demo
    prom.wait_for_targets(len(workloads.ports))
    deadline = time.monotonic() + 20
    while True:
        counts = prom.query(f"min(count_over_time(istio_requests_total[{RATE_INTERVAL}]))")
        if counts and float(counts[0]["value"][1]) >= 5:
            return time.time()
        if time.monotonic() > deadline:
            raise AssertionError(f"too few scrapes: {counts}\n{prom.logs()}")
        time.sleep(0.2)


@needs_prometheus
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("expr", list(expressions().values()), ids=list(expressions()))
def test_dashboard_query_answers(
    servers: Servers, scraped: float, expr: str, selection: dict[str, str]
) -> None:
    """With the template variables set, each panel query is valid PromQL for the real Prometheus
    and finds numbers in scraped meshlib metrics."""
    query = substitute(expr, {**selection, "__rate_interval": RATE_INTERVAL})
    result = servers.demo.query(query, scraped)  # asserts status success
    values = [float(sample["value"][1]) for sample in result]
    assert any(math.isfinite(value) for value in values), (query, result)


def legends(result: list[dict[str, Any]], *labels: str) -> set[tuple[str, ...]]:
    return {tuple(r["metric"].get(label, "") for label in labels) for r in result}


@needs_prometheus
def test_dashboard_shows_the_traffic(servers: Servers, scraped: float) -> None:
    """The panels say what happened: both reviews versions serve, callers also see the ratings
    failures meshlib answered itself (503 UF,URX), success rates and percentiles are sane, and
    the variables list what Grafana should offer."""
    dashboard = load_dashboard()
    by_title = {p["title"]: p for p in panels(dashboard)}
    prom = servers.demo

    def run(title: str, reporter: str, ref: str = "A") -> list[dict[str, Any]]:
        (target,) = [t for t in by_title[title]["targets"] if t["refId"] == ref]
        selection = {"reporter": reporter, "namespace": ".*", "service": ".*", "workload": ".*"}
        return prom.query(
            substitute(target["expr"], {**selection, "__rate_interval": RATE_INTERVAL}), scraped
        )

    per_version = "Requests/s by service and version"
    version_labels = ("destination_service_name", "destination_version")
    assert legends(run(per_version, "destination"), *version_labels) == {
        ("reviews", "v1"),
        ("reviews", "v2"),
    }
    assert legends(run(per_version, "source"), *version_labels) == {
        ("reviews", "v1"),
        ("reviews", "v2"),
        ("ratings", "unknown"),
    }
    failures = run("5xx/s by response code and flags", "source")
    flags = legends(failures, "destination_service_name", "response_code", "response_flags")
    assert ("ratings", "503", "UF,URX") in flags, flags
    (success,) = run("Success rate", "destination")
    assert 0.8 < float(success["value"][1]) < 1, success  # reviews fails 1 in 10
    # A version whose every answer failed shows 0%, not nothing (ratings refuses every call).
    by_version = run("Success rate by service and version", "source")
    rates = {
        (r["metric"]["destination_service_name"], r["metric"]["destination_version"]): float(
            r["value"][1]
        )
        for r in by_version
    }
    assert rates[("ratings", "unknown")] == 0.0, rates
    assert 0.8 < rates[("reviews", "v1")] <= 1 and 0.8 < rates[("reviews", "v2")] <= 1, rates
    p50, p90, p99 = (
        float(run("Latency p50 / p90 / p99", "destination", ref)[0]["value"][1]) for ref in "ABC"
    )
    assert 1 <= p50 <= p90 <= p99 < 1000, (p50, p90, p99)

    variables = {
        v["name"]: v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    }

    def options(name: str, reporter: str) -> list[str]:
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name])
        assert match, variables[name]
        selection = {"reporter": reporter, "namespace": ".*", "service": ".*"}
        return prom.label_values(match.group(2), substitute(match.group(1), selection))

    assert options("namespace", "destination") == ["default"]
    assert options("service", "destination") == ["reviews"]
    assert options("service", "source") == ["ratings", "reviews"]
    assert options("workload", "destination") == ["reviews-v1", "reviews-v2"]
    assert options("workload", "source") == ["reviews-v1", "reviews-v2", "unknown"]
