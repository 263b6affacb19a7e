"""How Istio's four metric families look on the wire, and `render`, which writes them fast.

Everything below `meshlib.telemetry.metrics` shares this: the label names in Istio's order
(`REQUEST_LABELS`), Envoy's buckets and how their `le` is written, the help texts, and the row
(`_Row`) a label set's values travel in, whichever storage holds them — meshlib's own in one
process (`_metrics_series`), or the mmap files of every worker in multiprocess mode
(`_metrics_multiprocess`). Rows get the Telemetry's `metrics[].overrides` here, when a scrape
renders them (`_overridden`), then become Prometheus text or prometheus-client samples.

`render` exists for speed: prometheus-client's `generate_latest` formats every sample through
generic code and takes 0.7-1.1 s for 2,000 series of this shape; `render` about 30 ms
(`python -m bench metrics`). While it collects, meshlib's collectors hand over ready text
(`_Rendered`); every other family still goes through `generate_latest`, so the output is what
that would print. Its public home is `meshlib.telemetry.metrics.render`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import REGISTRY
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _float_to_go_string

from meshlib.telemetry.metric_overrides import MetricOverrides

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "REQUEST_LABELS", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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

_REQUESTS = "istio_requests"  # prometheus-client's family name; samples are `..._total`
_HISTOGRAMS = ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes")
_HELP = {
    _REQUESTS: "Requests, counted by the destination (reporter=destination) or the source.",
    _HISTOGRAMS[0]: "Request duration in milliseconds, request start to response complete.",
    _HISTOGRAMS[1]: "Request size in bytes.",
    _HISTOGRAMS[2]: "Response size in bytes.",
}
_ISTIO_FAMILIES = frozenset((_REQUESTS, *_HISTOGRAMS))

# Set while `render` collects, so that collectors of meshlib hand over text, not samples.
_fast_render: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "meshlib_fast_render", default=False
)


# -- label values ----------------------------------------------------------------------------


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join([f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)])


# -- rows ------------------------------------------------------------------------------------

# A snapshot of one label set: (label text, label names, label values, requests or None,
# then for each histogram (bucket counts, not cumulative, +Inf last; sum) or None). Counts are
# `int | float`, not `float`: compiled, an int stored where a float is declared becomes one,
# and renders as "1.0" where the pure build writes "1".
_Hist = tuple[Sequence[float], float]
_Row = tuple[str, Sequence[str], Sequence[str], int | float | None, tuple[_Hist | None, ...]]


# -- Telemetry overrides ---------------------------------------------------------------------


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
