"""Tracing: an OpenTelemetry SERVER span per served request, a CLIENT span per outbound attempt.

    tracing = Tracing(config)                       # exporter: MESHLIB_TRACES_EXPORTER or "none"
    tracing.set_sampling(sampling_percentage(snapshot, config))   # on every Snapshot swap
    with tracing.server_span("GET", "/productpage", scheme="http", host="pp:9080",
                             context=inbound_otel_context) as span:
        with tracing.client_span("GET", "http://reviews:9080/reviews/1", attempt=1,
                                 cluster="outbound|9080|v2|reviews.default.svc.cluster.local",
                                 subset="v2", upstream="10.0.0.7:9080") as attempt:
            ...
            tracing.finish_client(attempt, 200, "-")
        tracing.finish_server(span, 200)

Rules (what a user of Istio and of OpenTelemetry would expect; see also the README table):

- **Which TracerProvider.** An explicit `tracer_provider` argument wins; else a real provider
  the app installed globally (`opentelemetry.trace.set_tracer_provider`, anything but the API's
  proxy / no-op provider) is used as it is — its sampler, processors and exporters; meshlib
  never replaces or changes the global provider. Only when there is none does meshlib build
  its own SDK provider (resource `service.name` = canonical service, `service.version`,
  `k8s.namespace.name`), and never installs it globally. The choice is made once, in
  `Tracing.__init__`: configure the app's OpenTelemetry before meshlib.
- **Exporter** (`exporter=` or `MESHLIB_TRACES_EXPORTER`): `otlp` (OTLP/HTTP, the `otlp` extra;
  Jaeger and the OpenTelemetry Collector take it; endpoint and transport from the standard
  `OTEL_EXPORTER_OTLP_*` variables, `..._PROTOCOL=grpc` with the gRPC exporter installed) with
  a BatchSpanProcessor, `console` with a
  SimpleSpanProcessor, `none` (default). With `none` and no app provider, tracing is off: no
  spans are made and the inbound trace context passes through unchanged (what a proxy without
  a tracer does), which keeps downstream spans attached to the caller's span.
- **Sampling** (own provider only): ParentBased — a request with an inbound sampled parent is
  sampled, one with an unsampled parent is not, whatever the percentage; root traces are
  sampled at Telemetry `randomSamplingPercentage` (default 1%, Istio's PILOT_TRACE_SAMPLING),
  changed live by `set_sampling`. An app provider keeps its own sampler. A B3 caller that
  deferred its decision (ids without a sampled flag) leaves it to this hop: it is made at
  that percentage from the trace id (as a root's would be), and that decision goes on.
- **No double spans** with opentelemetry-instrumentation. SERVER: if a recording SERVER span
  is already current (instrumentation-asgi/wsgi outside meshlib), meshlib makes none and
  annotates that one with its `meshlib.*` attributes only; instrumentation running *inside*
  meshlib sees meshlib's current span and makes an INTERNAL span (its own rule). CLIENT: if a
  recording CLIENT span is current (instrumentation-httpx/requests outside meshlib's attempt
  loop), meshlib annotates it (`meshlib.*`, resend count of the latest attempt) instead of
  nesting; while meshlib's own CLIENT span is current it sets OpenTelemetry's
  "suppress HTTP instrumentation" context key, so instrumented transports *under* meshlib skip
  theirs. Spans meshlib did not make are never ended or given a status by meshlib.
- **Cost.** When a span is not sampled it is the SDK's non-recording span and no attribute is
  built (`is_recording()` is checked first). With meshlib's ParentBased sampler, a request whose
  inbound parent is unsampled gets no span at all (the caller's context is made current and
  passes through unchanged), nor do attempts under an unsampled span: the sampler would drop
  them, and nothing about them is ever exported.
- Span names: SERVER `"<METHOD> <route or path>"` (query dropped, path cut at 128
  characters; the query goes in `url.query`); CLIENT `"<METHOD> <host[:port]>"` (the URL's
  authority, low cardinality, as Istio names client spans by host). Status, as OpenTelemetry's
  HTTP semantic conventions say: ERROR with `error.type` for 5xx on SERVER spans (4xx are the
  caller's), for 4xx and 5xx on CLIENT spans, and for attempts with no response. A request
  that ended with no status sent has no `http.response.status_code`.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import Token
from types import TracebackType
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY, Context
from opentelemetry.sdk.resources import Resource as OtelResource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TraceState
from opentelemetry.trace import TracerProvider as ApiTracerProvider
from opentelemetry.util.types import Attributes

from meshlib._version import __version__
from meshlib.config import MeshConfig
from meshlib.errors import ConfigError
from meshlib.policy.hosts import strip_port
from meshlib.policy.snapshot import Snapshot
from meshlib.policy.telemetry import Tracing as TracingSpec
from meshlib.policy.telemetry import header_name
from meshlib.telemetry._caller_trace import (
    B3_DEFERRED,
    B3_SAMPLING_KEY,
    CALLER_DECISION,
    SPAN_KEY,
    CallerSpan,
    decided,
)
from meshlib.telemetry._resolve import telemetry_levels

__all__ = [
    "DEFAULT_SAMPLING_PERCENTAGE",
    "ENV_EXPORTER",
    "EXPORTERS",
    "TRACER_NAME",
    "MeshSampler",
    "RatioSampler",
    "Tracing",
    "build_tracer_provider",
    "effective_tracing",
    "sampling_percentage",
]

log = logging.getLogger(__name__)

ENV_EXPORTER = "MESHLIB_TRACES_EXPORTER"
EXPORTERS = ("otlp", "console", "none")
DEFAULT_SAMPLING_PERCENTAGE = 1.0  # Istio's PILOT_TRACE_SAMPLING default
TRACER_NAME = "meshlib"
MAX_NAME_PATH = 128

_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_OTLP_GRPC_MODULE = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
# OpenTelemetry's standard choice of OTLP transport, the traces-only variable first.
ENV_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_FLAGS = "-"
_SERVER = SpanKind.SERVER
_CLIENT = SpanKind.CLIENT


# -- which sampling percentage applies (Telemetry precedence) --------------------------------


def effective_tracing(
    snapshot: Snapshot, config: MeshConfig, mode: Literal["SERVER", "CLIENT"] | None = None
) -> TracingSpec:
    """This workload's tracing settings, merged mesh -> namespace -> workload, field by field.

    As Istio does, every entry of `tracing[]` whose `match.mode` covers `mode` (no match, or
    CLIENT_AND_SERVER, covers both sides; `mode` None takes all) applies in order, a later one
    overriding the fields it sets.

    Mesh level: the first (oldest) selector-less Telemetry in the root namespace; namespace
    level: the first selector-less one in `config.namespace`; workload level: every Telemetry in
    `config.namespace` whose `selector.matchLabels` all match `config.labels`, oldest first.
    A level without `tracing` inherits; a field left unset inherits; `customTags` replace the
    parent's map entirely. Telemetry with `targetRef(s)` (gateways, waypoints) is ignored.
    (The levels come from `meshlib.telemetry._resolve.telemetry_levels`.)
    """
    merged = TracingSpec()
    for level in telemetry_levels(snapshot, config):
        for entry in level.tracing:
            if _covers(entry, mode):
                merged = _overlay(merged, entry)
    return merged


def _covers(entry: TracingSpec, mode: Literal["SERVER", "CLIENT"] | None) -> bool:
    chosen = entry.match.mode if entry.match is not None else None
    return mode is None or chosen in (None, "CLIENT_AND_SERVER", mode)


def sampling_percentage(snapshot: Snapshot, config: MeshConfig) -> float:
    """Telemetry `randomSamplingPercentage` for this workload (0-100), default 1.0."""
    value = effective_tracing(snapshot, config).random_sampling_percentage
    return DEFAULT_SAMPLING_PERCENTAGE if value is None else float(value)


HeaderLookup = Callable[[str], "Sequence[str] | str | None"]
"""`lookup(name)`: request header `name` (lowercase) — its value or values; None if absent."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpanTags:
    """Telemetry `tracing.customTags`, ready for spans: `literal` and `environment` values
    resolved once (when the policy is applied), `header` ones read from each request."""

    static: Mapping[str, str] = dataclasses.field(default_factory=dict)
    headers: tuple[tuple[str, str, str | None], ...] = ()
    """(tag, request header in lowercase, defaultValue)."""

    @classmethod
    def of(cls, spec: TracingSpec, environ: Mapping[str, str] | None = None) -> SpanTags:
        env = os.environ if environ is None else environ
        static: dict[str, str] = {}
        headers: list[tuple[str, str, str | None]] = []
        for tag, custom in spec.custom_tags.items():
            if custom.literal is not None:
                static[tag] = custom.literal.value
            elif custom.environment is not None:
                value = env.get(custom.environment.name, custom.environment.default_value)
                if value is not None:
                    static[tag] = value
            elif custom.header is not None:
                name = custom.header.name.lower()
                if header_name(name):
                    headers.append((tag, name, custom.header.default_value))
                else:
                    log.warning(
                        "meshlib: Telemetry customTags %r: %r is not an HTTP header name; "
                        "the tag is left out",
                        tag,
                        custom.header.name,
                    )
            elif custom.formatter is not None:
                log.warning(
                    "meshlib: Telemetry customTags %r: formatter tags are not supported; "
                    "the tag is left out",
                    tag,
                )
        return cls(static, tuple(headers))

    @property
    def header_names(self) -> frozenset[str]:
        return frozenset(name for _, name, _ in self.headers)

    def add_to(self, attributes: dict[str, str | int], lookup: HeaderLookup | None) -> None:
        """Put the tags into a span's `attributes` (a header tag absent from the request
        takes its defaultValue, or is left out)."""
        if self.static:
            attributes.update(self.static)
        for tag, name, default in self.headers:
            found = lookup(name) if lookup is not None else None
            value = (found if isinstance(found, str) else ", ".join(found)) if found else default
            if value is not None:
                attributes[tag] = value


