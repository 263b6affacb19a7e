"""meshlib's own TracerProvider: its sampler, its exporter, and whether the app has one instead.

`Tracing` uses the app's provider when there is one (`_app_provider`) and builds its own only
when there is not (`build_tracer_provider`): the workload's resource, `MeshSampler` (parent
based, roots at the Telemetry percentage, changed live; an app can give it to its own
provider too) and the exporter named by `MESHLIB_TRACES_EXPORTER` (`_exporter_name`,
`_make_exporter`; OTLP over the transport OpenTelemetry's variables choose). The rules are in
`meshlib.telemetry.tracing`'s docstring ("Which TracerProvider", "Exporter", "Sampling").
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource as OtelResource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.trace import TracerProvider as ApiTracerProvider
from opentelemetry.util.types import Attributes

from meshlib.config import MeshConfig
from meshlib.errors import ConfigError
from meshlib.telemetry._caller_trace import CALLER_DECISION
from meshlib.telemetry._tracing_policy import DEFAULT_SAMPLING_PERCENTAGE

__all__ = [
    "ENV_EXPORTER",
    "ENV_PROTOCOLS",
    "EXPORTERS",
    "MeshSampler",
    "RatioSampler",
    "build_tracer_provider",
]

ENV_EXPORTER = "MESHLIB_TRACES_EXPORTER"
EXPORTERS = ("otlp", "console", "none")

_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_OTLP_GRPC_MODULE = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
# OpenTelemetry's standard choice of OTLP transport, the traces-only variable first.
ENV_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


# -- sampler ----------------------------------------------------------------------------------

_TRACE_ID_LIMIT = (1 << 64) - 1
_SAMPLE = SamplingResult(Decision.RECORD_AND_SAMPLE)
_DROP = SamplingResult(Decision.DROP)


class RatioSampler(Sampler):
    """TraceIdRatioBased with a ratio that can change at run time (one attribute write).

    Same decision as the SDK's: sampled when the trace id's low 64 bits are below
    `ratio * 2**64`, so every service with the same ratio agrees on a trace. Except when the
    caller sent its decision without ids (B3's `b3: 0`, `x-b3-sampled: 1`: `CALLER_DECISION`
    in the context): the trace starts here as it decided, as Envoy's Zipkin tracer does.
    """

    def __init__(self, ratio: float) -> None:
        self._ratio = 0.0
        self._bound = 0
        self.ratio = ratio

    @property
    def ratio(self) -> float:
        return self._ratio

    @ratio.setter
    def ratio(self, ratio: float) -> None:
        if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sampling ratio must be between 0 and 1, got {ratio!r}")
        self._ratio = ratio
        self._bound = round(ratio * (_TRACE_ID_LIMIT + 1))

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if parent_context is not None:  # a caller's decision sent without ids goes first
            decided = parent_context.get(CALLER_DECISION)
            if decided is not None:
                return _SAMPLE if decided else _DROP
        return _SAMPLE if trace_id & _TRACE_ID_LIMIT < self._bound else _DROP

    def get_description(self) -> str:
        return f"MeshRatio{{{self._ratio}}}"

    def samples(self, trace_id: int) -> bool:
        """The decision `should_sample` makes for `trace_id`."""
        return trace_id & _TRACE_ID_LIMIT < self._bound


class MeshSampler(ParentBased):
    """ParentBased(RatioSampler): follow the parent's decision; roots at `percentage`, unless
    the caller sent a decision without ids (see RatioSampler)."""

    def __init__(self, percentage: float = DEFAULT_SAMPLING_PERCENTAGE) -> None:
        self.root = RatioSampler(_ratio(percentage))
        self._percentage = float(percentage)
        super().__init__(self.root)

    @property
    def percentage(self) -> float:
        return self._percentage

    @percentage.setter
    def percentage(self, percentage: float) -> None:
        self.root.ratio = _ratio(percentage)
        self._percentage = float(percentage)


def _ratio(percentage: float) -> float:
    if math.isnan(percentage) or not 0.0 <= percentage <= 100.0:
        raise ValueError(f"sampling percentage must be between 0 and 100, got {percentage!r}")
    return percentage / 100.0


# -- provider ---------------------------------------------------------------------------------


def build_tracer_provider(
    config: MeshConfig,
    exporter: SpanExporter | None,
    *,
    sampler: Sampler | None = None,
    batch: bool = True,
) -> SdkTracerProvider:
    """meshlib's own SDK provider: workload resource, MeshSampler, one processor for `exporter`.

    Not installed globally. `batch=False` exports each span as it ends (console, tests).
    """
    resource = OtelResource.create(
        {
            "service.name": config.canonical_service,
            "service.version": config.canonical_revision,
            "k8s.namespace.name": config.namespace,
        }
    )
    provider = SdkTracerProvider(sampler=sampler or MeshSampler(), resource=resource)
    if exporter is not None:
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
    return provider


def _exporter_name(exporter: str | None) -> str:
    if exporter is None:
        raw, where = os.environ.get(ENV_EXPORTER, ""), ENV_EXPORTER
    else:
        raw, where = exporter, "exporter"
    name = raw.strip().lower() or "none"
    if name not in EXPORTERS:
        raise ConfigError(
            f"{where}={raw!r}: unknown traces exporter (choose one of {', '.join(EXPORTERS)})"
        )
    return name


def _make_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    protocol, where = _otlp_protocol()
    if protocol == "grpc":
        module_name, extra = _OTLP_GRPC_MODULE, "otlp-grpc"
    else:
        module_name, extra = _OTLP_MODULE, "otlp"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"traces exporter 'otlp' over {protocol}{where} needs an OTLP exporter that is not "
            f"installed: pip install 'meshlib-istio[{extra}]'"
        ) from None
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def _otlp_protocol() -> tuple[str, str]:
    """OTLP's transport as OpenTelemetry's variables choose it (`http/protobuf` by default, as
    the specification's), and where the choice came from, for error messages."""
    for variable in ENV_PROTOCOLS:
        raw = os.environ.get(variable, "")
        protocol = raw.strip().lower()
        if not protocol:
            continue
        if protocol not in ("http/protobuf", "grpc"):
            why = (
                " (OpenTelemetry's Python exporters have no 'http/json')"
                if protocol == "http/json"
                else ""
            )
            raise ConfigError(
                f"{variable}={raw!r}: meshlib's OTLP exporter sends 'http/protobuf' or 'grpc'{why}"
            )
        return protocol, f" ({variable})"
    return "http/protobuf", ""


def _app_provider() -> ApiTracerProvider | None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider
