"""Istio's standard request metrics and meshlib's own, cheap to record and cheap to scrape.

`IstioMetrics` keeps the four series families a sidecar exports (ISTIO.md §7):
`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes` and
`istio_response_bytes`, with Istio's 25 labels in Istio's order and Envoy's default buckets,
so Kiali, the Istio dashboards and the queries users already have work unchanged. The
middleware records `reporter="destination"`, meshed clients `reporter="source"` (answers
meshlib synthesized included, with their response flags); the peer's labels come from
metadata exchange (`meshlib.telemetry.peer`), else Istio's "unknown".

Recording is a dict lookup and four observations under one small lock: the labelled series is
cached per tuple of raw arguments, and label values are worked out (and bounded) only on the
first record of a tuple. The caches are bounded, in two generations (`meshlib._memo`), so that
a caller sending a new made-up peer on every request cannot push the real callers' entries
out of them. The values live in meshlib's own storage, which `render()` turns into
Prometheus text directly — prometheus-client's `generate_latest` formats every sample through
generic code and takes 0.7-1.1 s for 2,000 series of this shape; `render` about 30 ms
(`python -m bench metrics`). The series are still a prometheus-client collector
in a `CollectorRegistry`, so `generate_latest`, `registry.get_sample_value()` and any other
prometheus-client consumer see them.

Multiprocess servers (gunicorn, uvicorn with --workers): when prometheus-client runs in
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set before it is imported), the series are
prometheus-client `Counter`/`Histogram` objects, whose values live in the per-process mmap
files of that directory, and every exposition helper here (`serve_metrics`,
`metrics_wsgi_app`, `metrics_asgi_app`, `exposed_registry`) shows the merged view of all
workers through `MultiProcessMetrics`. That collector indexes each file once and afterwards
only re-reads values at known offsets, instead of decoding every key on every scrape as
prometheus-client's `MultiProcessCollector` does (about 1.2 s per worker for 2,000 series);
metrics other than Istio's still go through prometheus-client's own merge, so gauge modes and
user metrics behave exactly as documented there. As with any prometheus-client multiprocess
setup, empty the directory when the server starts and call
`prometheus_client.multiprocess.mark_process_dead(pid)` from gunicorn's `child_exit` hook.

Cardinality: every label value is checked and length-capped (no raw path, no header copied
verbatim), and `max_series` caps the label sets; past it, new peers are recorded as the unknown
peer. Peers' metadata headers are unauthenticated without mTLS, so a caller can fill the cap
with made-up peers: the unknown-peer series that requests then fold into may still be created
past the cap, up to twice it (their other labels come from this workload's own services,
routes and status codes, not from what peers claim). What still does not fit is counted in
`meshlib_metric_series_dropped_total`.

Principals: Istio fills `*_principal` from certificates only. meshlib also takes them from
MeshConfig (the local side) and from the peer's exchanged metadata when there is no mTLS;
`connection_security_policy="mutual_tls"` tells when the peer's identity was verified.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import gzip
import json
import logging
import mmap
import os
import re
import socket
import struct
import sys
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _prometheus_values
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _float_to_go_string

from meshlib._memo import Memo
from meshlib._text import ascii_int, host_port
from meshlib.config import DEFAULT_METRICS_PORT, MeshConfig
from meshlib.errors import ConfigError
from meshlib.telemetry.metric_overrides import MetricOverrides
from meshlib.telemetry.peer import UNKNOWN_PEER, PeerIdentity
from meshlib.telemetry.peer import decode as decode_peer

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from meshlib.policy.snapshot import Snapshot

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "REQUEST_LABELS",
    "IstioMetrics",
    "MetricsServer",
    "MultiProcessMetrics",
    "OperationalMetrics",
    "cluster_name",
    "exposed_registry",
    "metrics_asgi_app",
    "metrics_wsgi_app",
    "multiprocess_dir",
    "render",
    "serve_metrics",
]

_log = logging.getLogger("meshlib.telemetry")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATHS = ("/metrics", "/stats/prometheus")

# ISTIO.md §7.2, in the order Istio emits them.
REQUEST_LABELS: tuple[str, ...] = (
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
# Envoy's default histogram buckets (ISTIO.md §7.1), for all three histograms; +Inf follows.
DURATION_BUCKETS: tuple[float, ...] = (
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
)  # fmt: skip
# prometheus-client's number format (Go's): "+Inf", "1.8e+06"; typed for mypy.
_go_float = cast(Callable[[float], str], _float_to_go_string)
_BUCKET_COUNT = len(DURATION_BUCKETS) + 1
# `le` as Envoy writes it (`{:.32g}`: "0.5", "1", "100", "1800000", "+Inf"; pilot-agent passes
# Envoy's text through), so `le="100"` selects the same bucket of a sidecar's series and of
# meshlib's: Prometheus 2 stores the value as scraped, and "100.0" is another label value.
_LE = (*(format(b, ".32g") for b in DURATION_BUCKETS), "+Inf")
# Multiprocess files hold prometheus-client's `le` ("1.0", "1.8e+06"): the bucket each names.
_LE_INDEX = {le: i for i, le in enumerate((*(_go_float(b) for b in DURATION_BUCKETS), "+Inf"))}

_REQUESTS = "istio_requests"  # prometheus-client's family name; samples are `..._total`
_HISTOGRAMS = ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes")
_HELP = {
    _REQUESTS: "Requests, counted by the destination (reporter=destination) or the source.",
    _HISTOGRAMS[0]: "Request duration in milliseconds, request start to response complete.",
    _HISTOGRAMS[1]: "Request size in bytes.",
    _HISTOGRAMS[2]: "Response size in bytes.",
}
_ISTIO_FAMILIES = frozenset((_REQUESTS, *_HISTOGRAMS))

Reporter = Literal["source", "destination"]
_PrometheusMetrics = tuple[Counter, Histogram, Histogram, Histogram]
SecurityPolicy = Literal["unknown", "none", "mutual_tls"]

_REPORTERS = frozenset(("source", "destination"))
_SECURITY_POLICIES = frozenset(("unknown", "none", "mutual_tls"))
_FLAGS = re.compile(r"-|[A-Z]{1,8}(?:,[A-Z]{1,8}){0,15}")
_PROTOCOL = re.compile(r"[a-z0-9]{1,16}")
_GRPC_STATUS = re.compile(r"[0-9]{1,2}")
_MAX_VALUE = 253  # a DNS name's length: longer label values are cut
_MAX_PRINCIPAL = 512  # a SPIFFE URI: what the metadata exchange accepts (peer.decode)
_LIMITS = {"principal": _MAX_PRINCIPAL}  # label value lengths other than _MAX_VALUE
_PEER_FIELDS = tuple(PeerIdentity.__dataclass_fields__)
DEFAULT_MAX_SERIES = 2000  # label sets: 8,000 series, a scrape of ~120 MB
_FOLDED_CEILING = 2  # unknown-peer label sets may take the count up to this times max_series

# Set while `render` collects, so that collectors of meshlib hand over text, not samples.
_fast_render: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "meshlib_fast_render", default=False
)


def cluster_name(host: str, subset: str | None, port: int | None) -> str:
    """Envoy's name for an outbound cluster, the `cluster` label of meshlib's own metrics.

    >>> cluster_name("reviews.default.svc.cluster.local", "v1", 9080)
    'outbound|9080|v1|reviews.default.svc.cluster.local'
    """
    return f"outbound|{port or ''}|{subset or ''}|{host}"


_M = TypeVar("_M")
_PROCESS_METRICS: dict[str, Any] = {}
_per_process_lock = threading.Lock()


def _per_process(
    kind: Callable[..., _M],
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
    *,
    registry: CollectorRegistry,
    shared: bool,
    **options: Any,
) -> _M:
    """A prometheus-client metric in `registry`; but when `shared` (multiprocess mode) one
    object per metric name and process, registered nowhere (the files are what a scrape
    reads). Each prometheus-client value keeps its own running total and writes it to the
    process's file: two objects for one series (two Meshes in one worker) would overwrite
    each other's counts."""
    if not shared:
        return kind(name, documentation, labels, registry=registry, **options)
    with _per_process_lock:
        found = _PROCESS_METRICS.get(name)
        if found is None:
            found = _PROCESS_METRICS[name] = kind(
                name, documentation, labels, registry=None, **options
            )
        return cast(_M, found)


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, or None when it is off.

    prometheus-client decides once, when it is first imported; a `PROMETHEUS_MULTIPROC_DIR`
    set later has no effect, so the decision it made is what counts here. Its deprecated
    lowercase `prometheus_multiproc_dir` counts when the uppercase one is not set, as there.
    """
    if not getattr(_prometheus_values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(_multiprocess_variable())


def _multiprocess_variable() -> str:
    """The variable prometheus-client takes its directory from: the deprecated lowercase one
    only where the uppercase one is not set."""
    upper = "PROMETHEUS_MULTIPROC_DIR"
    lower = upper.lower()
    return lower if lower in os.environ and upper not in os.environ else upper


def _check_multiprocess_dir() -> None:
    """A ConfigError naming the variable when multiprocess mode has no directory to write to,
    which prometheus-client reports only as a FileNotFoundError from deep inside its first
    metric (and, set empty, would take as the working directory)."""
    path = multiprocess_dir()
    if path is not None and not os.path.isdir(path):
        variable = _multiprocess_variable()
        raise ConfigError(
            f"{variable}={path!r}: not a directory. prometheus-client's"
            " multiprocess mode writes each process's metrics there: create it, empty, before"
            " the server starts (docs/observability.md, section 4)"
        )


# -- label values ----------------------------------------------------------------------------


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join([f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)])


def _bounded(value: object, default: str, limit: int = _MAX_VALUE) -> str:
    if not isinstance(value, str) or not value:
        return default
    return value[:limit]


def _checked(value: object, pattern: re.Pattern[str], default: str) -> str:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    return default


# -- series ----------------------------------------------------------------------------------

# A snapshot of one label set: (label text, label names, label values, requests or None,
# then for each histogram (bucket counts, not cumulative, +Inf last; sum) or None). Counts are
# `int | float`, not `float`: compiled, an int stored where a float is declared becomes one,
# and renders as "1.0" where the pure build writes "1".
_Hist = tuple[Sequence[float], float]
_Row = tuple[str, Sequence[str], Sequence[str], int | float | None, tuple[_Hist | None, ...]]


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


class DestinationRecorder:
    """`IstioMetrics.record("destination", ...)` for the inbound middleware's hot path.

    Keyed by what varies per request — the caller's raw peer header, the status and the
    response flags — so a request costs one small dict lookup (instead of a 17-field key) and
    the observation. The series it remembers are the very ones `record` uses: they are never
    removed. Which keys it remembers is bounded as `peer.decode`'s cache is (`meshlib._memo`:
    two generations of `max_series` / 2 keys, so a flood of distinct headers cannot push out
    the real callers'), and a header that names no usable peer is not remembered at all.
    """

    __slots__ = ("_cache", "_memo", "_metrics", "_policy", "_service")

    def __init__(
        self, metrics: IstioMetrics, service: tuple[str, str, str, str], policy: SecurityPolicy
    ) -> None:
        self._metrics = metrics
        self._service = service
        self._policy = policy
        self._memo: Memo[tuple[str | None, int, str], _Series | _MultiProcessSeries]
        self._memo = Memo(metrics.max_series // 2)
        self._cache = self._memo.recent  # the hit: one lookup in it

    def record(
        self,
        claimed: str | None,
        status: int,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        flags: str = "-",
    ) -> None:
        """Count one request; `claimed` is the caller's peer metadata header, if any, and
        `flags` Envoy's response flags (DC for a request its caller abandoned)."""
        series = self._cache.get((claimed, status, flags))
        if series is None:
            series = self._find(claimed, status, flags)
            if series is None:
                return  # dropped (max_series reached): counted by IstioMetrics
        _observe(series, duration_ms, request_bytes, response_bytes)

    def _find(
        self, claimed: str | None, status: int, flags: str
    ) -> _Series | _MultiProcessSeries | None:
        raw = (claimed, status, flags)
        chars = len(claimed) if claimed else 0
        series = self._memo.recall(raw)
        if series is not None:
            self._memo.keep(raw, series, chars)
            return series
        peer = decode_peer(claimed)
        metrics = self._metrics
        service, name, namespace, protocol = self._service
        key = _series_key(
            "destination", peer, service, name, namespace, protocol, status, "", flags, self._policy
        )
        series = metrics._cache.get(key)
        if series is None:
            series = metrics._lookup(key, peer)
            if series is None:
                return None
        if peer is not UNKNOWN_PEER or not claimed:  # junk is not worth a place, as in peer
            self._memo.keep(raw, series, chars)
        return series


