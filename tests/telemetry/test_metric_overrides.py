"""Telemetry `metrics[].overrides`: metrics switched off per side, labels removed or set."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from meshlib.config import MeshConfig
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry.metric_overrides import FAMILIES, MetricOverrides
from meshlib.telemetry.metrics import IstioMetrics, render
from meshlib.telemetry.peer import UNKNOWN_PEER

CONFIG = MeshConfig(service="reviews", version="v1")


def policy(metrics: str, namespace: str = "default") -> Snapshot:
    text = (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: t, namespace: {namespace}}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(metrics).strip(), "  ")
        + "\n"
    )
    result = load_text(text, "telemetry.yaml")
    result.raise_for_errors()
    return Snapshot.build(result.resources, CONFIG)


def record(metrics: IstioMetrics, reporter: str, code: int, flags: str = "-") -> None:
    metrics.record(
        reporter,  # type: ignore[arg-type]
        UNKNOWN_PEER,
        destination_service="ratings.default.svc.cluster.local",
        destination_service_name="ratings",
        destination_service_namespace="default",
        response_code=code,
        response_flags=flags,
        duration_ms=3.0,
        request_bytes=10,
        response_bytes=20,
    )


def scraped(metrics: IstioMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value), from a real scrape's text."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(render(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name.startswith("istio_") and not sample.name.endswith("_bucket"):
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def recorded(snapshot: Snapshot) -> IstioMetrics:
    metrics = IstioMetrics(CollectorRegistry(), CONFIG)
    metrics.apply(snapshot)
    for reporter in ("source", "destination"):
        record(metrics, reporter, 200)
        record(metrics, reporter, 200, flags="URX")
        record(metrics, reporter, 503, flags="UF")
    return metrics


def test_removing_a_label_merges_the_series_it_told_apart() -> None:
    metrics = recorded(
        policy(
            """
            metrics:
            - overrides:
              - tagOverrides: {response_flags: {operation: REMOVE}}
            """
        )
    )
    series = scraped(metrics)
    requests = series["istio_requests_total"]
    assert all("response_flags" not in labels for labels, _ in requests)
    by_code = {(lab["reporter"], lab["response_code"]): v for lab, v in requests}
    assert by_code == {
        ("source", "200"): 2.0,
        ("source", "503"): 1.0,
        ("destination", "200"): 2.0,
        ("destination", "503"): 1.0,
    }
    counts = series["istio_request_duration_milliseconds_count"]
    sums = series["istio_request_duration_milliseconds_sum"]
    assert {(lab["reporter"], lab["response_code"]): v for lab, v in counts}[
        ("source", "200")
    ] == 2.0
    assert {(lab["reporter"], lab["response_code"]): v for lab, v in sums}[("source", "200")] == 6.0


def test_a_metric_switched_off_for_one_side_and_a_label_set_for_the_other() -> None:
    metrics = recorded(
        policy(
            """
            metrics:
            - overrides:
              - match: {metric: REQUEST_SIZE, mode: CLIENT}
                disabled: true
              - match: {metric: REQUEST_COUNT, mode: SERVER}
                tagOverrides: {mesh_region: {value: "'eu-west-1'"}}
            """
        )
    )
    series = scraped(metrics)
    sizes = {labels["reporter"] for labels, _ in series["istio_request_bytes_count"]}
    assert sizes == {"destination"}, "REQUEST_SIZE is off on the client (source) side"
    regions = {
        (lab["reporter"], lab.get("mesh_region")) for lab, _ in series["istio_requests_total"]
    }
    assert regions == {("destination", "eu-west-1"), ("source", None)}
    assert {lab["reporter"] for lab, _ in series["istio_response_bytes_count"]} == {
        "source",
        "destination",
    }


def mesh_and_namespace(mesh: str, namespace: str) -> Snapshot:
    """A root-namespace Telemetry with `mesh` metrics and a `default` one with `namespace`."""
    telemetries = policy(mesh, namespace="istio-system").telemetries
    return Snapshot.build([*telemetries, *policy(namespace).telemetries], CONFIG)


def switched_off(overrides: MetricOverrides) -> set[tuple[str, str]]:
    """(metric, reporter) pairs that are off."""
    return {
        (name, reporter)
        for family, name in enumerate(FAMILIES)
        for reporter in ("source", "destination")
        if overrides.rule(family, reporter).disabled
    }


def test_levels_apply_mesh_first_and_a_workload_can_undo() -> None:
    """The mesh switches REQUEST_SIZE off; the namespace switches it back on."""
    mesh_wide = policy(
        "metrics: [{overrides: [{match: {metric: REQUEST_SIZE}, disabled: true}]}]",
        namespace="istio-system",
    )
    assert switched_off(MetricOverrides.of(mesh_wide, CONFIG)) == {
        ("REQUEST_SIZE", "source"),
        ("REQUEST_SIZE", "destination"),
    }
    both = mesh_and_namespace(
        "metrics: [{overrides: [{match: {metric: REQUEST_SIZE}, disabled: true}]}]",
        "metrics: [{overrides: [{match: {metric: REQUEST_SIZE}, disabled: false}]}]",
    )
    assert switched_off(MetricOverrides.of(both, CONFIG)) == set()


ALL_OFF = "metrics: [{overrides: [{match: {metric: ALL_METRICS}, disabled: true}]}]"
EVERY_METRIC = {(name, r) for name in FAMILIES for r in ("source", "destination")}


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param(
            "metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: false}]}]",
            id="A-one-metric-switched-on",
        ),
        pytest.param(
            "metrics: [{overrides: [{tagOverrides: {request_protocol: {operation: REMOVE}}}]}]",
            id="B-a-label-removed",
        ),
        pytest.param(
            "metrics: [{overrides: [{match: {customMetric: my_metric}}]}]",
            id="a-custom-metric",
        ),
    ],
)
def test_any_later_override_switches_all_metrics_back_on(namespace: str) -> None:
    """ALL_METRICS disabled is a switch for a whole side, not a per-metric setting: any later
    override for that side clears it, and every metric is back (Istio's mergeMetrics)."""
    assert switched_off(MetricOverrides.of(policy(ALL_OFF, "istio-system"), CONFIG)) == (
        EVERY_METRIC
    )
    metrics = recorded(mesh_and_namespace(ALL_OFF, namespace))
    assert switched_off(metrics.overrides) == set()
    series = scraped(metrics)
    for family in ("requests_total", "request_duration_milliseconds_count"):
        sides = {labels["reporter"] for labels, _ in series[f"istio_{family}"]}
        assert sides == {"source", "destination"}, family
    assert "istio_request_bytes_count" in series and "istio_response_bytes_count" in series


def test_all_metrics_off_for_one_side_comes_back_only_by_an_override_for_that_side() -> None:
    """Disabling ALL_METRICS for SERVER and then changing a CLIENT metric leaves SERVER off."""
    overrides = MetricOverrides.of(
        mesh_and_namespace(
            "metrics: [{overrides: [{match: {mode: SERVER}, disabled: true}]}]",
            """
            metrics:
            - overrides:
              - match: {metric: REQUEST_COUNT, mode: CLIENT}
                tagOverrides: {destination_canonical_service: {operation: REMOVE}}
            """,
        ),
        CONFIG,
    )
    assert switched_off(overrides) == {(name, "destination") for name in FAMILIES}
    assert overrides.rule(0, "source").removed == {"destination_canonical_service"}


def test_a_metric_switched_off_by_name_stays_off_when_all_metrics_comes_back() -> None:
    """Only a per-metric override sets a metric's own `disabled`; clearing the ALL_METRICS
    switch leaves it as it was."""
    overrides = MetricOverrides.of(
        mesh_and_namespace(
            """
            metrics:
            - overrides:
              - match: {metric: REQUEST_SIZE}
                disabled: true
              - disabled: true
            """,
            "metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: false}]}]",
        ),
        CONFIG,
    )
    assert switched_off(overrides) == {("REQUEST_SIZE", "source"), ("REQUEST_SIZE", "destination")}


def test_no_overrides_leave_the_rows_as_they_are() -> None:
    metrics = recorded(Snapshot.empty(CONFIG))
    assert metrics.overrides.empty
    assert len(scraped(metrics)["istio_requests_total"]) == 6


def test_expressions_other_than_string_literals_are_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="meshlib.telemetry"):
        overrides = MetricOverrides.of(
            policy(
                """
                metrics:
                - overrides:
                  - tagOverrides:
                      host: {value: "request.host"}
                      team: {value: '"bookinfo"'}
                """
            ),
            CONFIG,
        )
    rule = overrides.rule(0, "destination")
    assert dict(rule.upserts) == {"team": "bookinfo"}
    assert "request.host" in caplog.text and "CEL string literal" in caplog.text


