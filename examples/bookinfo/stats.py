"""Golden signals from meshlib's Prometheus metrics: what `linkerd viz stat` shows.

A scrape of one process is reduced to `Totals`: cumulative request counts and latency bucket
counts, keyed by who reported them (reporter="source": a meshed caller; "destination": the
workload itself) and the destination's service and version. Totals add up across processes
and subtract between two moments; the difference over a window gives, per service and
version, requests per second, success rate (neither 5xx nor given up: code 0) and p50/p99
latency, interpolated in
the histogram buckets as Prometheus' histogram_quantile() does.

For each service the callers' view (reporter="source") is used when it has meshed callers, so
client-side faults, timeouts and retries show; its own view (reporter="destination") otherwise
(productpage, whose caller is the load generator, outside the mesh).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
SOURCE, DESTINATION = "source", "destination"

# (reporter, destination service name, destination version, success)
RequestKey = tuple[str, str, str, bool]
# (reporter, destination service name, destination version, bucket upper bound in ms)
BucketKey = tuple[str, str, str, float]
Row = tuple[str, str]  # (service, version)
K = TypeVar("K")


@dataclass(frozen=True)
class Totals:
    """Cumulative counts, summed over the processes scraped."""

    requests: dict[RequestKey, float] = field(default_factory=dict)
    buckets: dict[BucketKey, float] = field(default_factory=dict)

    def __add__(self, other: Totals) -> Totals:
        return Totals(_plus(self.requests, other.requests), _plus(self.buckets, other.buckets))

    def since(self, earlier: Totals) -> Totals:
        """What was counted between `earlier` and this (a restarted process counts from 0)."""
        requests = _minus(self.requests, earlier.requests)
        # Buckets that counted nothing new stay: a quantile interpolates from the bound below.
        return Totals(requests, _minus(self.buckets, earlier.buckets, keep_zero=True))


def _plus(a: Mapping[K, float], b: Mapping[K, float]) -> dict[K, float]:
    result = dict(a)
    for key, value in b.items():
        result[key] = result.get(key, 0.0) + value
    return result


def _minus(
    new: Mapping[K, float], old: Mapping[K, float], *, keep_zero: bool = False
) -> dict[K, float]:
    result = {}
    for key, value in new.items():
        # A sum that went down (a restarted process among those summed) counts nothing: the
        # other processes' counts are not known apart from it here.
        change = max(value - old.get(key, 0.0), 0.0)
        if change > 0 or keep_zero:
            result[key] = change
    return result


def parse(text: str) -> Totals:
    """The Totals of one process's /stats/prometheus text."""
    # Keep only the two families used (and their metadata) before parsing: a scrape also
    # holds byte-size histograms and meshlib's own metrics, which would only cost time.
    wanted = "\n".join(
        line
        for line in text.splitlines()
        if line.startswith((REQUESTS, DURATION + "_bucket"))
        or (line.startswith("#") and (REQUESTS in line or DURATION in line))
    )
    requests: dict[RequestKey, float] = {}
    buckets: dict[BucketKey, float] = {}
    for family in text_string_to_metric_families(wanted + "\n"):
        for sample in family.samples:
            labels = sample.labels
            reporter = labels.get("reporter", "")
            service = labels.get("destination_service_name", "unknown")
            version = labels.get("destination_version") or "unknown"
            if sample.name == REQUESTS:
                # A failure: a 5xx, or no answer at all (code 0: the caller gave up first, DC).
                code = labels.get("response_code", "")
                ok = not code.startswith("5") and code != "0"
                key = (reporter, service, version, ok)
                requests[key] = requests.get(key, 0.0) + sample.value
            elif sample.name == DURATION + "_bucket":
                bucket = (reporter, service, version, float(labels["le"]))
                buckets[bucket] = buckets.get(bucket, 0.0) + sample.value
    return Totals(requests, buckets)


def total(items: Iterable[Totals]) -> Totals:
    result = Totals()
    for item in items:
        result = result + item
    return result


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """histogram_quantile(q) over cumulative `buckets` {upper bound: count}; None if empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # in the +Inf bucket: the highest finite bound, as Prometheus
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Signal:
    """One row of the table: a service version's golden signals over a window."""

    service: str
    version: str
    view: str  # "callers" (reporter=source) or "inbound" (reporter=destination)
    requests: float
    rps: float
    success: float | None  # share of non-5xx answers; None without requests
    p50: float | None  # milliseconds
    p99: float | None
    served_success: float | None  # the workload's own view (reporter=destination)


def reporter_for(service: str, totals: Totals) -> str:
    """The callers' view when meshed callers have reported on `service`, else its own."""
    if any(key[0] == SOURCE and key[1] == service for key in totals.requests):
        return SOURCE
    return DESTINATION


def signals(
    window: Totals, seconds: float, rows: Iterable[Row], cumulative: Totals
) -> list[Signal]:
    """Golden signals per (service, version) over `window` (a Totals difference).

    `rows` are always listed (zero traffic shows as such); a version seen only in the window
    (e.g. "unknown": meshlib answered itself, with no workload behind the answer) is added.
    """
    listed = list(rows)
    views = {service: reporter_for(service, cumulative) for service, _ in listed}
    for reporter, service, version, _ in window.requests:
        if views.get(service) == reporter and (service, version) not in listed:
            listed.append((service, version))
    result = []
    for service, version in listed:
        reporter = views.get(service, DESTINATION)
        ok = window.requests.get((reporter, service, version, True), 0.0)
        failed = window.requests.get((reporter, service, version, False), 0.0)
        served_ok = window.requests.get((DESTINATION, service, version, True), 0.0)
        served_failed = window.requests.get((DESTINATION, service, version, False), 0.0)
        buckets = {
            le: count
            for (rep, svc, ver, le), count in window.buckets.items()
            if (rep, svc, ver) == (reporter, service, version)
        }
        result.append(
            Signal(
                service=service,
                version=version,
                view="callers" if reporter == SOURCE else "inbound",
                requests=ok + failed,
                rps=(ok + failed) / seconds if seconds > 0 else 0.0,
                success=ok / (ok + failed) if ok + failed else None,
                p50=quantile(0.5, buckets),
                p99=quantile(0.99, buckets),
                served_success=(
                    served_ok / (served_ok + served_failed) if served_ok + served_failed else None
                ),
            )
        )
    return result


def service_success(window: Totals, service: str, cumulative: Totals) -> tuple[float, float | None]:
    """(requests, success rate) of `service` over every version, in its chosen view."""
    reporter = reporter_for(service, cumulative)
    ok = sum(v for k, v in window.requests.items() if k[:2] == (reporter, service) and k[3])
    failed = sum(v for k, v in window.requests.items() if k[:2] == (reporter, service) and not k[3])
    return ok + failed, (ok / (ok + failed) if ok + failed else None)


def service_p99(window: Totals, service: str, cumulative: Totals) -> float | None:
    """p99 latency of `service` over every version, in its chosen view."""
    reporter = reporter_for(service, cumulative)
    buckets: dict[float, float] = {}
    for (rep, svc, _, le), count in window.buckets.items():
        if (rep, svc) == (reporter, service):
            buckets[le] = buckets.get(le, 0.0) + count
    return quantile(0.99, buckets)