class IstioMetrics:
    """Istio's standard HTTP metrics for one workload.

    `config` is the local side of every report (default `MeshConfig()`); `registry` defaults
    to prometheus-client's REGISTRY. At most `max_series` label sets are kept (see the module
    docstring). `multiprocess` defaults to prometheus-client's own mode.

    >>> metrics = IstioMetrics(CollectorRegistry(), MeshConfig(service="reviews"))
    >>> metrics.record("destination", UNKNOWN_PEER, response_code=200, duration_ms=3.2,
    ...     destination_service="reviews.default.svc.cluster.local",
    ...     destination_service_name="reviews", destination_service_namespace="default",
    ...     request_bytes=120, response_bytes=2048)
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        config: MeshConfig | None = None,
        *,
        max_series: int = DEFAULT_MAX_SERIES,
        multiprocess: bool | None = None,
    ) -> None:
        self.config = config = config or MeshConfig()
        self.registry = registry = REGISTRY if registry is None else registry
        self.max_series = max_series
        self.multiprocess = multiprocess_dir() is not None if multiprocess is None else multiprocess
        if self.multiprocess:
            _check_multiprocess_dir()
        labels = config.labels
        # Local side: app/version are empty when the label is missing (ISTIO.md unclear pt. 7).
        self.local = PeerIdentity(
            workload=_bounded(config.workload, "unknown"),
            namespace=config.namespace,
            app=labels.get("app", "")[:_MAX_VALUE],
            version=labels.get("version", "")[:_MAX_VALUE],
            canonical_service=_bounded(config.canonical_service, "unknown"),
            canonical_revision=_bounded(config.canonical_revision, "latest"),
            principal=config.principal[:_MAX_PRINCIPAL],
            cluster=_bounded(config.cluster, "unknown"),
        )
        self.overrides = MetricOverrides()
        """The Telemetry's `metrics[].overrides`, applied when a scrape renders the series."""
        self._lock = threading.Lock()
        # Series by the raw arguments of `record`: two generations (meshlib._memo) of twice
        # max_series keys, so a flood of made-up peers cannot push out the real ones'.
        self._memo: Memo[tuple[Any, ...], _Series | _MultiProcessSeries] = Memo(2 * max_series)
        self._cache = self._memo.recent
        self._series: dict[tuple[str, ...], _Series | _MultiProcessSeries] = {}
        self._warned = False
        shared = self.multiprocess
        self._dropped = _per_process(
            Counter,
            "meshlib_metric_series_dropped",
            "Records not counted because Istio metrics reached max_series label sets.",
            registry=registry,
            shared=shared,
        )
        self._metrics: _PrometheusMetrics | None = None
        if self.multiprocess:
            duration, request_bytes, response_bytes = (
                _per_process(
                    Histogram,
                    name,
                    _HELP[name],
                    REQUEST_LABELS,
                    buckets=DURATION_BUCKETS,
                    registry=registry,
                    shared=shared,
                )
                for name in _HISTOGRAMS
            )
            requests = _per_process(
                Counter,
                _REQUESTS,
                _HELP[_REQUESTS],
                REQUEST_LABELS,
                registry=registry,
                shared=shared,
            )
            self._metrics = (requests, duration, request_bytes, response_bytes)
        else:
            self.registry.register(self)

    # -- the hot path ---------------------------------------------------------------------------

    def record(
        self,
        reporter: Reporter,
        peer: PeerIdentity,
        *,
        destination_service: str,
        destination_service_name: str,
        destination_service_namespace: str,
        request_protocol: str = "http",
        response_code: int,
        response_flags: str = "-",
        grpc_response_status: str = "",
        connection_security_policy: SecurityPolicy = "unknown",
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """Count one request, from this workload's side (`reporter`), `peer` being the other.

        For `reporter="source"` this workload is the source and `peer` the destination; for
        `"destination"` the reverse. An answer meshlib synthesized (503 UO, 504 UT, a fault's
        abort...) is recorded like any other, with its `response_flags` and, when no upstream
        answered, `UNKNOWN_PEER`. Values out of range (negative sizes, NaN durations) are
        recorded as 0.
        """
        key = _series_key(
            reporter,
            peer,
            destination_service,
            destination_service_name,
            destination_service_namespace,
            request_protocol,
            response_code,
            grpc_response_status,
            response_flags,
            connection_security_policy,
        )
        series = self._cache.get(key)
        if series is None:
            series = self._lookup(key, peer)
            if series is None:
                return
        _observe(series, duration_ms, request_bytes, response_bytes)

    def destination(
        self,
        *,
        destination_service: str,
        destination_service_name: str,
        destination_service_namespace: str,
        connection_security_policy: SecurityPolicy,
    ) -> DestinationRecorder:
        """A `record` for the requests this workload serves (reporter="destination", HTTP,
        no response flags) that looks each (caller's peer header, status) up only once."""
        return DestinationRecorder(
            self,
            (
                destination_service,
                destination_service_name,
                destination_service_namespace,
                "http",
            ),
            connection_security_policy,
        )

    def _lookup(
        self, key: tuple[Any, ...], peer: PeerIdentity
    ) -> _Series | _MultiProcessSeries | None:
        with self._lock:
            series = self._cache.get(key)
            if series is not None:
                return series
            series = self._memo.recall(key)
            if series is not None:
                self._memo.keep(key, series)
                return series
            values = self._label_values(key, peer)
            series = self._series.get(values)
            if series is None and len(self._series) >= self.max_series:
                # Full: fold a new peer into the unknown one rather than lose the request;
                # that series may be new, within a hard ceiling (see the module docstring).
                values = self._label_values(key, UNKNOWN_PEER)
                series = self._series.get(values)
                if series is None and len(self._series) >= _FOLDED_CEILING * self.max_series:
                    self._dropped.inc()
                    if not self._warned:
                        self._warned = True
                        _log.warning(
                            "Istio metrics reached %d label sets (max_series %d, and as many"
                            " again for the unknown peer); further ones are dropped",
                            len(self._series),
                            self.max_series,
                        )
                    return None
            if series is None:
                if self._metrics is not None:
                    series = _MultiProcessSeries(values, self._metrics)
                else:
                    series = _Series(values)
                self._series[values] = series
            self._memo.keep(key, series)
            return series

    def _label_values(self, key: tuple[Any, ...], peer: PeerIdentity) -> tuple[str, ...]:
        reporter = key[0]
        if reporter not in _REPORTERS:
            raise ValueError(f"reporter must be 'source' or 'destination', not {reporter!r}")
        (service, service_name, service_namespace, protocol, code, grpc, flags, policy) = key[9:]
        remote = PeerIdentity(
            *(
                _bounded(getattr(peer, f), getattr(UNKNOWN_PEER, f), _LIMITS.get(f, _MAX_VALUE))
                for f in _PEER_FIELDS
            )
        )
        src, dst = (self.local, remote) if reporter == "source" else (remote, self.local)
        if not isinstance(service_namespace, str) or service_namespace in ("", "unknown"):
            service_namespace = dst.namespace  # Istio's fallback: the destination's namespace
        code_text = str(code) if isinstance(code, int) and 0 <= code <= 999 else "0"
        return (
            reporter,
            src.workload,
            src.canonical_service,
            src.canonical_revision,
            src.namespace,
            src.principal,
            src.app,
            src.version,
            src.cluster,
            dst.workload,
            dst.namespace,
            dst.principal,
            dst.app,
            dst.version,
            _bounded(service, "unknown"),
            dst.canonical_service,
            dst.canonical_revision,
            _bounded(service_name, "unknown"),
            _bounded(service_namespace, "unknown"),
            dst.cluster,
            _checked(protocol, _PROTOCOL, "unknown"),
            code_text,
            _checked(grpc, _GRPC_STATUS, ""),
            _checked(flags, _FLAGS, "-"),
            policy if policy in _SECURITY_POLICIES else "unknown",
        )

    def apply(self, snapshot: Snapshot) -> None:
        """Take the metric overrides a new Snapshot's Telemetry gives this workload."""
        self.overrides = MetricOverrides.of(snapshot, self.config)

    def stop_rendering_multiprocess(self) -> None:
        """Undo `render_multiprocess_with_these` (its Mesh is closing)."""
        global _multiprocess_overrides
        if _multiprocess_overrides is self:
            _multiprocess_overrides = None

    def render_multiprocess_with_these(self) -> None:
        """Make this workload's overrides the ones the multiprocess view renders with (the
        view shows every worker's series; the workers share the policy). The Mesh that serves
        the metrics port calls this."""
        global _multiprocess_overrides
        _multiprocess_overrides = self

    # -- prometheus-client collector ------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports, so the registry can refuse duplicates."""
        yield Metric(_REQUESTS, _HELP[_REQUESTS], "counter")
        for name in _HISTOGRAMS:
            yield Metric(name, _HELP[name], "histogram")

    def collect(self) -> Iterator[Metric]:
        """The four families: as text when `render` asks, else as prometheus-client samples."""
        with self._lock:
            series = list(self._series.values())
        rows = _overridden([s.row() for s in series if isinstance(s, _Series)], self.overrides)
        if _fast_render.get():
            yield _Rendered(_render_rows(rows))
        else:
            yield from _families(rows)

    def unregister(self) -> None:
        """Take these metrics out of their registry (their values are kept). In multiprocess
        mode they are in none: the files are what a scrape reads."""
        for collector in self._registered():
            self.registry.unregister(collector)

    def register(self) -> None:
        """Put them back in their registry after `unregister()`."""
        for collector in self._registered():
            self.registry.register(collector)

    def _registered(self) -> list[Any]:
        if self.multiprocess:
            return []
        collectors: list[Any] = [self] if self._metrics is None else list(self._metrics)
        return [*collectors, self._dropped]


# -- Telemetry overrides ---------------------------------------------------------------------

# Whose overrides the multiprocess view (one per process) renders every worker's series with.
_multiprocess_overrides: IstioMetrics | None = None


def _overridden(rows: list[_Row], overrides: MetricOverrides) -> list[_Row]:
    """`rows` with the Telemetry overrides applied: a family switched off for a reporter has
    no series, relabelled series that now share their labels are merged (counts and buckets
    summed). Each family then gets rows of its own (the renderers skip the `None` parts)."""
    if overrides.empty:
        return rows
    out: list[_Row] = []
    for family in range(1 + len(_HISTOGRAMS)):
        merged: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        for _, names, values, count, hists in rows:
            part: Any = count if family == 0 else hists[family - 1]
            if part is None:
                continue
            rule = overrides.rule(family, values[0] if names[:1] == ("reporter",) else "")
            if rule.disabled:
                continue
            key = rule.relabel(names, values) if rule.relabels else (tuple(names), tuple(values))
            seen = merged.get(key)
            if seen is None:
                merged[key] = part if family == 0 else (list(part[0]), part[1])
            elif family == 0:
                merged[key] = seen + part
            else:
                buckets = seen[0]
                for i, n in enumerate(part[0]):
                    buckets[i] += n
                merged[key] = (buckets, seen[1] + part[1])
        for (names, values), part in merged.items():
            text = _label_text(names, values)
            if family == 0:
                out.append((text, names, values, part, (None,) * len(_HISTOGRAMS)))
            else:
                hists = tuple(part if i == family - 1 else None for i in range(len(_HISTOGRAMS)))
                out.append((text, names, values, None, hists))
    return out


# -- exposition ------------------------------------------------------------------------------


class _Rendered(Metric):
    """Families already turned into exposition text; what meshlib's collectors give `render`."""

    def __init__(self, chunks: list[str]) -> None:
        super().__init__("meshlib_rendered", "", "untyped")
        self.chunks = chunks


def _render_rows(rows: Sequence[_Row]) -> list[str]:
    out = [f"# HELP {_REQUESTS}_total {_HELP[_REQUESTS]}\n# TYPE {_REQUESTS}_total counter\n"]
    head = f"{_REQUESTS}_total{{"
    out += [f"{head}{row[0]}}} {_number(row[3])}\n" for row in rows if row[3] is not None]
    for index, name in enumerate(_HISTOGRAMS):
        out.append(f"# HELP {name} {_HELP[name]}\n# TYPE {name} histogram\n")
        bucket, count, total = f"{name}_bucket{{", f"{name}_count{{", f"{name}_sum{{"
        les = [f',le="{le}"}} ' for le in _LE]
        for text, _, _, _, hists in rows:
            hist = hists[index]
            if hist is None:
                continue
            cumulative = list(accumulate(hist[0]))
            # No comma before `le` when overrides removed every label.
            bounds = les if text else [le[1:] for le in les]
            out += [
                f"{bucket}{text}{le}{_number(n)}\n"
                for le, n in zip(bounds, cumulative, strict=True)
            ]
            out.append(
                f"{count}{text}}} {_number(cumulative[-1])}\n{total}{text}}} {_go_float(hist[1])}\n"
            )
    return out


def _number(value: int | float) -> str:
    if type(value) is int:
        return str(value)
    return _go_float(value)


def _families(rows: Sequence[_Row]) -> Iterator[Metric]:
    requests = Metric(_REQUESTS, _HELP[_REQUESTS], "counter")
    for _, names, values, count, _ in rows:
        if count is not None:
            labels = dict(zip(names, values, strict=True))
            requests.samples.append(Sample(f"{_REQUESTS}_total", labels, float(count)))
    yield requests
    for index, name in enumerate(_HISTOGRAMS):
        family = Metric(name, _HELP[name], "histogram")
        samples = family.samples
        for _, names, values, _, hists in rows:
            hist = hists[index]
            if hist is None:
                continue
            labels = dict(zip(names, values, strict=True))
            cumulative = list(accumulate(hist[0]))
            for le, n in zip(_LE, cumulative, strict=True):
                samples.append(Sample(f"{name}_bucket", {**labels, "le": le}, float(n)))
            samples.append(Sample(f"{name}_count", labels, float(cumulative[-1])))
            samples.append(Sample(f"{name}_sum", labels, float(hist[1])))
        yield family


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(registry: Collector | None = None) -> bytes:
    """The Prometheus text format (0.0.4) of everything in `registry` (default: REGISTRY).

    meshlib's collectors hand over ready text; other families go through prometheus-client's
    `generate_latest`, so the output is what it would print, only faster.
    """
    source = REGISTRY if registry is None else registry
    out: list[str] = []
    others: list[Metric] = []
    token = _fast_render.set(True)
    try:
        for family in source.collect():
            if isinstance(family, _Rendered):
                if others:
                    out.append(generate_latest(_Families(others)).decode())
                    others = []
                out += family.chunks
            else:
                others.append(family)
    finally:
        _fast_render.reset(token)
    if others:
        out.append(generate_latest(_Families(others)).decode())
    return "".join(out).encode()


# -- multiprocess ----------------------------------------------------------------------------

_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_TWO_DOUBLES = struct.Struct("dd")
# sample name -> (histogram index, or -1 for the requests counter; slot in its values)
_ISTIO_SLOT_OF = {f"{_REQUESTS}_total": (-1, 0)}
for _index, _name in enumerate(_HISTOGRAMS):
    _ISTIO_SLOT_OF[f"{_name}_sum"] = (_index, _BUCKET_COUNT)
    _ISTIO_SLOT_OF[f"{_name}_bucket"] = (_index, 0)  # bucket index from `le`


_LabelSet = tuple[tuple[str, str], ...]


class _FileIndex:
    """What one mmap file holds, parsed once: entries are only ever appended to these files."""

    __slots__ = ("identity", "istio", "others", "parsed")

    def __init__(self, identity: tuple[int, int]) -> None:
        self.identity = identity
        self.parsed = 8  # offset of the first entry
        # (offset of the value, label set id, histogram index or -1 for requests, bucket slot)
        self.istio: list[tuple[int, int, int, int]] = []
        # (offset of the value, family name, sample name, labels, help)
        self.others: list[tuple[int, str, str, _LabelSet, str]] = []


class MultiProcessMetrics:
    """The merged metrics of every process writing to a multiprocess directory.

    In place of prometheus-client's `MultiProcessCollector` (the same families and values, but
    the Istio histograms' `le` as Envoy writes it, "1" where that one writes "1.0"), it parses
    each file's keys once and later only reads the values at their known offsets. Use through
    `exposed_registry()`, or register it in a registry of its own.
    """

    def __init__(self, path: str | None = None, registry: CollectorRegistry | None = None) -> None:
        path = path or multiprocess_dir() or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path or not os.path.isdir(path):
            raise ValueError("PROMETHEUS_MULTIPROC_DIR is not set or not a directory")
        self.path = path
        self._files: dict[str, _FileIndex] = {}
        # Istio label sets, numbered: the files of all workers share them.
        self._ids: dict[_LabelSet, int] = {}
        self._labels: list[tuple[str, Sequence[str], Sequence[str]]] = []
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Istio's families (as text when `render` asks), then every other merged family."""
        rows, others = self._read()
        owner = _multiprocess_overrides
        if owner is not None:
            rows = _overridden(rows, owner.overrides)
        if not rows:
            pass  # like MultiProcessCollector: no family without samples
        elif _fast_render.get():
            yield _Rendered(_render_rows(rows))
        else:
            yield from _families(rows)
        yield from _merge(others, self.path)

    def _read(self) -> tuple[list[_Row], dict[str, Metric]]:
        acc: dict[int, list[Any]] = {}
        others: dict[str, Metric] = {}
        with self._lock:
            seen = set()
            for path in sorted(glob.glob(os.path.join(self.path, "*.db"))):
                seen.add(path)
                try:
                    self._read_file(path, acc, others)
                except (OSError, ValueError):
                    continue  # removed meanwhile (live gauges of a dead process), or empty
            for gone in set(self._files) - seen:
                del self._files[gone]
            rows = [self._row(key, values) for key, values in acc.items()]
        return rows, others

    def _read_file(self, path: str, acc: dict[int, list[Any]], others: dict[str, Metric]) -> None:
        parts = os.path.basename(path)[:-3].split("_")
        typ = parts[0]
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                index = self._files.get(path)
                identity = (stat.st_dev, stat.st_ino)
                used = min(_INT.unpack_from(data, 0)[0], len(data))
                if (
                    index is None
                    or index.identity != identity
                    or used < index.parsed
                    # A live gauge's file is removed when its process dies, and one of the same
                    # name (the pid reused) may get the same inode: always read anew (small).
                    or parts[1].startswith("live")
                ):
                    index = self._files[path] = _FileIndex(identity)
                self._index(index, data, used, typ)
                unpack = _DOUBLE.unpack_from
                for offset, key, hist, slot in index.istio:
                    values = acc.get(key)
                    if values is None:
                        values = acc[key] = [None, None, None, None]
                    if hist < 0:
                        values[0] = (values[0] or 0.0) + unpack(data, offset)[0]
                    else:
                        buckets = values[hist + 1]
                        if buckets is None:
                            buckets = values[hist + 1] = [0.0] * (_BUCKET_COUNT + 1)
                        buckets[slot] += unpack(data, offset)[0]
                for offset, family, name, labels, help_text in index.others:
                    value, timestamp = _TWO_DOUBLES.unpack_from(data, offset)
                    metric = others.get(family)
                    if metric is None:
                        metric = others[family] = Metric(family, help_text, typ)
                    # The shapes prometheus-client's MultiProcessCollector merges.
                    if typ == "gauge":
                        metric._multiprocess_mode = parts[1]  # type: ignore[attr-defined]
                        labels = (*labels, ("pid", parts[2]))
                        metric.samples.append(Sample(name, labels, value, timestamp))  # type: ignore[arg-type]
                    else:
                        metric.samples.append(Sample(name, labels, value))  # type: ignore[arg-type]

    def _index(self, index: _FileIndex, data: mmap.mmap, used: int, typ: str) -> None:
        pos = index.parsed
        while pos + 4 <= used:
            length = _INT.unpack_from(data, pos)[0]
            value_at = pos + 4 + length + (8 - (length + 4) % 8)
            if length <= 0 or value_at + 16 > used:
                break  # an entry still being appended
            family, name, labels, help_text = json.loads(data[pos + 4 : pos + 4 + length])
            pos = value_at + 16
            slot = _ISTIO_SLOT_OF.get(name) if family in _ISTIO_FAMILIES else None
            if slot is not None and typ in ("counter", "histogram"):
                hist, where = slot
                if hist >= 0 and where == 0:  # a bucket: the slot is its `le`
                    where = _LE_INDEX.get(labels.pop("le", None), -1)
                if where >= 0:
                    index.istio.append((value_at, self._id(labels), hist, where))
                    continue
            index.others.append((value_at, family, name, tuple(sorted(labels.items())), help_text))
        index.parsed = pos

    def _id(self, labels: dict[str, str]) -> int:
        key = tuple(sorted(labels.items()))
        found = self._ids.get(key)
        if found is None:
            names = REQUEST_LABELS if set(labels) == set(REQUEST_LABELS) else tuple(labels)
            values = tuple(labels[n] for n in names)
            found = self._ids[key] = len(self._labels)
            self._labels.append((_label_text(names, values), names, values))
        return found

    def _row(self, key: int, values: list[Any]) -> _Row:
        hists: list[_Hist | None] = []
        for buckets in values[1:]:
            hists.append(None if buckets is None else (buckets[:_BUCKET_COUNT], buckets[-1]))
        return (*self._labels[key], values[0], tuple(hists))


def _merge(metrics: dict[str, Metric], path: str) -> Iterable[Metric]:
    """prometheus-client's own merge of the families meshlib does not read itself."""
    if not metrics:
        return []
    merge: Callable[[dict[str, Metric], bool], Iterable[Metric]] | None = getattr(
        MultiProcessCollector, "_accumulate_metrics", None
    )
    if merge is not None:
        return merge(metrics, True)
    # A prometheus-client without that helper: its public merge, minus Istio's families.
    collector: Any = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
    return [m for m in collector.collect() if m.name not in _ISTIO_FAMILIES]


_exposed: dict[str, CollectorRegistry] = {}
_exposed_lock = threading.Lock()


def exposed_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """What to scrape: `registry` (default REGISTRY), or in multiprocess mode every worker.

    In multiprocess mode the result is one registry per directory holding a
    `MultiProcessMetrics`: the values of all processes, the ones in `registry` included.
    """
    path = multiprocess_dir()
    if path is None:
        return REGISTRY if registry is None else registry
    with _exposed_lock:
        found = _exposed.get(path)
        if found is None:
            found = _exposed[path] = CollectorRegistry()
            MultiProcessMetrics(path, registry=found)
        return found


# -- serving ---------------------------------------------------------------------------------


def _gzip_accepted(accept_encoding: str | None) -> bool:
    """Whether the scraper takes gzip (Prometheus sends `Accept-Encoding: gzip`)."""
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            name, _, quality = params.partition("=")
            if name.strip().lower() != "q":
                return True
            try:
                return float(quality) > 0  # q=0: refused
            except ValueError:
                return False
    return False


def _scrape(
    source: CollectorRegistry, accept_encoding: str | None
) -> tuple[bytes, list[tuple[str, str]]]:
    """A scrape's body and headers (but Content-Length), gzipped when the scraper takes it:
    each line repeats 25 labels, so gzip's fastest level makes it some 60 times smaller, in
    less time than rendering takes."""
    payload = render(source)
    headers = [("Content-Type", CONTENT_TYPE)]
    if _gzip_accepted(accept_encoding):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
    return payload, headers


class _Handler(BaseHTTPRequestHandler):
    """Answers the metrics paths with what its server's `source` holds; 404 elsewhere."""

    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle kept-alive connection (and its thread) goes after this long
    server: _Server

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        self._skip_body()
        if urlsplit(self.path).path not in METRICS_PATHS:  # origin or absolute form
            status, payload = 404, b"not found\n"
            headers = [("Content-Type", "text/plain; charset=utf-8")]
        else:
            status = 200
            payload, headers = _scrape(self.server.source, self.headers.get("Accept-Encoding"))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _skip_body(self) -> None:
        """A scrape has no body; one sent anyway is read (a small one) or ends the connection,
        so it is not taken for the next request."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            return
        length = self.headers.get("Content-Length")
        if length is not None:
            size = ascii_int(length.strip(), 9)
            if size is None or size > _MAX_SCRAPE_BODY:
                self.close_connection = True
            elif size:
                self.rfile.read(size)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood stderr


_MAX_SCRAPE_BODY = 65_536


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], source: CollectorRegistry) -> None:
        self.source = source
        self._open: set[socket.socket] = set()  # connections being served (kept alive)
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a scraper gone, or a connection ended by close(): nothing to report
        super().handle_error(request, client_address)

    def end_connections(self) -> None:
        """End the connections still open: a closed server answers no more scrapes, on
        kept-alive connections either (they would read a Mesh that is gone)."""
        with self._open_lock:
            open_now = list(self._open)
        for request in open_now:
            with contextlib.suppress(OSError):  # already gone
                request.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A small threaded HTTP server answering `/metrics` and `/stats/prometheus`.

    Closing it (`close()`, calling it, or leaving its `with` block) stops the server.
    """

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._serving = thread
        self.host: str = server.server_address[0]  # type: ignore[assignment]
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{host_port(self.host, self.port)}"

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.end_connections()
        self._serving.join(timeout=5)

    def __call__(self) -> None:
        self.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_metrics(
    port: int = DEFAULT_METRICS_PORT,
    registry: CollectorRegistry | None = None,
    *,
    host: str = "0.0.0.0",
) -> MetricsServer:
    """Serve `exposed_registry(registry)` on `host:port` (0 picks a free port), like Istio's 15020.

    Under a multi-worker server only one process can hold the port: start it from the master
    (gunicorn's `when_ready` hook) in multiprocess mode, or mount `metrics_wsgi_app` /
    `metrics_asgi_app` in the app, which every worker answers with the merged view.
    """
    source = exposed_registry(registry)
    try:
        server = (_Server6 if ":" in host else _Server)((host, port), source)
    except OSError as exc:
        # The socket's own error names no address; this one often ends a process (a gunicorn
        # master's when_ready hook), so say which. OSError(errno, ...) keeps its subclass.
        raise OSError(
            exc.errno, f"meshlib: cannot serve metrics on {host_port(host, port)}: {exc.strerror}"
        ) from exc
    thread = threading.Thread(
        target=server.serve_forever, name="meshlib-metrics", kwargs={"poll_interval": 0.2}
    )
    thread.daemon = True
    thread.start()
    return MetricsServer(server, thread)


WSGIStartResponse = Callable[..., Any]
ASGIReceive = Callable[[], Any]
ASGISend = Callable[[dict[str, Any]], Any]


def metrics_wsgi_app(
    registry: CollectorRegistry | None = None,
) -> Callable[[dict[str, Any], WSGIStartResponse], list[bytes]]:
    """A WSGI app answering GET (any path: mount it where you like) with the metrics."""
    source = exposed_registry(registry)

    def app(environ: dict[str, Any], start_response: WSGIStartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        payload, headers = _scrape(source, environ.get("HTTP_ACCEPT_ENCODING"))
        start_response("200 OK", [*headers, ("Content-Length", str(len(payload)))])
        return [b"" if method == "HEAD" else payload]

    return app


def metrics_asgi_app(
    registry: CollectorRegistry | None = None,
) -> Callable[[dict[str, Any], ASGIReceive, ASGISend], Any]:
    """An ASGI app answering GET (any path: mount it where you like) with the metrics.

    Rendering runs on the event loop, as prometheus-client's own ASGI app does: a few
    milliseconds per scrape for a typical workload.
    """
    source = exposed_registry(registry)

    async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            status, payload = 405, b""
            headers = [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]
        else:
            accept = b",".join(v for k, v in scope.get("headers", ()) if k == b"accept-encoding")
            payload, found = _scrape(source, accept.decode("latin-1"))
            status = 200
            headers = [(name.lower().encode(), value.encode()) for name, value in found]
            headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})

    return app


