"""Telemetry (telemetry.istio.io v1 / v1alpha1): tracing, metrics and access-log settings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from meshlib.policy._schema import Path, Sink, spec_field
from meshlib.policy.cel import MalformedExpression, UnsupportedExpression, parse_filter
from meshlib.policy.common import Duration, MatchLabelsSelector, PolicyTargetReference

WorkloadMode = Literal["CLIENT_AND_SERVER", "CLIENT", "SERVER"]

# The access-log providers of an `accessLogging` entry that names none and inherits none: meshlib
# acts as if MeshConfig `defaultProviders.accessLogging` were `[envoy]`. Istio's default
# MeshConfig sets none, so there such an entry logs nothing; `meshlib check` warns about it.
DEFAULT_ACCESS_LOG_PROVIDERS: tuple[str, ...] = ("envoy",)

# What meshlib applies of the Telemetry's free-form strings (the data plane and `meshlib check`
# share these rules): CEL expressions only as string literals, labels Prometheus lets it set,
# header names as HTTP spells them.
_CEL_STRING = re.compile(r"'([^'\\]*)'|\"([^\"\\]*)\"")
_SETTABLE_LABEL = re.compile(r"(?!__|le$)[a-zA-Z_][a-zA-Z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")


def cel_string_literal(expression: str | None) -> str | None:
    """The text of a CEL string literal (`'text'` or `"text"`), else None."""
    match = _CEL_STRING.fullmatch((expression or "").strip())
    if match is None:
        return None
    return match[1] if match[1] is not None else match[2]


def settable_label(name: str) -> bool:
    """A Prometheus label name that is neither reserved (`__...`) nor the histograms' `le`."""
    return _SETTABLE_LABEL.fullmatch(name) is not None


def header_name(name: str) -> bool:
    """An HTTP header name (an RFC 9110 token)."""
    return _HEADER_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class ProviderRef:
    name: str = spec_field(required=True)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.name:
            sink.error((*path, "name"), "must not be empty")


@dataclass(frozen=True, slots=True)
class WorkloadModeSelector:
    mode: WorkloadMode | None = None


@dataclass(frozen=True, slots=True)
class LiteralTag:
    value: str = spec_field(required=True)

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if not self.value:
            sink.error((*path, "value"), "must not be empty")


@dataclass(frozen=True, slots=True)
class EnvironmentTag:
    name: str = spec_field(required=True)
    default_value: str | None = None


@dataclass(frozen=True, slots=True)
class RequestHeaderTag:
    name: str = spec_field(required=True)
    default_value: str | None = None


@dataclass(frozen=True, slots=True)
class FormatterTag:
    value: str = spec_field(required=True)


@dataclass(frozen=True, slots=True)
class CustomTag:
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: RequestHeaderTag | None = None
    formatter: FormatterTag | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        given = [k for k in ("literal", "environment", "header", "formatter") if getattr(self, k)]
        if len(given) != 1:
            sink.error(path, "exactly one of literal, environment, header, formatter is required")


@dataclass(frozen=True, slots=True)
class Tracing:
    match: WorkloadModeSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: float | None = spec_field(ge=0, le=100)
    disable_span_reporting: bool | None = None
    custom_tags: Mapping[str, CustomTag] = spec_field({})
    use_request_id_for_trace_sampling: bool | None = None
    enable_istio_tags: bool | None = None
    disable_context_propagation: bool | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if "" in self.custom_tags:
            sink.error((*path, "customTags", ""), "a tag name may not be empty")


MetricName = Literal[
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
]


@dataclass(frozen=True, slots=True)
class MetricSelector:
    metric: MetricName | None = None
    custom_metric: str | None = None
    mode: WorkloadMode | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if self.metric is not None and self.custom_metric is not None:
            sink.error(path, "only one of metric and customMetric may be set")
        if self.custom_metric == "":
            sink.error((*path, "customMetric"), "must not be empty")


@dataclass(frozen=True, slots=True)
class TagOverride:
    operation: Literal["UPSERT", "REMOVE"] | None = None
    value: str | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        operation = self.operation or "UPSERT"
        if operation == "UPSERT" and not self.value:
            sink.error((*path, "value"), "must be set when operation is UPSERT")
        if operation == "REMOVE" and self.value:
            sink.error((*path, "value"), "may only be set when operation is UPSERT")


@dataclass(frozen=True, slots=True)
class MetricsOverrides:
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: Mapping[str, TagOverride] = spec_field({})

    def validate_policy(self, path: Path, sink: Sink) -> None:
        if "" in self.tag_overrides:  # Istio only warns
            sink.warning((*path, "tagOverrides", ""), "a tag override name may not be empty")


@dataclass(frozen=True, slots=True)
class Metrics:
    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverrides, ...] = ()
    reporting_interval: Duration | None = None


@dataclass(frozen=True, slots=True)
class AccessLogFilter:
    expression: str | None = None

    def validate_policy(self, path: Path, sink: Sink) -> None:
        # Istio's validateTelemetryFilter: cel-go must parse it, and an absent expression is "".
        try:
            parse_filter(self.expression or "")
        except MalformedExpression as error:
            sink.error((*path, "expression"), f"must be a valid CEL expression ({error})")
        except UnsupportedExpression:
            pass  # valid CEL that meshlib does not evaluate: `meshlib check` warns


@dataclass(frozen=True, slots=True)
class AccessLogging:
    match: WorkloadModeSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: bool | None = None
    filter: AccessLogFilter | None = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    selector: MatchLabelsSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    tracing: tuple[Tracing, ...] = ()
    metrics: tuple[Metrics, ...] = ()
    access_logging: tuple[AccessLogging, ...] = ()

    @property
    def targeted(self) -> bool:
        """Whether it names gateways or waypoints (`targetRef(s)`), which meshlib ignores."""
        return self.target_ref is not None or bool(self.target_refs)

    @property
    def match_labels(self) -> Mapping[str, str]:
        """The labels of the workloads it selects; none: its whole namespace."""
        return self.selector.match_labels if self.selector is not None else {}

    def validate_policy(self, path: Path, sink: Sink) -> None:
        chosen = [n for n in ("selector", "target_ref", "target_refs") if getattr(self, n)]
        if len(chosen) > 1:
            sink.error(path, "only one of selector, targetRef and targetRefs may be set")
        # Istio's validateTelemetryTracing warnings (pilot uses the first entry and provider)
        if len(self.tracing) > 1:
            sink.warning((*path, "tracing"), "multiple tracing is not currently supported")
        for index, tracing in enumerate(self.tracing):
            if len(tracing.providers) > 1:
                sink.warning(
                    (*path, "tracing", index, "providers"),
                    "multiple providers is not currently supported",
                )