NO_TAGS = SpanTags()


def _overlay(parent: TracingSpec, child: TracingSpec) -> TracingSpec:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(child):
        value = getattr(child, f.name)
        if value is None or (isinstance(value, (tuple, Mapping)) and not value):
            continue
        changes[f.name] = value
    return dataclasses.replace(parent, **changes) if changes else parent


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


# -- spans ------------------------------------------------------------------------------------


FLUSH_TIMEOUT_S = 5.0
"""How long a flush at a server's shutdown may wait for the exporter (a collector that is
down should not hold a pod's termination past its grace period)."""


class Tracing:
    """Makes meshlib's spans on the right TracerProvider (see the module docstring for rules)."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        exporter: str | None = None,
        tracer_provider: ApiTracerProvider | None = None,
    ) -> None:
        self.config = config
        self.exporter = _exporter_name(exporter)
        self._percentage = DEFAULT_SAMPLING_PERCENTAGE
        self._sampler: MeshSampler | None = None
        self._owned: SdkTracerProvider | None = None
        provider = tracer_provider if tracer_provider is not None else _app_provider()
        if provider is not None:
            sampler = getattr(provider, "sampler", None)
            if isinstance(sampler, MeshSampler):
                self._sampler = sampler
                self._percentage = sampler.percentage
            if self.exporter != "none":  # a setting that does nothing is worth a warning
                log.warning(
                    "meshlib: traces exporter %r is not used: meshlib's spans go to the app's "
                    "TracerProvider and its exporters (set the exporter there, or leave "
                    "meshlib's at 'none')",
                    self.exporter,
                )
        elif self.exporter != "none":
            self._sampler = MeshSampler(self._percentage)
            provider = self._owned = build_tracer_provider(
                config,
                _make_exporter(self.exporter),
                sampler=self._sampler,
                batch=self.exporter == "otlp",
            )
        self.provider: ApiTracerProvider | None = provider
        self._tracer = provider.get_tracer(TRACER_NAME, __version__) if provider else None
        self.tags: SpanTags = NO_TAGS
        """The Telemetry's `customTags` for this workload's SERVER spans."""
        self.client_tags: SpanTags = NO_TAGS
        """... and for its CLIENT spans (they differ only with `match.mode` entries)."""
        self.report_server = True
        """False when the Telemetry says `disableSpanReporting` for SERVER spans."""
        self.report_client = True

    @property
    def enabled(self) -> bool:
        """Whether meshlib makes spans at all (False: exporter none and no app provider)."""
        return self._tracer is not None

    def needs_server_span(self, context: Context, sampled: bool | None) -> bool:
        """Whether a request served under `context` (its caller's decision `sampled`, None
        when the context is not the one current) needs a SERVER span scope: not when meshlib
        makes no spans, nor for the caller's unsampled trace, already current, when meshlib's
        sampler follows the parent — the span would only pass the caller's context on."""
        if self._tracer is None:
            return False
        if sampled is not False or self._sampler is None:
            return True
        span = context.get(SPAN_KEY)  # what trace.get_current_span(context) reads, directly
        if type(span) is CallerSpan:
            return span.sampled
        return not _unsampled(trace.get_current_span(context))

    def decide(self, trace_id: int) -> bool:
        """This hop's sampling decision for a trace whose caller deferred it: the root
        decision, at the sampling percentage (the mesh's sampler's, when it has one)."""
        if self._sampler is not None:
            return self._sampler.root.samples(trace_id)
        return RatioSampler(_ratio(self._percentage)).samples(trace_id)

    @property
    def owns_provider(self) -> bool:
        return self._owned is not None

    @property
    def sampling(self) -> float:
        """The root-trace sampling percentage last set (applied only with a MeshSampler)."""
        return self._percentage

    def set_sampling(self, percentage: float) -> None:
        """Sample this percentage (0-100) of root traces from now on; parents still decide."""
        _ratio(percentage)  # refuses values outside 0-100 before anything changes
        self._percentage = float(percentage)
        if self._sampler is not None:
            self._sampler.percentage = percentage

    def apply(self, snapshot: Snapshot) -> None:
        """Take the sampling percentage and custom tags a new Snapshot's Telemetry gives
        this workload."""
        spec = effective_tracing(snapshot, self.config)
        percentage = spec.random_sampling_percentage
        self.set_sampling(DEFAULT_SAMPLING_PERCENTAGE if percentage is None else percentage)
        server = effective_tracing(snapshot, self.config, "SERVER")
        client = effective_tracing(snapshot, self.config, "CLIENT")
        tags = SpanTags.of(server)
        if tags != self.tags:
            self.tags = tags
        client_tags = SpanTags.of(client)
        if client_tags != self.client_tags:
            self.client_tags = client_tags
        self.report_server = not server.disable_span_reporting
        self.report_client = not client.disable_span_reporting

    def server_span(
        self,
        method: str,
        path: str,
        *,
        scheme: str,
        host: str,
        context: Context | None,
        route: str | None = None,
        headers: HeaderLookup | None = None,
        query: Callable[[], str] | None = None,
    ) -> ServerScope:
        """A SERVER span for one served request, current inside the `with` block.

        `context` is the inbound context extracted from the request's headers (its span is
        the remote parent); `route` (e.g. `/reviews/{id}`) names the span when known;
        `headers` reads the request's headers for `header` custom tags; `query()` gives the
        query string (`url.query`), called only when the span records. Set the scope's
        `end_time` before the block ends when the response was complete earlier.
        """
        return ServerScope(self, method, path, scheme, host, context, route, headers, query)

    def finish_server(
        self, span: Span, status: int, flags: str | Iterable[str] | None = None
    ) -> None:
        """Record the response status (ERROR for 5xx; 0, none sent, leaves the attribute out)
        and meshlib's response flags."""
        if not span.is_recording():
            return
        attributes: dict[str, str | int] = {}
        flag_text = _flags(flags)
        if flag_text is not None:
            attributes["meshlib.response_flags"] = flag_text
        if _owned(span):
            if status:
                attributes["http.response.status_code"] = status
            if status >= 500:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)

    def client_span(
        self,
        method: str,
        url: str,
        *,
        attempt: int,
        cluster: str | None,
        subset: str | None,
        upstream: str | None,
        headers: HeaderLookup | None = None,
    ) -> AbstractContextManager[Span]:
        """A CLIENT span for one outbound attempt (attempt 1, 2, ...), current while it runs;
        `headers` reads the outbound request's headers for `header` custom tags."""
        return _ClientScope(self, method, url, attempt, cluster, subset, upstream, headers)

    def finish_client(
        self,
        span: Span,
        status: int | None,
        flags: str | Iterable[str] | None = None,
        *,
        upstream: str | None = None,
    ) -> None:
        """Record the attempt's status (None: no response) and Envoy response flags.

        ERROR for 4xx and 5xx (OpenTelemetry's rule for CLIENT spans) and for attempts without
        a response (local failures: UF, UT, UO ...).
        """
        if not span.is_recording():
            return
        attributes: dict[str, str | int] = {}
        flag_text = _flags(flags)
        if flag_text is not None:
            attributes["meshlib.response_flags"] = flag_text
        if _owned(span):
            if upstream:
                _peer(attributes, upstream)
            if status:
                attributes["http.response.status_code"] = status
            if not status or status >= 400:
                attributes["error.type"] = str(status) if status else (flag_text or "_OTHER")
                span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Export the spans meshlib's own provider still holds in its batch, waiting at most
        `timeout` seconds; an app's provider is left alone. False when the export did not end
        in time: it goes on in a daemon thread, which the process does not wait for, at exit
        either. (The SDK's `force_flush` does not keep to its own timeout: it exports every
        batch queued, each with the exporter's retries.)"""
        owned = self._owned
        if owned is None:
            return True
        exporting = threading.Thread(
            target=owned.force_flush, name="meshlib-span-flush", daemon=True
        )
        exporting.start()
        exporting.join(timeout)
        if not exporting.is_alive():
            return True
        # Nor does the process wait for it at exit: the SDK's exit handler would shut the
        # provider down, waiting on this export first, and then up to 30 s more.
        atexit.unregister(owned.shutdown)
        return False

    def shutdown(self) -> None:
        """Flush and stop meshlib's own provider; an app's provider is left alone."""
        owned, self._owned = self._owned, None
        if owned is not None:
            self._tracer = None
            owned.shutdown()


class _Scope:
    """Enters a span: makes it current, and on exit ends it if meshlib made it."""

    __slots__ = ("_token", "end_time", "owned", "span", "tracing")

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.span: Span = trace.INVALID_SPAN
        self.owned = False
        self._token: Token[Context] | None = None
        self.end_time: int | None = None
        """When the span ends (`time.time_ns()`), if before the block does; None: on exit."""

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Span:
        self._start()
        return self.span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is not None:
            self._token = None
            otel_context.detach(token)
        if self.owned:
            span = self.span
            if exc is not None and isinstance(exc, Exception) and span.is_recording():
                span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end(self.end_time)


class ServerScope(_Scope):
    """`Tracing.server_span`'s scope."""

    __slots__ = (
        "context",
        "headers",
        "host",
        "method",
        "path",
        "query",
        "route",
        "scheme",
        "unrouted",
    )

    def __init__(
        self,
        tracing: Tracing,
        method: str,
        path: str,
        scheme: str,
        host: str,
        context: Context | None,
        route: str | None,
        headers: HeaderLookup | None,
        query: Callable[[], str] | None,
    ) -> None:
        super().__init__(tracing)
        self.method = method
        self.path = path
        self.scheme = scheme
        self.host = host
        self.context = context
        self.route = route
        self.headers = headers
        self.query = query
        self.unrouted = False
        """Whether the span wants the route its framework matched: a span of meshlib's that
        records (a sampled request), named at its start by no route. What only a route reads
        is read then, never for the requests left unsampled."""

    def _start(self) -> None:
        current = trace.get_current_span()
        if current.is_recording():
            if getattr(current, "kind", None) is _SERVER:
                self.span = current  # the app's instrumentation made it: no second one
                return
            parent = None  # an app span is current: ours is its child
        else:
            parent = self.context
            if parent is not None and parent.get(B3_SAMPLING_KEY) == B3_DEFERRED:
                parent = decided(parent, self.tracing.decide)  # the B3 caller left it to us
        tracer = self.tracing._tracer
        if tracer is None:
            self.span = current
            return
        report = self.tracing.report_server
        if not report:  # disableSpanReporting: a trace that came in (or the app's) goes on
            remote = trace.get_current_span(parent) if parent is not None else current
            if remote.get_span_context().is_valid:
                self.span = remote
                if parent is not None:
                    self._token = otel_context.attach(parent)
                return
        if self.tracing._sampler is not None and parent is not None:
            remote = trace.get_current_span(parent)
            if _unsampled(remote):  # ParentBased drops it: pass the caller's context through
                self.span = remote
                self._token = otel_context.attach(parent)
                return
        path = self.path.partition("?")[0]
        method = _method(self.method)
        span = tracer.start_span(self._name(method, self.route or path), parent, kind=_SERVER)
        if not report:
            # No trace came in: this span is the request's trace root (its ids and sampling
            # decision go on to the calls made), but it is never ended, so never reported.
            self.span = span
            self._token = otel_context.attach(trace.set_span_in_context(span, parent))
            return
        if span.is_recording():
            host, port = strip_port(self.host)
            attributes: dict[str, str | int] = {
                "http.request.method": method,
                "url.path": path,
                "url.scheme": self.scheme,
                "server.address": host,
            }
            if method == "_OTHER":
                attributes["http.request.method_original"] = self.method
            if port is not None:
                attributes["server.port"] = port
            if self.route:
                attributes["http.route"] = self.route
            if self.query is not None:
                query = self.query()
                if query:
                    attributes["url.query"] = _redacted(query)
            self.tracing.tags.add_to(attributes, self.headers)
            span.set_attributes(attributes)
            self.unrouted = not self.route
        self.span = span
        self.owned = True
        self._token = otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def _name(method: str, target: str) -> str:
        """`method`: as `_method` gives it."""
        if len(target) > MAX_NAME_PATH:
            target = target[:MAX_NAME_PATH]
        return f"{'HTTP' if method == '_OTHER' else method} {target}"

    def routed(self, route_of: Callable[[], str | None]) -> None:
        """Name the span by the route its framework matched, `route_of()` (a template,
        `/reviews/{id}`; None: none known), and say it (`http.route`), as OpenTelemetry's HTTP
        conventions ask, where a name with the path gives every id a name of its own. Asked
        only when the span is `unrouted`."""
        if not self.unrouted:
            return
        route = route_of()
        if route:
            span = self.span
            span.update_name(self._name(_method(self.method), route))
            span.set_attribute("http.route", route)


class _ClientScope(_Scope):
    __slots__ = ("attempt", "cluster", "headers", "method", "subset", "upstream", "url")

    def __init__(
        self,
        tracing: Tracing,
        method: str,
        url: str,
        attempt: int,
        cluster: str | None,
        subset: str | None,
        upstream: str | None,
        headers: HeaderLookup | None,
    ) -> None:
        super().__init__(tracing)
        self.method = method
        self.url = url
        self.attempt = attempt
        self.cluster = cluster
        self.subset = subset
        self.upstream = upstream
        self.headers = headers

    def _start(self) -> None:
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is _CLIENT:
            self.span = current  # the app's instrumentation made it: annotate, do not nest
            mesh: dict[str, str | int] = {}
            self._mesh_attributes(mesh)
            current.set_attributes(mesh)
            return
        tracing = self.tracing
        tracer = tracing._tracer
        if not tracing.report_client:
            self.span = trace.INVALID_SPAN  # disableSpanReporting: none made, nothing annotated
            return
        if tracer is None or (tracing._sampler is not None and _unsampled(current)):
            self.span = current  # off, or ParentBased would drop it: nothing to make
            return
        scheme, authority, userinfo = _split_url(self.url)
        method = _method(self.method)
        name = "HTTP" if method == "_OTHER" else method
        if authority:
            name = f"{name} {authority}"
        span = tracer.start_span(name, None, kind=_CLIENT)
        if span.is_recording():
            host, port = strip_port(authority)
            if port is None:
                port = _DEFAULT_PORTS.get(scheme)
            url = self.url
            if userinfo:
                url = url.replace(userinfo + "@", "", 1)
            if "?" in url:
                url = _redacted(url)
            attributes: dict[str, str | int] = {
                "http.request.method": method,
                "url.full": url,
                "server.address": host,
            }
            if method == "_OTHER":
                attributes["http.request.method_original"] = self.method
            if port is not None:
                attributes["server.port"] = port
            self._mesh_attributes(attributes)
            if self.upstream:
                _peer(attributes, self.upstream)
            self.tracing.client_tags.add_to(attributes, self.headers)
            span.set_attributes(attributes)
        self.span = span
        self.owned = True
        ctx = trace.set_span_in_context(span)
        # instrumentation-httpx/requests/urllib3 under meshlib: skip their CLIENT spans
        self._token = otel_context.attach(
            otel_context.set_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, ctx)
        )

    def _mesh_attributes(self, attributes: dict[str, str | int]) -> None:
        if self.attempt > 1:
            attributes["http.request.resend_count"] = self.attempt - 1
        if self.cluster:
            attributes["meshlib.upstream_cluster"] = self.cluster
        if self.subset:
            attributes["meshlib.subset"] = self.subset