# -- meshlib's own metrics -------------------------------------------------------------------

# The breaker states that keep an endpoint out of the pool. Outlier detection uses two of
# pybreaker's states, closed (in the pool) and open (ejected): as in Envoy, an ejected endpoint
# returns whole at an interval sweep, with no half-open trial.
_EJECTED_STATES = frozenset(("open",))
_MAX_CLUSTER = 512

# Multiprocess mode: the policy gauges' values in this process, set again in a forked child.
# prometheus-client starts a child's files (its own pid) at its first write, with every value
# it knows at 0: a gunicorn --preload worker, forked from the master that loaded the policy,
# would show `meshlib_policy_last_reload_successful` 0 (livemin: a rejected policy) for the
# policy it inherited and serves.
_inherited: dict[Gauge, float] = {}


def _publish_inherited() -> None:
    for gauge, value in list(_inherited.items()):
        gauge.set(value)


os.register_at_fork(after_in_child=_publish_inherited)


class OperationalMetrics:
    """meshlib's own health: policy reloads, ejections, overflows, retry budgets.

    The methods are hooks for the wiring, e.g.
    `source.subscribe(lambda s: ops.policy_loaded(s.generation))`,
    `source.on_error(ops.policy_rejected)` and
    `detector.listen(functools.partial(ops.ejection, cluster_name(host, subset, port)))`.
    `cluster` labels are Envoy cluster names (`cluster_name`), one per configured cluster.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self._shared = shared = multiprocess_dir() is not None  # see _per_process
        self._generation = _per_process(
            Gauge,
            "meshlib_policy_generation",
            "Generation of the policy Snapshot being served.",
            registry=registry,
            shared=shared,
            multiprocess_mode="livemax",
        )
        self._reload_errors = _per_process(
            Counter,
            "meshlib_policy_reload_errors",
            "New policy rejected; the last good Snapshot kept serving.",
            registry=registry,
            shared=shared,
        )
        self._reload_successful = _per_process(
            Gauge,
            "meshlib_policy_last_reload_successful",
            "1 when the last policy change was loaded, 0 while it is rejected (the last good "
            "Snapshot keeps serving until a change loads).",
            registry=registry,
            shared=shared,
            multiprocess_mode="livemin",  # one worker serving stale policy shows
        )
        self._ejections = _per_process(
            Counter,
            "meshlib_outlier_ejections",
            "Endpoints ejected by outlier detection (each ejection of an endpoint counts).",
            ["cluster"],
            registry=registry,
            shared=shared,
        )
        self._ejected = _per_process(
            Gauge,
            "meshlib_endpoints_ejected",
            "Endpoints currently ejected from the load-balancing pool by outlier detection.",
            ["cluster"],
            registry=registry,
            shared=shared,
            multiprocess_mode="livesum",
        )
        self._breakers = _per_process(
            Gauge,
            "meshlib_outlier_breakers",
            "Endpoints whose outlier-detection breaker is in `state`: open (ejected); the "
            "others are closed (in the pool). There is no half-open state: an ejected endpoint "
            "returns whole at an interval sweep.",
            ["cluster", "state"],
            registry=registry,
            shared=shared,
            multiprocess_mode="livesum",
        )
        self._retry_budget = _per_process(
            Counter,
            "meshlib_retry_budget_exhausted",
            "Retries not attempted: the retry budget or maxRetries was used up (Envoy's "
            "upstream_rq_retry_overflow).",
            ["cluster"],
            registry=registry,
            shared=shared,
        )
        self._overflow = _per_process(
            Counter,
            "meshlib_upstream_overflow",
            "Requests refused by connection-pool limits (response flag UO).",
            ["cluster"],
            registry=registry,
            shared=shared,
        )
        self._lock = threading.Lock()
        self._ejected_keys: dict[str, dict[str, str]] = {}  # cluster -> endpoint -> state

    def unregister(self) -> None:
        """Take these metrics out of their registry (in multiprocess mode they are in none)."""
        for metric in self._registered():
            self.registry.unregister(metric)

    def register(self) -> None:
        """Put them back in their registry after `unregister()`."""
        for metric in self._registered():
            self.registry.register(metric)

    def _registered(self) -> list[Any]:
        if self._shared:
            return []
        return [
            self._generation,
            self._reload_errors,
            self._reload_successful,
            self._ejections,
            self._ejected,
            self._breakers,
            self._retry_budget,
            self._overflow,
        ]

    def policy_loaded(self, snapshot_generation: int) -> None:
        """A new Snapshot is being served."""
        self._set_policy_gauge(self._generation, snapshot_generation)
        self._set_policy_gauge(self._reload_successful, 1)

    def policy_rejected(self, error: object = None) -> None:
        """New policy was invalid (an `on_error` listener: takes the PolicyError)."""
        self._reload_errors.inc()
        self._set_policy_gauge(self._reload_successful, 0)

    def _set_policy_gauge(self, gauge: Gauge, value: float) -> None:
        gauge.set(value)
        if self._shared:
            _inherited[gauge] = value  # what a forked child serves too

    def ejection(self, cluster: str, key: str, old: str, new: str) -> None:
        """An outlier-detection state change of endpoint `key` (pybreaker state names)."""
        cluster = cluster[:_MAX_CLUSTER]
        with self._lock:
            states = self._ejected_keys.setdefault(cluster, {})
            if new in _EJECTED_STATES:
                states[key] = new
            else:
                states.pop(key, None)
            self._publish(cluster, states)
        if new == "open" and old != "open":
            self._ejections.labels(cluster).inc()

    def endpoints_retained(self, cluster: str, keys: Iterable[str]) -> None:
        """Forget ejected endpoints of `cluster` that left it (a new Snapshot removed them)."""
        cluster = cluster[:_MAX_CLUSTER]
        with self._lock:
            states = self._ejected_keys.get(cluster)
            if states is not None:
                kept = set(keys)
                for gone in [key for key in states if key not in kept]:
                    del states[gone]
                self._publish(cluster, states)

    def _publish(self, cluster: str, states: dict[str, str]) -> None:
        """Set the cluster's gauges from its endpoints' breaker states (lock held)."""
        self._ejected.labels(cluster).set(len(states))
        for state in _EJECTED_STATES:
            count = sum(1 for value in states.values() if value == state)
            self._breakers.labels(cluster, state.replace("-", "_")).set(count)

    def retry_budget_exhausted(self, cluster: str) -> None:
        """A retry was refused by the retry budget or maxRetries."""
        self._retry_budget.labels(cluster[:_MAX_CLUSTER]).inc()

    def upstream_overflow(self, cluster: str) -> None:
        """A request was refused by the cluster's connection-pool limits (UO)."""
        self._overflow.labels(cluster[:_MAX_CLUSTER]).inc()