def test_both_renderers_agree() -> None:
    """meshlib's fast text and prometheus-client's own rendering of the overridden rows."""
    from prometheus_client import generate_latest

    metrics = recorded(
        policy(
            """
            metrics:
            - overrides:
              - tagOverrides: {response_flags: {operation: REMOVE}, team: {value: "'books'"}}
              - match: {metric: RESPONSE_SIZE}
                disabled: true
            """
        )
    )

    def parsed(text: bytes) -> dict[str, list[tuple[str, list[tuple[str, str]], float]]]:
        return {
            f.name: sorted((s.name, sorted(s.labels.items()), s.value) for s in f.samples)
            for f in text_string_to_metric_families(text.decode())
            if f.samples
        }

    assert parsed(render(metrics.registry)) == parsed(generate_latest(metrics.registry))


WORKER = """
import sys
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry.metrics import IstioMetrics, exposed_registry, render
from meshlib.telemetry.peer import UNKNOWN_PEER

config = MeshConfig(service="reviews")
metrics = IstioMetrics(config=config)
for flags in ("-", "URX", "UF"):
    metrics.record("source", UNKNOWN_PEER, destination_service="ratings", destination_service_name="ratings",
                   destination_service_namespace="default", response_code=200, response_flags=flags,
                   duration_ms=1.0, request_bytes=1, response_bytes=1)
text = sys.stdin.read()
result = load_text(text, "t.yaml")
result.raise_for_errors()
metrics.apply(Snapshot.build(result.resources, config))
sys.stdout.write(render(exposed_registry()).decode())  # no Mesh serving yet: as recorded
print()
print("#---")
metrics.render_multiprocess_with_these()  # what the serving Mesh does
sys.stdout.write(render(exposed_registry()).decode())
"""