def _method(method: str) -> str:
    """The semconv `http.request.method`: a known method upper-cased, else `_OTHER`."""
    if method in _KNOWN_METHODS:
        return method
    upper = method.upper()
    return upper if upper in _KNOWN_METHODS else "_OTHER"


# Query parameters whose values are credentials (signed URLs): OpenTelemetry's HTTP semantic
# conventions (and its instrumentations' defaults) record them as REDACTED.
_SENSITIVE_QUERY = re.compile(r"(^|[?&])(AWSAccessKeyId|Signature|sig|X-Goog-Signature)=[^&#]*")


def _redacted(text: str) -> str:
    """A query string or URL with the values of credential parameters replaced."""
    return _SENSITIVE_QUERY.sub(r"\1\2=REDACTED", text) if "=" in text else text


def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme, authority without userinfo, userinfo) of an absolute URL, by string scanning."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", ""
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1 and found < end:
            end = found
    authority = rest[:end]
    userinfo, at, hostport = authority.rpartition("@")
    return scheme.lower(), (hostport if at else authority), userinfo


def _peer(attributes: dict[str, str | int], upstream: str) -> None:
    address, port = strip_port(upstream)
    attributes["network.peer.address"] = address
    if port is not None:
        attributes["network.peer.port"] = port


def _unsampled(span: Span) -> bool:
    """A valid span context whose trace is not sampled (the ParentBased sampler drops it)."""
    if type(span) is CallerSpan:  # valid by construction; its flag is read without building
        return not span.sampled
    span_context = span.get_span_context()
    return span_context.is_valid and not span_context.trace_flags.sampled


def _owned(span: Span) -> bool:
    """Whether meshlib's tracer made `span` (spans of other instrumentations are annotated)."""
    scope = getattr(span, "instrumentation_scope", None)
    return scope is None or scope.name == TRACER_NAME


def _flags(flags: str | Iterable[str] | None) -> str | None:
    if flags is None:
        return None
    if not isinstance(flags, str):
        flags = ",".join(flags) or _NO_FLAGS
    return flags or _NO_FLAGS
