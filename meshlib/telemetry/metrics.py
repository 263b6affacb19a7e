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

This module keeps `IstioMetrics`, its `DestinationRecorder` and the label values they record,
and is the public home of everything in `__all__`; the rest lives in private modules beside it,
each below this one and none importing it: `_metrics_series` (the values of one label set, on
the per-request path), `_metrics_exposition` (the families' shape, the Telemetry overrides
applied at scrape time, `render`), `_metrics_multiprocess` (multiprocess mode and the merged
view, `exposed_registry`), `_metrics_serving` (the metrics port, `metrics_wsgi_app`,
`metrics_asgi_app`) and `_metrics_operational` (`OperationalMetrics`, meshlib's own metrics).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

from meshlib._memo import Memo
from meshlib.config import MeshConfig
from meshlib.telemetry._metrics_exposition import (
    _HELP,
    _HISTOGRAMS,
    _REQUESTS,
    CONTENT_TYPE,
    DURATION_BUCKETS,
    REQUEST_LABELS,
    _families,
    _fast_render,
    _overridden,
    _render_rows,
    _Rendered,
    render,
)
from meshlib.telemetry._metrics_multiprocess import (
    MultiProcessMetrics,
    _check_multiprocess_dir,
    _per_process,
    exposed_registry,
    multiprocess_dir,
    render_with_overrides_of,
    stop_rendering_with_overrides_of,
)
from meshlib.telemetry._metrics_operational import OperationalMetrics, cluster_name
from meshlib.telemetry._metrics_series import (
    _MultiProcessSeries,
    _observe,
    _PrometheusMetrics,
    _Series,
    _series_key,
)
from meshlib.telemetry._metrics_serving import (
    MetricsServer,
    metrics_asgi_app,
    metrics_wsgi_app,
    serve_metrics,
)
from meshlib.telemetry.metric_overrides import MetricOverrides
from meshlib.telemetry.peer import UNKNOWN_PEER, PeerIdentity
from meshlib.telemetry.peer import decode as decode_peer

if TYPE_CHECKING:
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

Reporter = Literal["source", "destination"]
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


# -- label values ----------------------------------------------------------------------------


def _bounded(value: object, default: str, limit: int = _MAX_VALUE) -> str:
    if not isinstance(value, str) or not value:
        return default
    return value[:limit]


def _checked(value: object, pattern: re.Pattern[str], default: str) -> str:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    return default


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
        stop_rendering_with_overrides_of(self)

    def render_multiprocess_with_these(self) -> None:
        """Make this workload's overrides the ones the multiprocess view renders with (the
        view shows every worker's series; the workers share the policy). The Mesh that serves
        the metrics port calls this."""
        render_with_overrides_of(self)

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