def test_multiprocess_view_applies_them(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    telemetry = textwrap.dedent(
        """
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: t, namespace: default}
        spec:
          metrics:
          - overrides: [{tagOverrides: {response_flags: {operation: REMOVE}}}]
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER],
        input=telemetry,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    before, after = out.split("\n#---\n")

    def requests(text: str) -> list[tuple[dict[str, str], float]]:
        return [
            (dict(s.labels), s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "istio_requests_total"
        ]

    assert len(requests(before)) == 3
    ((labels, value),) = requests(after)
    assert value == 3.0 and "response_flags" not in labels


def test_overrides_for_other_providers_and_reserved_labels_are_left_out() -> None:
    overrides = MetricOverrides.of(
        policy(
            """
            metrics:
            - providers: [{name: stackdriver}]
              overrides: [{disabled: true}]
            - providers: [{name: prometheus}]
              overrides:
              - tagOverrides: {le: {value: "'x'"}, __name__: {value: "'y'"}, ok: {value: "'z'"}}
            """
        ),
        CONFIG,
    )
    rule = overrides.rule(0, "source")
    assert not rule.disabled, "the stackdriver entry is not meshlib's"
    assert dict(rule.upserts) == {"ok": "z"}


@pytest.mark.parametrize(
    ("mesh", "namespace"),
    [
        pytest.param("metrics: []", "metrics: [{providers: [{name: stackdriver}]}]", id="C"),
        pytest.param(
            "metrics: [{providers: [{name: stackdriver}]}]",
            "metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]}]",
            id="D",
        ),
    ],
)
def test_without_prometheus_in_scope_no_istio_metric_is_exported(mesh: str, namespace: str) -> None:
    """Only the providers the last entry naming any names stay in scope (Istio's mergeMetrics):
    a namespace's `[stackdriver]` (C), or the mesh's, which the namespace's entry inherits (D),
    leaves Prometheus out, so a sidecar has no stats filter and meshlib exports nothing."""
    metrics = recorded(mesh_and_namespace(mesh, namespace))
    assert switched_off(metrics.overrides) == EVERY_METRIC
    assert scraped(metrics) == {}


def test_an_entry_without_providers_inherits_the_one_before() -> None:
    """Across levels, an entry without `providers` is for its predecessor's: the mesh's second
    entry is stackdriver's (left out), the namespace's second is prometheus's (applied)."""
    overrides = MetricOverrides.of(
        mesh_and_namespace(
            """
            metrics:
            - providers: [{name: stackdriver}]
              overrides: [{match: {metric: REQUEST_SIZE}, disabled: true}]
            - overrides: [{match: {metric: RESPONSE_SIZE}, disabled: true}]
            """,
            """
            metrics:
            - providers: [{name: prometheus}]
            - overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]
            """,
        ),
        CONFIG,
    )
    assert switched_off(overrides) == {
        ("REQUEST_COUNT", "source"),
        ("REQUEST_COUNT", "destination"),
    }


def test_the_prometheus_provider_is_named_in_any_case() -> None:
    """`Prometheus` is the prometheus provider (Istio's fetchProvider uses EqualFold); entries
    are matched to the provider in scope by their exact name, so the mesh's `prometheus`
    entry is not the namespace's `PROMETHEUS` one and is left out, as in Istio."""
    overrides = MetricOverrides.of(
        mesh_and_namespace(
            """
            metrics:
            - providers: [{name: prometheus}]
              overrides: [{match: {metric: REQUEST_SIZE}, disabled: true}]
            """,
            """
            metrics:
            - providers: [{name: PROMETHEUS}]
              overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]
            """,
        ),
        CONFIG,
    )
    assert switched_off(overrides) == {
        ("REQUEST_COUNT", "source"),
        ("REQUEST_COUNT", "destination"),
    }


def test_closing_a_mesh_stops_its_overrides_applying_to_the_multiprocess_view() -> None:
    from meshlib.mesh import Mesh
    from meshlib.telemetry import _metrics_multiprocess as metrics_module

    mesh = Mesh(CONFIG, watch=False)
    mesh.metrics.render_multiprocess_with_these()
    assert metrics_module._multiprocess_overrides is mesh.metrics
    mesh.close()
    assert metrics_module._multiprocess_overrides is None
