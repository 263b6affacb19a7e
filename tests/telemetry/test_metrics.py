"""Istio's standard metrics: labels, values, exposition, serving, threads and processes."""

from __future__ import annotations

import asyncio
import doctest
import gzip
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from meshlib.config import MeshConfig
from meshlib.telemetry import metrics
from meshlib.telemetry.metrics import (
    CONTENT_TYPE,
    DURATION_BUCKETS,
    REQUEST_LABELS,
    IstioMetrics,
    MultiProcessMetrics,
    OperationalMetrics,
    cluster_name,
    metrics_asgi_app,
    metrics_wsgi_app,
    render,
    serve_metrics,
)
from meshlib.telemetry.peer import UNKNOWN_PEER, PeerIdentity
from meshlib.telemetry.peer import decode as peer_decode

ROOT = Path(__file__).parent.parent.parent
REVIEWS = MeshConfig(
    service="reviews",
    version="v2",
    namespace="bookinfo",
    workload="reviews-v2",
    service_account="bookinfo-reviews",
)
PRODUCTPAGE = PeerIdentity(
    workload="productpage-v1",
    namespace="bookinfo",
    app="productpage",
    version="v1",
    canonical_service="productpage",
    canonical_revision="v1",
    principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
    cluster="Kubernetes",
)
RATINGS = PeerIdentity(
    workload="ratings-v1",
    namespace="bookinfo",
    app="ratings",
    version="v1",
    canonical_service="ratings",
    canonical_revision="v1",
    principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings",
    cluster="west",
)
RATINGS_CALL: dict[str, Any] = {
    "destination_service": "ratings.bookinfo.svc.cluster.local",
    "destination_service_name": "ratings",
    "destination_service_namespace": "bookinfo",
}
REVIEWS_CALL: dict[str, Any] = {
    "destination_service": "reviews.bookinfo.svc.cluster.local",
    "destination_service_name": "reviews",
    "destination_service_namespace": "bookinfo",
}
SIZES: dict[str, Any] = {"duration_ms": 12.0, "request_bytes": 300, "response_bytes": 4000}


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of the test's own."""
    return CollectorRegistry()


@pytest.fixture
def istio(registry: CollectorRegistry) -> IstioMetrics:
    """Istio metrics of reviews-v2 in bookinfo, single-process storage."""
    return IstioMetrics(registry, REVIEWS, multiprocess=False)


def families(text: bytes) -> dict[str, Any]:
    """Parsed exposition text, by family name."""
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_metric_names_types_label_order_and_buckets(
    istio: IstioMetrics, registry: CollectorRegistry
) -> None:
    """Exactly Istio's four families, types, 25 labels in §7.2 order and Envoy's buckets."""
    assert REQUEST_LABELS == (
        "reporter",
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_service",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_service_name",
        "destination_service_namespace",
        "destination_cluster",
        "request_protocol",
        "response_code",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    )
    assert DURATION_BUCKETS == (
        0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
        600000, 1800000, 3600000,
    )  # fmt: skip
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    text = render(registry).decode()
    assert "# TYPE istio_requests_total counter\n" in text
    for name in (
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ):
        assert f"# TYPE {name} histogram\n" in text
        buckets = [s for s in families(text.encode())[name].samples if s.name.endswith("_bucket")]
        assert [s.labels["le"] for s in buckets] == [
            "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000",
            "10000", "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf",
        ]  # fmt: skip
    line = next(ln for ln in text.splitlines() if ln.startswith("istio_requests_total{"))
    names = [item.split("=")[0] for item in line.split("{")[1].split("}")[0].split('",')]
    assert tuple(names) == REQUEST_LABELS


