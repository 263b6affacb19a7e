"""The values of one Istio label set: what `IstioMetrics` puts each request into.

`_Series` keeps a label set's request count and its three histograms in meshlib's own storage
(single-process mode), under a lock of its own, its label text worked out once so that a
scrape only copies it; `_MultiProcessSeries` keeps the same as prometheus-client children,
whose values live in the multiprocess files. `_observe` puts one request into either, and
`_series_key` is what tells series apart in the caches before any label value is worked out.
These run on the per-request path: `IstioMetrics.record` and `DestinationRecorder.record`
(`meshlib.telemetry.metrics`) call them by plain name. Which label sets exist, and their
label values, is IstioMetrics' business, not this module's.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Histogram

from meshlib.telemetry._metrics_exposition import (
    _BUCKET_COUNT,
    DURATION_BUCKETS,
    REQUEST_LABELS,
    _label_text,
    _Row,
)
from meshlib.telemetry.peer import PeerIdentity

_PrometheusMetrics = tuple[Counter, Histogram, Histogram, Histogram]


def _series_key(
    reporter: str,
    peer: PeerIdentity,
    service: str,
    service_name: str,
    service_namespace: str,
    protocol: str,
    code: int,
    grpc_status: str,
    flags: str,
    security_policy: str,
) -> tuple[Any, ...]:
    """What tells one series from another in the cache, before labels are built."""
    return (
        reporter,
        peer.workload,
        peer.namespace,
        peer.app,
        peer.version,
        peer.canonical_service,
        peer.canonical_revision,
        peer.principal,
        peer.cluster,
        service,
        service_name,
        service_namespace,
        protocol,
        code,
        grpc_status,
        flags,
        security_policy,
    )


class _Series:
    """The values of one label set, in meshlib's storage (single-process mode)."""

    __slots__ = (
        "duration",
        "duration_sum",
        "lock",
        "request_bytes",
        "request_bytes_sum",
        "requests",
        "response_bytes",
        "response_bytes_sum",
        "text",
        "values",
    )

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.text = _label_text(REQUEST_LABELS, values)
        self.lock = threading.Lock()
        self.requests = 0
        self.duration = [0] * _BUCKET_COUNT
        self.duration_sum = 0.0
        self.request_bytes = [0] * _BUCKET_COUNT
        self.request_bytes_sum = 0.0
        self.response_bytes = [0] * _BUCKET_COUNT
        self.response_bytes_sum = 0.0

    def observe(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        i = bisect_left(DURATION_BUCKETS, duration_ms)
        j = bisect_left(DURATION_BUCKETS, request_bytes)
        k = bisect_left(DURATION_BUCKETS, response_bytes)
        with self.lock:
            self.requests += 1
            self.duration[i] += 1
            self.duration_sum += duration_ms
            self.request_bytes[j] += 1
            self.request_bytes_sum += request_bytes
            self.response_bytes[k] += 1
            self.response_bytes_sum += response_bytes

    def row(self) -> _Row:
        with self.lock:
            return (
                self.text,
                REQUEST_LABELS,
                self.values,
                self.requests,
                (
                    (self.duration[:], self.duration_sum),
                    (self.request_bytes[:], self.request_bytes_sum),
                    (self.response_bytes[:], self.response_bytes_sum),
                ),
            )


class _MultiProcessSeries:
    """One label set as prometheus-client children, whose values live in the mmap files."""

    __slots__ = ("counter", "duration", "request_bytes", "response_bytes")

    def __init__(self, values: tuple[str, ...], metrics: _PrometheusMetrics) -> None:
        counter, duration, request_bytes, response_bytes = metrics
        self.counter = counter.labels(*values)
        self.duration = duration.labels(*values)
        self.request_bytes = request_bytes.labels(*values)
        self.response_bytes = response_bytes.labels(*values)

    def observe(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        self.counter.inc()
        self.duration.observe(duration_ms)
        self.request_bytes.observe(request_bytes)
        self.response_bytes.observe(response_bytes)


def _observe(
    series: _Series | _MultiProcessSeries,
    duration_ms: float,
    request_bytes: int,
    response_bytes: int,
) -> None:
    """One request into `series`; values out of range (negative sizes, NaN) count as 0."""
    if not duration_ms >= 0.0:
        duration_ms = 0.0
    series.observe(duration_ms, max(request_bytes, 0), max(response_bytes, 0))