def test_destination_report_labels(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """reporter=destination: source_* from the peer, destination_* from this workload."""
    istio.record(
        "destination",
        PRODUCTPAGE,
        response_code=200,
        connection_security_policy="mutual_tls",
        **REVIEWS_CALL,
        **SIZES,
    )
    labels = {
        "reporter": "destination",
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "bookinfo",
        "source_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews.bookinfo.svc.cluster.local",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    assert registry.get_sample_value("istio_requests_total", labels) == 1.0
    assert registry.get_sample_value("istio_request_duration_milliseconds_sum", labels) == 12.0
    assert registry.get_sample_value("istio_request_bytes_sum", labels) == 300.0
    assert registry.get_sample_value("istio_response_bytes_sum", labels) == 4000.0


def test_source_report_labels_with_synthesized_answer(
    istio: IstioMetrics, registry: CollectorRegistry
) -> None:
    """reporter=source: source_* from this workload, destination_* from the peer, with flags."""
    istio.record(
        "source",
        RATINGS,
        response_code=503,
        response_flags="UO",
        **RATINGS_CALL,
        duration_ms=0.2,
        request_bytes=0,
        response_bytes=81,
    )
    labels = {
        "reporter": "source",
        "source_workload": "reviews-v2",
        "source_canonical_service": "reviews",
        "source_canonical_revision": "v2",
        "source_workload_namespace": "bookinfo",
        "source_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "source_app": "reviews",
        "source_version": "v2",
        "source_cluster": "Kubernetes",
        "destination_workload": "ratings-v1",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings",
        "destination_app": "ratings",
        "destination_version": "v1",
        "destination_service": "ratings.bookinfo.svc.cluster.local",
        "destination_canonical_service": "ratings",
        "destination_canonical_revision": "v1",
        "destination_service_name": "ratings",
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "west",
        "request_protocol": "http",
        "response_code": "503",
        "grpc_response_status": "",
        "response_flags": "UO",
        "connection_security_policy": "unknown",
    }
    assert registry.get_sample_value("istio_requests_total", labels) == 1.0
    bucket = {**labels, "le": "0.5"}
    assert registry.get_sample_value("istio_request_duration_milliseconds_bucket", bucket) == 1.0


def test_unknown_peer_and_unlabelled_workload(registry: CollectorRegistry) -> None:
    """Unknown peer: Istio's "unknown" ("latest" revision); local app/version empty if unset."""
    istio = IstioMetrics(
        registry, MeshConfig(workload="batch", namespace="jobs"), multiprocess=False
    )
    istio.record(
        "destination",
        UNKNOWN_PEER,
        request_protocol="grpc",
        response_code=200,
        grpc_response_status="14",
        **REVIEWS_CALL,
        **SIZES,
    )
    labels = {
        "reporter": "destination",
        "source_workload": "unknown",
        "source_canonical_service": "unknown",
        "source_canonical_revision": "latest",
        "source_workload_namespace": "unknown",
        "source_principal": "unknown",
        "source_app": "unknown",
        "source_version": "unknown",
        "source_cluster": "unknown",
        "destination_workload": "batch",
        "destination_workload_namespace": "jobs",
        "destination_principal": "spiffe://cluster.local/ns/jobs/sa/default",
        "destination_app": "",
        "destination_version": "",
        "destination_service": "reviews.bookinfo.svc.cluster.local",
        "destination_canonical_service": "batch",
        "destination_canonical_revision": "latest",
        "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "Kubernetes",
        "request_protocol": "grpc",
        "response_code": "200",
        "grpc_response_status": "14",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    assert registry.get_sample_value("istio_requests_total", labels) == 1.0


def test_service_namespace_falls_back_to_destination(
    istio: IstioMetrics, registry: CollectorRegistry
) -> None:
    """An unknown service namespace is the destination workload's (Istio's client fallback)."""
    call = {**RATINGS_CALL, "destination_service_namespace": ""}
    istio.record("source", RATINGS, response_code=200, **call, **SIZES)
    istio.record("destination", PRODUCTPAGE, response_code=200, **call, **SIZES)
    got = families(generate_latest(registry))["istio_requests"].samples
    assert [s.labels["destination_service_namespace"] for s in got] == ["bookinfo", "bookinfo"]


def test_histogram_values(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """Buckets are cumulative and `le` inclusive; _sum and _count add up; bad values count as 0."""
    for duration in (0.5, 0.6, 3600000.0, 4e6, float("nan"), -3.0):
        istio.record(
            "destination",
            PRODUCTPAGE,
            response_code=200,
            **REVIEWS_CALL,
            duration_ms=duration,
            request_bytes=-1,
            response_bytes=1,
        )
    fams = families(render(registry))
    samples = fams["istio_request_duration_milliseconds"].samples
    bucket = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert (bucket["0.5"], bucket["1"], bucket["3600000"], bucket["+Inf"]) == (3, 4, 5, 6)
    assert {s.name: s.value for s in samples if not s.name.endswith("_bucket")} == {
        "istio_request_duration_milliseconds_count": 6.0,
        "istio_request_duration_milliseconds_sum": 0.5 + 0.6 + 3600000.0 + 4e6,
    }
    sizes = {s.name: s.value for s in fams["istio_request_bytes"].samples}
    assert sizes["istio_request_bytes_sum"] == 0.0
    assert fams["istio_requests"].samples[0].value == 6.0


@pytest.mark.parametrize(
    ("arguments", "label", "expected"),
    [
        pytest.param({"response_flags": 'UO"\n'}, "response_flags", "-", id="flags"),
        pytest.param({"response_flags": "UF,URX"}, "response_flags", "UF,URX", id="two-flags"),
        pytest.param({"request_protocol": "HTTP/1.1"}, "request_protocol", "unknown", id="proto"),
        pytest.param({"grpc_response_status": "abc"}, "grpc_response_status", "", id="grpc"),
        pytest.param({"response_code": 1234}, "response_code", "0", id="code"),
        pytest.param(
            {"connection_security_policy": "tls"}, "connection_security_policy", "unknown", id="csp"
        ),
        pytest.param(
            {"destination_service": "x" * 1000}, "destination_service", "x" * 253, id="long"
        ),
        pytest.param({"destination_service": ""}, "destination_service", "unknown", id="empty"),
    ],
)
def test_label_values_are_bounded(
    istio: IstioMetrics,
    registry: CollectorRegistry,
    arguments: dict[str, Any],
    label: str,
    expected: str,
) -> None:
    """Values outside what Istio emits become its defaults, and long ones are cut."""
    call: dict[str, Any] = {"response_code": 200, **REVIEWS_CALL, **SIZES, **arguments}
    istio.record("destination", PRODUCTPAGE, **call)
    (sample,) = families(render(registry))["istio_requests"].samples
    assert sample.labels[label] == expected


def test_bad_reporter_is_refused(istio: IstioMetrics) -> None:
    """A reporter other than source/destination is a programming error."""
    with pytest.raises(ValueError, match="reporter"):
        istio.record("waypoint", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)  # type: ignore[arg-type]


def test_max_series_folds_peers_then_drops(registry: CollectorRegistry) -> None:
    """Past max_series, new peers count as the unknown peer, whose series may still be made up
    to twice the cap; what still does not fit is dropped and counted."""
    istio = IstioMetrics(registry, REVIEWS, max_series=2, multiprocess=False)
    for name in ("a", "b", "c", "d"):
        istio.record(
            "destination", PeerIdentity(workload=name), response_code=200, **REVIEWS_CALL, **SIZES
        )
    istio.record("destination", PRODUCTPAGE, response_code=500, **REVIEWS_CALL, **SIZES)
    for code in (502, 503, 504):  # a fifth and sixth label set: past twice the cap
        istio.record("destination", PRODUCTPAGE, response_code=code, **REVIEWS_CALL, **SIZES)
    workloads = sorted(
        (s.labels["source_workload"], s.labels["response_code"], s.value)
        for s in families(render(registry))["istio_requests"].samples
    )
    assert workloads == [
        ("a", "200", 1.0),
        ("b", "200", 1.0),
        ("unknown", "200", 2.0),  # c and d, folded
        ("unknown", "500", 1.0),  # productpage, folded into a new series past the cap
    ]
    assert registry.get_sample_value("meshlib_metric_series_dropped_total") == 3.0
    istio = IstioMetrics(CollectorRegistry(), REVIEWS, max_series=2, multiprocess=False)
    istio.record("destination", UNKNOWN_PEER, response_code=200, **REVIEWS_CALL, **SIZES)
    istio.record(
        "destination", PeerIdentity(workload="a"), response_code=200, **REVIEWS_CALL, **SIZES
    )
    istio.record(
        "destination", PeerIdentity(workload="b"), response_code=200, **REVIEWS_CALL, **SIZES
    )
    got = [
        (s.labels["source_workload"], s.value)
        for s in families(render(istio.registry))["istio_requests"].samples
    ]
    assert got == [("unknown", 2.0), ("a", 1.0)]


def test_made_up_peers_cannot_stop_real_requests_being_counted(
    registry: CollectorRegistry,
) -> None:
    """Peer metadata headers are unauthenticated without mTLS: a caller sending a new made-up
    peer on every request fills max_series, and the requests that come after — from it or
    from real callers, inbound or outbound — are still counted (as the unknown peer)."""
    istio = IstioMetrics(registry, REVIEWS, max_series=50, multiprocess=False)
    for n in range(200):
        istio.record(
            "destination",
            PeerIdentity(workload=f"attacker{n}"),
            response_code=200,
            **REVIEWS_CALL,
            **SIZES,
        )
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    istio.record("source", RATINGS, response_code=503, **RATINGS_CALL, **SIZES)
    total = sum(s.value for s in families(render(registry))["istio_requests"].samples)
    assert total == 202
    assert registry.get_sample_value("meshlib_metric_series_dropped_total") == 0.0
    assert len(istio._series) <= 2 * istio.max_series


def remembered(memo: Any, key: Any) -> bool:
    """Whether a memo (meshlib._memo) still holds `key`, in either generation."""
    return key in memo.recent or key in memo.older


def test_a_flood_of_made_up_peers_keeps_the_real_ones_cached(
    registry: CollectorRegistry,
) -> None:
    """Distinct made-up peers, 5,000 of them (25 times the cache), never push a real
    caller's entry out of the series cache: between two of its requests come 50 others, and
    each time its series is still remembered (no label work, no lock). The cache stays
    within its bound."""
    istio = IstioMetrics(registry, REVIEWS, max_series=50, multiprocess=False)
    real = ("destination", PRODUCTPAGE)
    istio.record(*real, response_code=200, **REVIEWS_CALL, **SIZES)
    (key,) = istio._cache
    for n in range(5000):
        made_up = PeerIdentity(workload=f"made-up-{n}", namespace="bookinfo")
        istio.record("destination", made_up, response_code=200, **REVIEWS_CALL, **SIZES)
        if n % 50 == 0:
            assert remembered(istio._memo, key)
            istio.record(*real, response_code=200, **REVIEWS_CALL, **SIZES)
        assert len(istio._memo) <= 4 * istio.max_series
    counted = {
        s.labels["source_workload"]: s.value
        for s in families(render(registry))["istio_requests"].samples
    }
    assert counted["productpage-v1"] == 101
    assert sum(counted.values()) == 5101


def test_the_recorder_keeps_real_callers_through_junk_and_forged_headers(
    registry: CollectorRegistry,
) -> None:
    """The middleware's recorder, keyed by the raw header: junk headers (no usable peer)
    take no place at all, and forged ones — 5,000, cached like any header, since nothing
    tells them from a real one — cannot push out a caller that keeps calling (between two of
    its requests come 10 of them, half a generation). Its memory stays within the bound."""
    istio = IstioMetrics(registry, REVIEWS, max_series=40, multiprocess=False)
    recorder = istio.destination(
        destination_service="reviews.bookinfo.svc.cluster.local",
        destination_service_name="reviews",
        destination_service_namespace="bookinfo",
        connection_security_policy="none",
    )
    header = "w=productpage-v1;n=bookinfo;a=productpage;v=v1"
    recorder.record(header, 200, 1.0, 1, 2)
    key = (header, 200, "-")
    for n in range(2000):
        recorder.record(f"junk {n}", 200, 1.0, 1, 2)
        recorder.record("w=x;" + "y" * (4000 + n % 100), 200, 1.0, 1, 2)  # over its limit
    assert len(recorder._memo) == 1 and key in recorder._cache
    for n in range(5000):
        recorder.record(f"w=forged-{n};n=bookinfo", 200, 1.0, 1, 2)
        if n % 10 == 0:
            assert remembered(recorder._memo, key)
            recorder.record(header, 200, 1.0, 1, 2)
        assert len(recorder._memo) <= istio.max_series
    counted = {
        s.labels["source_workload"]: s.value
        for s in families(render(registry))["istio_requests"].samples
    }
    assert counted["productpage-v1"] == 501
    assert sum(counted.values()) == 9501  # every request counted, junk and forged included


def test_counts_exact_under_threads(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """64 threads x 1,000 records lose nothing: counters, buckets and sums are exact."""
    start = threading.Barrier(64)

    def work(index: int) -> None:
        code = 200 if index % 2 else 503
        start.wait()
        for _ in range(1000):
            istio.record("source", RATINGS, response_code=code, **RATINGS_CALL, **SIZES)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fams = families(render(registry))
    assert sorted(s.value for s in fams["istio_requests"].samples) == [32000.0, 32000.0]
    counts = [s.value for s in fams["istio_request_bytes"].samples if s.name.endswith("_count")]
    sums = [s.value for s in fams["istio_response_bytes"].samples if s.name.endswith("_sum")]
    assert counts == [32000.0, 32000.0] and sums == [32000 * 4000.0] * 2


def test_render_equals_generate_latest(registry: CollectorRegistry) -> None:
    """The fast renderer's text parses to exactly generate_latest's families, escaping included."""
    istio = IstioMetrics(registry, REVIEWS, multiprocess=False)
    ops = OperationalMetrics(registry)
    ops.policy_loaded(7)
    ops.upstream_overflow(cluster_name("ratings.bookinfo.svc.cluster.local", "v1", 9080))
    odd = {**REVIEWS_CALL, "destination_service": 'we"ird\\host\nname'}
    for code in (200, 404, 503):
        istio.record("destination", PRODUCTPAGE, response_code=code, **REVIEWS_CALL, **SIZES)
        istio.record("source", RATINGS, response_code=code, **odd, **SIZES)
    fast, slow = render(registry), generate_latest(registry)
    assert list(text_string_to_metric_families(fast.decode())) == list(
        text_string_to_metric_families(slow.decode())
    )
    assert 'destination_service="we\\"ird\\\\host\\nname"' in fast.decode()
    assert fast.decode().count("# TYPE ") == slow.decode().count("# TYPE ")
    assert render(CollectorRegistry()) == b""


def test_render_with_every_label_removed_is_valid(registry: CollectorRegistry) -> None:
    """Telemetry overrides may remove all 25 labels: the buckets are `{le="0.5"}`, as
    prometheus-client writes them (a leading comma fails the whole scrape in Prometheus)."""
    from meshlib.telemetry.metric_overrides import LabelRule, MetricOverrides

    istio = IstioMetrics(registry, REVIEWS, multiprocess=False)
    rule = LabelRule(removed=frozenset(metrics.REQUEST_LABELS))
    istio.overrides = MetricOverrides({(family, "destination"): rule for family in range(4)})
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    fast, slow = render(registry).decode(), generate_latest(registry).decode()
    assert list(text_string_to_metric_families(fast)) == list(text_string_to_metric_families(slow))
    assert 'istio_request_duration_milliseconds_bucket{le="0.5"} 0' in fast
    assert "{," not in fast


def test_a_registry_shows_the_newest_open_meshs_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A registry given to several Meshes shows one Mesh's metrics (their names would clash):
    the newest open one's, as when configure() replaces the default Mesh given the global
    registry. Closing it shows the one before again; a Mesh that fails to build leaves the
    one shown as it was."""
    from meshlib.errors import ConfigError
    from meshlib.mesh import Mesh

    registry = CollectorRegistry()

    def scraped() -> list[float]:
        return [
            s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
            if s.name == "istio_requests_total"
        ]

    def count(mesh: Mesh, requests: int) -> None:
        for _ in range(requests):
            mesh.metrics.record(
                "destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES
            )

    config = MeshConfig(service="reviews", metrics_port=None)
    first = Mesh(config, registry=registry, watch=False)
    count(first, 1)
    second = Mesh(config, registry=registry, watch=False)  # shown instead of the first
    count(second, 2)
    assert scraped() == [2.0]
    monkeypatch.setenv("MESHLIB_TRACES_EXPORTER", "jaeger")  # fails after the metrics exist
    with pytest.raises(ConfigError):
        Mesh(config, registry=registry, watch=False)
    monkeypatch.delenv("MESHLIB_TRACES_EXPORTER")
    assert scraped() == [2.0]  # still the second's
    second.close()
    assert scraped() == [1.0]  # the first's again: it still serves
    second.close()  # a second close changes nothing
    assert scraped() == [1.0]
    first.close()
    assert generate_latest(registry) == b""


def test_unregister_in_multiprocess_mode() -> None:
    """In multiprocess mode the metrics are in no registry (the files are scraped): taking
    them out of it is nothing to do, not a KeyError."""
    registry = CollectorRegistry()
    IstioMetrics(registry, REVIEWS, multiprocess=True).unregister()
    assert generate_latest(registry) == b""


def test_render_is_faster_than_generate_latest(registry: CollectorRegistry) -> None:
    """2,000 series (500 label sets x 4 families) render several times faster than generate_latest."""
    istio = IstioMetrics(registry, REVIEWS, multiprocess=False)
    for i in range(500):
        istio.record(
            "destination",
            PRODUCTPAGE,
            response_code=100 + i,
            **REVIEWS_CALL,
            duration_ms=i,
            request_bytes=i,
            response_bytes=i,
        )
    fast = min(_timed(lambda: render(registry)) for _ in range(3))
    slow = _timed(lambda: generate_latest(registry))
    assert fast * 3 < slow, (fast, slow)


def _timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def test_duplicate_registration_is_refused(
    istio: IstioMetrics, registry: CollectorRegistry
) -> None:
    """A second IstioMetrics in one registry is an error; unregistering frees the names."""
    with pytest.raises(ValueError, match="Duplicated"):
        IstioMetrics(registry, REVIEWS, multiprocess=False)
    istio.unregister()
    IstioMetrics(registry, REVIEWS, multiprocess=False)


def test_operational_metrics(registry: CollectorRegistry) -> None:
    """Policy generation, reload errors, ejections, ejected endpoints, retry budget, overflow."""
    ops = OperationalMetrics(registry)
    cluster = cluster_name("reviews.bookinfo.svc.cluster.local", "v1", 9080)
    assert cluster == "outbound|9080|v1|reviews.bookinfo.svc.cluster.local"
    assert cluster_name("details", None, None) == "outbound|||details"
    ops.policy_loaded(4)
    assert registry.get_sample_value("meshlib_policy_last_reload_successful") == 1.0
    ops.policy_rejected(ValueError("bad"))
    ops.policy_rejected()
    assert registry.get_sample_value("meshlib_policy_last_reload_successful") == 0.0
    for key, old, new in [
        ("10.0.0.1:9080", "closed", "open"),
        ("10.0.0.2:9080", "closed", "open"),
        ("10.0.0.1:9080", "open", "closed"),  # returned by an interval sweep
        ("10.0.0.1:9080", "closed", "open"),  # a new run of errors: ejected again
        ("10.0.0.2:9080", "open", "closed"),
    ]:
        ops.ejection(cluster, key, old, new)
    ops.retry_budget_exhausted(cluster)
    ops.upstream_overflow(cluster)
    ops.upstream_overflow(cluster)
    by_cluster = {"cluster": cluster}
    value = registry.get_sample_value
    assert value("meshlib_policy_generation") == 4.0
    assert value("meshlib_policy_reload_errors_total") == 2.0
    assert value("meshlib_outlier_ejections_total", by_cluster) == 3.0
    assert value("meshlib_endpoints_ejected", by_cluster) == 1.0
    breakers = {
        s: value("meshlib_outlier_breakers", {**by_cluster, "state": s})
        for s in ("open", "half_open")
    }
    assert breakers == {"open": 1.0, "half_open": None}  # .1 ejected again; .2 closed
    ops.ejection(cluster, "10.0.0.1:9080", "open", "closed")
    assert value("meshlib_outlier_breakers", {**by_cluster, "state": "open"}) == 0.0
    assert value("meshlib_endpoints_ejected", by_cluster) == 0.0
    ops.ejection(cluster, "10.0.0.1:9080", "closed", "open")
    assert value("meshlib_retry_budget_exhausted_total", by_cluster) == 1.0
    assert value("meshlib_upstream_overflow_total", by_cluster) == 2.0
    ops.endpoints_retained(cluster, ["10.0.0.2:9080"])  # 10.0.0.1 left the cluster
    assert value("meshlib_endpoints_ejected", by_cluster) == 0.0
    assert value("meshlib_outlier_breakers", {**by_cluster, "state": "open"}) == 0.0


def test_http_server_answers_both_paths(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """serve_metrics answers /metrics and /stats/prometheus with the text format; 404 elsewhere."""
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    with serve_metrics(0, registry, host="127.0.0.1") as server:
        assert server.port > 0
        for path in ("/metrics", "/stats/prometheus", "/metrics?name[]=x"):
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == CONTENT_TYPE
                assert response.read() == render(registry)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(server.url + "/other", timeout=5)
        assert missing.value.code == 404
        missing.value.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_a_metrics_port_taken_is_an_error_naming_the_address(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A port another process holds: serve_metrics (a gunicorn master's when_ready hook)
    raises an OSError that names the address, with the socket's errno; the default Mesh
    logs the same and serves on, without the port."""
    import errno

    import meshlib
    from meshlib import mesh as mesh_module

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as taken:
            serve_metrics(port, registry, host="127.0.0.1")
        assert taken.value.errno == errno.EADDRINUSE
        assert f"meshlib: cannot serve metrics on 127.0.0.1:{port}: " in str(taken.value)
        try:
            with caplog.at_level("WARNING", logger="meshlib"):
                mesh = meshlib.configure(
                    service="reviews", metrics_port=port, metrics_host="127.0.0.1"
                )
            assert mesh.metrics_server is None
        finally:
            mesh_module.reset()
    (warning,) = [r.getMessage() for r in caplog.records if "metrics" in r.getMessage()]
    assert warning.startswith(f"meshlib: cannot serve metrics on 127.0.0.1:{port}: ")
    assert "; the app serves on without it (under several workers one process " in warning


def test_a_metrics_server_shows_its_url() -> None:
    """`repr()` of a MetricsServer (what printing `default_mesh().metrics_server` shows) is
    where it serves: the port 0 picked, say."""
    with serve_metrics(0, CollectorRegistry(), host="127.0.0.1") as server:
        assert repr(server) == f"<MetricsServer http://127.0.0.1:{server.port}>"


def test_http_server_connections(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """A scrape sent with a body (read, not taken for the next request), an absolute-form
    target, and a kept-alive connection after the server closed: it answers no more (a
    reconfigured default Mesh's old server would answer with metrics that no longer move)."""
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    server = serve_metrics(0, registry, host="127.0.0.1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        reader = sock.makefile("rb")

        def exchange(request: bytes) -> int:
            sock.sendall(request)
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            return status

        host = f"127.0.0.1:{server.port}".encode()
        assert (
            exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello") == 200
        )
        assert exchange(b"GET http://" + host + b"/metrics HTTP/1.1\r\nHost: x\r\n\r\n") == 200
        assert exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == 200
        server.close()
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.readline() == b""  # closed, not answered


def test_wsgi_app(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """The WSGI app answers GET with the metrics, and refuses other methods."""
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    app = metrics_wsgi_app(registry)
    seen: list[Any] = []
    body = b"".join(app({"REQUEST_METHOD": "GET"}, lambda *a: seen.append(a)))
    assert body == render(registry)
    assert seen[0][0] == "200 OK" and ("Content-Type", CONTENT_TYPE) in seen[0][1]
    app({"REQUEST_METHOD": "POST"}, lambda *a: seen.append(a))
    assert seen[1][0].startswith("405")


def test_asgi_app(istio: IstioMetrics, registry: CollectorRegistry) -> None:
    """The ASGI app answers GET with the metrics and handles lifespan."""
    istio.record("destination", PRODUCTPAGE, response_code=200, **REVIEWS_CALL, **SIZES)
    app = metrics_asgi_app(registry)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(messages)

        await app({"type": "lifespan"}, receive, send)
        await app({"type": "http", "method": "GET", "path": "/"}, receive, send)

    asyncio.run(run())
    assert [m["type"] for m in sent[:2]] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert sent[2]["status"] == 200
    assert (b"content-type", CONTENT_TYPE.encode()) in sent[2]["headers"]
    assert sent[3]["body"] == render(registry)


def test_scrapes_are_gzipped_when_the_scraper_takes_it(
    istio: IstioMetrics, registry: CollectorRegistry
) -> None:
    """Prometheus asks for gzip (`Accept-Encoding: gzip`), as prometheus-client's own servers
    answer it: a scrape of 25-label lines is some 60 times smaller. The port, the WSGI and the
    ASGI app all do; a scraper that does not take gzip (or refuses it, q=0) gets plain text."""
    for i in range(20):
        peer = PeerIdentity(workload=f"caller-{i}", namespace="bookinfo")
        istio.record("destination", peer, response_code=200, **REVIEWS_CALL, **SIZES)
    plain = render(registry)
    prometheus = "gzip"  # what Prometheus sends
    with serve_metrics(0, registry, host="127.0.0.1") as server:
        for accept, gzipped in ((prometheus, True), ("br, GZIP;q=0.5", True), (None, False),
                                ("gzip;q=0", False), ("identity", False)):  # fmt: skip
            request = urllib.request.Request(server.url + "/stats/prometheus")
            if accept is not None:
                request.add_header("Accept-Encoding", accept)
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read()
                encoding = response.headers["Content-Encoding"]
                assert int(response.headers["Content-Length"]) == len(body)
            assert (encoding == "gzip") is gzipped, accept
            assert (gzip.decompress(body) if gzipped else body) == plain
    assert len(gzip.compress(plain, 1)) * 20 < len(plain)

    seen: list[Any] = []
    app = metrics_wsgi_app(registry)
    environ = {"REQUEST_METHOD": "GET", "HTTP_ACCEPT_ENCODING": prometheus}
    body = b"".join(app(environ, lambda *a: seen.append(a)))
    assert ("Content-Encoding", "gzip") in seen[0][1] and gzip.decompress(body) == plain

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "headers": [(b"accept-encoding", b"gzip")]}
    asyncio.run(metrics_asgi_app(registry)(scope, receive, send))
    assert (b"content-encoding", b"gzip") in sent[0]["headers"]
    assert gzip.decompress(sent[1]["body"]) == plain


WORKER = """
import sys
from prometheus_client import CollectorRegistry
from meshlib.config import MeshConfig
from meshlib.telemetry.metrics import IstioMetrics, OperationalMetrics
from meshlib.telemetry.peer import PeerIdentity

registry = CollectorRegistry()
istio = IstioMetrics(registry, MeshConfig(service="reviews", namespace="bookinfo"))
assert istio.multiprocess
ops = OperationalMetrics(registry)
ops.policy_loaded(int(sys.argv[1]))
ops.upstream_overflow("outbound|9080||ratings.bookinfo.svc.cluster.local")
peer = PeerIdentity(workload="productpage-v1", namespace="bookinfo")
sys.stdin.readline()  # both workers are up: record at the same time
for i in range(int(sys.argv[2])):
    istio.record("destination", peer, destination_service="reviews.bookinfo.svc.cluster.local",
                 destination_service_name="reviews", destination_service_namespace="bookinfo",
                 response_code=200 if i % 4 else 500, duration_ms=i % 300, request_bytes=i,
                 response_bytes=2 * i)
"""


def test_multiprocess_workers_are_summed(tmp_path: Path) -> None:
    """Two processes recording into one directory give summed series, as prometheus-client's merge does."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(generation), str(count)],
            stdin=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for generation, count in ((3, 1000), (5, 600))
    ]
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        worker.stdin.close()
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]

    registry = CollectorRegistry()
    view = MultiProcessMetrics(str(tmp_path), registry)
    merged = families(render(registry))
    codes = {s.labels["response_code"]: s.value for s in merged["istio_requests"].samples}
    assert codes == {"200": 750.0 + 450.0, "500": 250.0 + 150.0}
    assert merged["meshlib_policy_generation"].samples[0].value == 5.0  # livemax
    assert merged["meshlib_upstream_overflow"].samples[0].value == 2.0

    reference = CollectorRegistry()
    MultiProcessCollector(reference, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert _normalized(render(registry)) == _normalized(generate_latest(reference))
    assert _normalized(generate_latest(registry)) == _normalized(generate_latest(reference))
    assert view._files  # indexed once, read by offset from then on
    assert _normalized(render(registry)) == _normalized(generate_latest(reference))


NO_DIRECTORY = """
import meshlib

try:
    meshlib.configure(service="reviews", metrics_port=None)
except meshlib.ConfigError as exc:
    print(exc)
"""


@pytest.mark.parametrize("missing", ["missing", ""], ids=["no-such-directory", "empty"])
def test_a_multiprocess_directory_that_is_not_there_is_a_config_error(
    tmp_path: Path, missing: str
) -> None:
    """PROMETHEUS_MULTIPROC_DIR naming no directory (or set empty, which prometheus-client
    would take as the working directory) stops the Mesh with a ConfigError naming the variable
    and what to do, not a FileNotFoundError from inside prometheus-client."""
    path = str(tmp_path / missing) if missing else ""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path}
    result = subprocess.run(
        [sys.executable, "-c", NO_DIRECTORY],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"PROMETHEUS_MULTIPROC_DIR={path!r}: not a directory")
    assert "create it" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no metric files in the working directory


LOWERCASE = """
import os, sys
import meshlib
from meshlib.telemetry.metrics import multiprocess_dir

mesh = meshlib.Mesh(meshlib.MeshConfig(service="reviews", metrics_port=None), watch=False)
print(mesh.metrics.multiprocess, multiprocess_dir() == sys.argv[1], sorted(os.listdir(sys.argv[1])) != [])
"""


def test_the_deprecated_lowercase_multiprocess_variable_counts(tmp_path: Path) -> None:
    """prometheus-client still takes `prometheus_multiproc_dir` (deprecated) when the
    uppercase variable is not set: meshlib's series then go to that directory too, in
    multiprocess mode, rather than meshlib counting in a registry of its own that no worker's
    scrape reads."""
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    env["prometheus_multiproc_dir"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", LOWERCASE, str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"]


TWO_MESHES = """
import sys
from prometheus_client import CollectorRegistry
from meshlib.config import MeshConfig
from meshlib.telemetry.metrics import IstioMetrics, OperationalMetrics
from meshlib.telemetry.peer import UNKNOWN_PEER

config = MeshConfig(service="productpage")
first, second = (IstioMetrics(CollectorRegistry(), config) for _ in range(2))
ops = [OperationalMetrics(CollectorRegistry()) for _ in range(2)]
call = dict(destination_service="reviews.default.svc.cluster.local",
            destination_service_name="reviews", destination_service_namespace="default",
            response_code=200, duration_ms=1.0, request_bytes=1, response_bytes=1)
for i in range(100):
    first.record("source", UNKNOWN_PEER, **call)
for i in range(50):
    second.record("source", UNKNOWN_PEER, **call)
    first.record("source", UNKNOWN_PEER, **call)
    ops[i % 2].upstream_overflow("outbound|9080||reviews.default.svc.cluster.local")
"""


def test_two_meshes_in_one_worker_add_up(tmp_path: Path) -> None:
    """Multiprocess mode: two Meshes in one worker (the default one and an explicit one) that
    count the same series add up, instead of each writing its own running total over the
    other's in the process's file."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", TWO_MESHES], env=env, cwd=ROOT, check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessMetrics(str(tmp_path), registry)
    merged = families(render(registry))
    assert [s.value for s in merged["istio_requests"].samples] == [200.0]
    assert [s.value for s in merged["meshlib_upstream_overflow"].samples] == [50.0]


def _normalized(text: bytes) -> dict[str, Any]:
    """Families by name; `le` compared as a number (meshlib writes Envoy's "1", prometheus-client
    "1.0")."""
    return {
        f.name: (f.type, sorted((s.name, _le_as_number(s.labels), s.value) for s in f.samples))
        for f in text_string_to_metric_families(text.decode())
    }


def _le_as_number(labels: dict[str, str]) -> list[tuple[str, str]]:
    return sorted((k, repr(float(v)) if k == "le" else v) for k, v in labels.items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


APP = """
import importlib.machinery
import os

from meshlib.config import MeshConfig
from meshlib.telemetry import metrics
from meshlib.telemetry.metrics import IstioMetrics, metrics_asgi_app, metrics_wsgi_app
from meshlib.telemetry.peer import UNKNOWN_PEER

if os.environ.get("MESHLIB_COMPILED") == "1":  # make unit-compiled: the workers run it too
    assert metrics.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), metrics.__file__

istio = IstioMetrics(config=MeshConfig(service="reviews"))
wsgi_metrics = metrics_wsgi_app()
asgi_metrics = metrics_asgi_app()
CALL = dict(destination_service="reviews.default.svc.cluster.local", destination_service_name="reviews",
            destination_service_namespace="default", response_code=200, duration_ms=1.0,
            request_bytes=10, response_bytes=20)


def wsgi(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        return wsgi_metrics(environ, start_response)
    istio.record("destination", UNKNOWN_PEER, **CALL)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(__import__("os").getpid()).encode()]


async def asgi(scope, receive, send):
    if scope["type"] != "http" or scope["path"] == "/metrics":
        return await asgi_metrics(scope, receive, send)
    istio.record("destination", UNKNOWN_PEER, **CALL)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(__import__("os").getpid()).encode()})
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding the test app module and a multiprocess directory."""
    (tmp_path / "metrics_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "prom").mkdir()
    yield tmp_path


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            ["gunicorn", "--workers", "3", "--bind", "127.0.0.1:{port}", "metrics_app:wsgi"],
            id="gunicorn",
        ),
        pytest.param(
            [
                "uvicorn",
                "--workers",
                "3",
                "--port",
                "{port}",
                "--log-level",
                "warning",
                "metrics_app:asgi",
            ],
            id="uvicorn",
        ),
    ],
)
def test_multi_worker_servers(app_dir: Path, command: list[str]) -> None:
    """Under gunicorn and uvicorn with 3 workers, any worker's /metrics counts every request."""
    port = _free_port()
    # The workers import the meshlib under test (the compiled copy under `make unit-compiled`).
    tested = str(Path(metrics.__file__).parent.parent.parent)
    path = os.pathsep.join(filter(None, (tested, os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(app_dir / "prom"), "PYTHONPATH": path}
    binary = str(Path(sys.executable).parent / command[0])
    argv = [binary, *(part.format(port=port) for part in command[1:])]
    server = subprocess.Popen(argv, cwd=app_dir, env=env, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/metrics", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, "server exited"
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        pids: set[str] = set()

        def hit(count: int) -> None:
            for _ in range(count):
                with urllib.request.urlopen(url + "/work", timeout=5) as response:
                    pids.add(response.read().decode())

        sent = 0
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:  # until several workers served
            clients = [threading.Thread(target=hit, args=(25,)) for _ in range(6)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            sent += 150
        assert len(pids) >= 2, pids
        for _ in range(3):  # whichever worker answers, the total is the same
            with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
                text = response.read()
            (sample,) = families(text)["istio_requests"].samples
            assert sample.value == sent
    finally:
        server.terminate()
        server.wait(timeout=20)


PRELOADED_CONF = """
import os

from prometheus_client import multiprocess

os.environ["MESHLIB_METRICS_PORT"] = "off"  # the master serves the merged view
workers = 2
max_requests = 8  # workers are replaced while the test runs, forked from the master again


def when_ready(server):
    from meshlib.telemetry.metrics import serve_metrics

    port = serve_metrics(0, host="127.0.0.1").port
    with open("metrics_port.tmp", "w") as f:
        f.write(str(port))
    os.rename("metrics_port.tmp", "metrics_port")


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""

PRELOADED_APP = """
import os

import meshlib

meshlib.configure(service="reviews")  # in the master: gunicorn --preload


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


app = meshlib.MeshWSGIMiddleware(hello)
"""


def test_gunicorn_preload_workers_keep_the_policy_gauges(tmp_path: Path) -> None:
    """gunicorn --preload builds the Mesh in the master and forks the workers from it. A
    forked worker's first metric write makes prometheus-client start files of its own pid,
    with every gauge it knows at 0: `meshlib_policy_last_reload_successful` (livemin) read 0,
    a rejected policy, while every process served the loaded one. Counts stay exact across
    worker restarts (max_requests) and the dead workers' gauges leave the view."""
    (tmp_path / "gunicorn_conf.py").write_text(PRELOADED_CONF)
    (tmp_path / "preloaded_app.py").write_text(PRELOADED_APP)
    (tmp_path / "prom").mkdir()  # empty: the start command's job under --preload
    port = _free_port()
    tested = str(Path(metrics.__file__).parent.parent.parent)
    path = os.pathsep.join(filter(None, (tested, os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "PYTHONPATH": path}
    env.pop("MESHLIB_POLICY", None)
    argv = [
        str(Path(sys.executable).parent / "gunicorn"),
        "--preload",
        "-c",
        "gunicorn_conf.py",
        "--bind",
        f"127.0.0.1:{port}",
        "preloaded_app:app",
    ]
    server = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/hello"
        deadline = time.monotonic() + 30
        while not (tmp_path / "metrics_port").exists():
            assert server.poll() is None, "gunicorn exited"
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.05)
        metrics_url = f"http://127.0.0.1:{(tmp_path / 'metrics_port').read_text()}/metrics"
        pids: set[str] = set()
        sent = 0
        while sent < 40:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    pids.add(response.read().decode())
            except OSError:  # not listening yet, or a worker being replaced
                assert server.poll() is None, "gunicorn exited"
                assert time.monotonic() < deadline, "gunicorn did not answer"
                time.sleep(0.05)
                continue
            sent += 1
        assert len(pids) > 2, pids  # workers were replaced
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            merged = families(response.read())
        (requests,) = merged["istio_requests"].samples
        assert requests.value == sent
        assert [s.value for s in merged["meshlib_policy_last_reload_successful"].samples] == [1.0]
        assert [s.value for s in merged["meshlib_policy_generation"].samples] == [1.0]
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_docstring_examples() -> None:
    """The module's docstring examples run as written."""
    assert doctest.testmod(metrics).failed == 0


def test_a_long_principal_is_kept_whole_or_not_at_all(registry: CollectorRegistry) -> None:
    """The metadata exchange accepts SPIFFE principals up to 512 characters; a label never
    shows a cut one (a wrong identity), only the whole value or `unknown`."""
    istio = IstioMetrics(registry, REVIEWS, multiprocess=False)
    principal = "spiffe://cluster.local/ns/bookinfo/sa/" + "a" * 230  # 268 characters
    claimed = peer_decode(f"w=productpage;n=bookinfo;p={principal}")
    assert claimed.principal == principal
    istio.record("destination", claimed, response_code=200, **REVIEWS_CALL, **SIZES)
    (sample,) = [
        s for s in families(render(registry))["istio_requests"].samples if s.name.endswith("_total")
    ]
    assert sample.labels["source_principal"] == principal


def test_a_live_gauge_file_made_again_is_read_anew(tmp_path: Path) -> None:
    """A live gauge's file is removed when its process dies (`mark_process_dead`); a new
    process with the same pid makes it again, maybe on the same inode, with its series in
    another order: the scrape reads the new file's own keys, as prometheus-client's does."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    path = tmp_path / "gauge_livesum_4242.db"

    def worker(entries: list[tuple[str, float]]) -> None:
        written = MmapedDict(str(path))  # type: ignore[no-untyped-call]
        for cluster, value in entries:
            key = mmap_key(  # type: ignore[no-untyped-call]
                "meshlib_endpoints_ejected",
                "meshlib_endpoints_ejected",
                ["cluster"],
                [cluster],
                "h",
            )
            written.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
        written.close()  # type: ignore[no-untyped-call]

    def ejected(text: bytes) -> list[tuple[str, float]]:
        return sorted(
            (s.labels["cluster"], s.value)
            for s in families(text)["meshlib_endpoints_ejected"].samples
        )

    worker([("a", 1.0), ("b", 2.0)])
    registry = CollectorRegistry()
    MultiProcessMetrics(str(tmp_path), registry)
    assert ejected(render(registry)) == [("a", 1.0), ("b", 2.0)]
    path.unlink()  # the process died
    worker([("b", 7.0), ("a", 0.0), ("c", 3.0)])  # a new one, with the same pid
    assert ejected(render(registry)) == [("a", 0.0), ("b", 7.0), ("c", 3.0)]
    reference = CollectorRegistry()
    MultiProcessCollector(reference, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert ejected(generate_latest(reference)) == ejected(render(registry))
